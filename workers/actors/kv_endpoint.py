"""Builds a worker's end of KV transfer (sender on prefill, receiver on decode) from its engine.

The layout handed to the handshake comes from the engine's runner (the caches it allocated),
so two workers whose configs disagree (block size, dtype, model) refuse each other by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from workers.kv_transfer.base import OnDone, OnFailed
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.layout import KVLayout
from workers.kv_transfer.rank_routes import RankShape
from workers.model.kv_scales import model_kv_scales

# `--kv-transport` names -> the transfer layer's transports: NCCL and gloo are both the
# torch.distributed path (the device of the caches picks which); zmq is raw TCP frames;
# cuda_ipc is device-to-device copies between two processes on one GPU (zmq where it cannot).
_TRANSPORTS = {"auto": "torch", "nccl": "torch", "gloo": "torch", "torch": "torch", "zmq": "zmq",
               "cuda_ipc": "cuda_ipc"}


def transfer_config(kv_transport: str, host: str,
                    max_pairs: int = TransferConfig.max_pairs) -> TransferConfig:
    if kv_transport not in _TRANSPORTS:
        raise ValueError(f"unknown kv transport {kv_transport!r}; choose from {list(_TRANSPORTS)}")
    return TransferConfig(transport=_TRANSPORTS[kv_transport], host=host, max_pairs=max_pairs)


def kv_layout(engine) -> KVLayout:
    """The layout of `engine`'s KV caches (this rank's layers and kv heads)."""
    return runner_layout(engine.runner)


def runner_layout(runner) -> KVLayout:
    """The layout of a ModelRunner's KV caches (its rank's layers and kv heads)."""
    model = runner.model_config
    k_cache = runner.kv_caches[0][0]
    start, end = runner.layer_range
    return KVLayout(
        model=Path(runner.config.model).name,
        dtype=str(k_cache.dtype).removeprefix("torch."),
        block_size=runner.block_size,
        num_layers=model.num_layers,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        layer_start=start,
        layer_end=end,
        kv_head_start=runner.kv_head_range.start,
        kv_head_end=runner.kv_head_range.stop,
        # fp8 caches: the per-layer scales their bytes are read with (the handshake compares).
        kv_scales=model_kv_scales(runner.model) if k_cache.element_size() == 1 else (),
    )


def runner_shape(runner) -> RankShape:
    return RankShape(runner.parallel.tp_size, runner.parallel.pp_size)


def make_sender(engine, kv_transport: str, host: str, sender_id: str,
                on_done: OnDone, on_failed: OnFailed, max_pairs: int = TransferConfig.max_pairs,
                on_loop: Callable | None = None):
    """The prefill worker's sender; a worker of several ranks gets the driver's GroupSender
    (each rank sends its own slice), `on_loop` running its broadcasts on the engine thread."""
    from workers.kv_transfer import make_sender as make
    from workers.kv_transfer.rank_driver import GroupSender

    config = transfer_config(kv_transport, host, max_pairs)
    runner = engine.runner
    shape = runner_shape(runner)
    if shape.tp * shape.pp > 1:
        return GroupSender(kv_layout(engine), runner.kv_caches, config, shape,
                           engine.driver.channel, on_loop, kv_transport, on_done, on_failed,
                           sender_id)
    return make(kv_layout(engine), runner.kv_caches, config, on_done=on_done,
                on_failed=on_failed, sender_id=sender_id)


def make_receiver(engine, kv_transport: str, host: str, on_done: OnDone, on_failed: OnFailed,
                  on_loop: Callable | None = None):
    """The decode worker's receiver; a worker of several ranks gets the driver's
    GroupReceiver (a receiver per rank, one group address)."""
    from workers.kv_transfer.rank_driver import GroupReceiver
    from workers.kv_transfer.receiver import Receiver

    config = transfer_config(kv_transport, host)
    runner = engine.runner
    shape = runner_shape(runner)
    if shape.tp * shape.pp > 1:
        return GroupReceiver(kv_layout(engine), runner.kv_caches, config, shape,
                             engine.driver.channel, on_loop, kv_transport, on_done, on_failed)
    return Receiver(kv_layout(engine), runner.kv_caches, config, on_done=on_done,
                    on_failed=on_failed)


def rank_follower(rank: int, runner):
    """A non-driver rank's end of its worker's KV transfers (set up by the driver's first
    command)."""
    from workers.kv_transfer.rank_follower import RankFollower

    return RankFollower(rank, runner_layout(runner), runner_shape(runner), runner.kv_caches,
                        transfer_config)
