"""A KV Receiver in its own process, driven over a multiprocessing pipe (test helper).

Lets tests put the two ends of a pair in two real processes, and pause the receiver's
process (SIGSTOP) to make a transfer hang for real.
"""

from __future__ import annotations

import torch

from workers.kv_transfer import KVLayout, Receiver, TransferConfig
from workers.kv_transfer.transfer_table import TransferRecord


def random_caches(layout: KVLayout, num_blocks: int, seed: int, device: str = "cpu"):
    """One (K, V) per owned layer, `[num_blocks, block_size, owned kv heads, head_dim]`."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, layout.block_size, len(layout.kv_heads), layout.head_dim)
    dtype = getattr(torch, layout.dtype)
    return [tuple(torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(2))
            for _ in layout.layers]


def _record_fields(record: TransferRecord | None) -> dict:
    """What the parent reads of a transfer's record (plain data, across the pipe)."""
    if record is None:
        return {"state": None, "reason": "", "num_bytes": 0}
    return {"state": record.state.value, "reason": record.reason, "num_bytes": record.num_bytes}


def serve_receiver(conn, layout_fields: dict, config: TransferConfig, num_blocks: int,
                   seed: int, device: str = "cpu") -> None:
    """Child main: answers ('expect', rid, ids, timeout), ('abort', rid), ('wait', rid,
    timeout) -> (state, reason), ('record', rid, timeout) -> the same wait answered with
    `_record_fields`, ('blocks', ids) -> (K, V) per layer on the CPU, and ('close',) until
    closed. `device` names its index on CUDA ("cuda:0")."""
    layout = KVLayout.from_dict(layout_fields)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    caches = random_caches(layout, num_blocks, seed, device)
    receiver = Receiver(layout, caches, config)
    conn.send(receiver.address)
    while True:
        command, *args = conn.recv()
        if command in ("expect", "abort"):
            getattr(receiver, command)(*args)
            conn.send(None)
        elif command in ("wait", "record"):
            receiver.wait(*args)
            fields = _record_fields(receiver.table.get(args[0]))
            conn.send(fields if command == "record" else (fields["state"], fields["reason"]))
        elif command == "blocks":
            conn.send([(k[args[0]].cpu(), v[args[0]].cpu()) for k, v in caches])
        elif command == "close":
            receiver.close()
            conn.send(None)
            return
