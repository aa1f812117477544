"""A two-rank torch.distributed communicator for one (sender, receiver) pair.

No world group: each pair gets its own TCPStore (hosted by the receiver, rank 0) and a
ProcessGroupGloo (CPU tensors) or ProcessGroupNCCL (CUDA tensors) built directly on it, as
vLLM's StatelessProcessGroup does. So pairs come and go with workers, are created when a
worker starts or joins, and are torn down when idle or after a failure (a per-pair NCCL
communicator costs tens of MB of GPU memory).

Construction is eager and symmetric: both ranks construct together and exchange one warm-up
message before the constructor returns. ProcessGroupNCCL otherwise creates its point-to-point
communicator lazily inside the first send/recv, which blocks until both ranks are inside it;
a rank that first waits for a control message from the other then deadlocks (it did, on two
GPUs). After construction no send or recv ever waits for a connection.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable

import torch
from torch.distributed import PrefixStore, TCPStore

from workers.kv_transfer.timeline import mark

log = logging.getLogger(__name__)

RECEIVER_RANK = 0
SENDER_RANK = 1
GROUP_OPS = 8
"""Sends (receives) per grouped NCCL call. Posting costs the host ~12 us per operation
(H200, torch 2.11): 64 in one group kept the wire idle ~0.8 ms; in groups of 8 the first
kernel starts after ~0.1 ms and the rest post while it runs."""
OP_TIMEOUT_S = 3600.0
"""The communicator's own timeout of one operation. Pre-posted receives wait as long as the
prompt's prefill takes, so liveness is the transfer deadlines' job (they abort an NCCL pair),
not NCCL's. gloo cannot be aborted: its pairs get a timeout near the transfer deadline, the
latest a stuck gloo operation ends."""

# A timed-out NCCL op must abort its communicator, never kill the worker process (torch's
# default, 3, tears the process down): both ends survive a dead peer and rebuild the pair.
os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")


def op_timeout(config, device: torch.device) -> float:
    """The per-operation timeout a pair on `device` gets (see OP_TIMEOUT_S)."""
    return OP_TIMEOUT_S if device.type == "cuda" else 2 * config.timeout_s + 5


def host_store(host: str, timeout_s: float) -> TCPStore:
    """The receiver's side of a new pair's rendezvous, on a free port (`store.port`)."""
    return TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout_s),
                    wait_for_workers=False)


class PairGroup:
    """Both ranks construct one with the same (host, port, generation); construction blocks
    until the other rank has joined and the warm-up message has crossed (or `timeout_s`
    passes, raising)."""

    def __init__(self, store: TCPStore | None, host: str, port: int, rank: int,
                 generation: int, device: torch.device, timeout_s: float,
                 op_timeout_s: float = OP_TIMEOUT_S):
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = TCPStore(host, port, 2, False, timeout=timeout)
        self._store = store
        self.rank = rank
        self.peer = 1 - rank
        self.generation = generation
        self.device = device
        self.sends = 0
        self.sent_bytes = 0
        """Sends posted on this pair so far, and their bytes (warm-up and probe included):
        how many messages a transfer put on the wire is the difference around it."""
        prefix = PrefixStore(f"kvrelay/pair/{generation}", store)
        op_timeout = datetime.timedelta(seconds=op_timeout_s)
        if device.type == "cuda":
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = op_timeout
            self.backend = "nccl"
            self._group = ProcessGroupNCCL(prefix, rank, 2, options)
        else:
            from torch.distributed import ProcessGroupGloo

            self.backend = "gloo"
            self._group = ProcessGroupGloo(prefix, rank, 2, op_timeout)
        self._warm_up(timeout_s)

    def _warm_up(self, timeout_s: float) -> None:
        """One message each way: builds the P2P connection on both ranks now."""
        buf = torch.zeros(1, dtype=torch.uint8, device=self.device)
        first, second = (self.post_recv, self.post_send) if self.rank == RECEIVER_RANK else \
            (self.post_send, self.post_recv)
        self.wait(first(buf), timeout_s)
        self.wait(second(buf), timeout_s)

    def send(self, buf: torch.Tensor, timeout_s: float) -> None:
        """One send of a contiguous buffer; raises (RuntimeError) if not done within timeout_s."""
        self.wait(self.post_send(buf), timeout_s)

    def post_send(self, buf: torch.Tensor):
        """Posts one send (ordered after work queued on the current stream); finish it with
        `wait`. Sends and recvs match in posting order."""
        return self.post_many([buf], send=True)[0]

    def post_recv(self, buf: torch.Tensor):
        """Posts one recv into a contiguous buffer; finish it with `wait(work, timeout_s)`."""
        return self.post_many([buf], send=False)[0]

    def post_many(self, bufs: Iterable[torch.Tensor], send: bool) -> list:
        """Posts one send (or recv) per buffer, in grouped NCCL calls of at most
        GROUP_OPS buffers each (a group's kernel starts once the group is posted, so the
        wire starts after the first few buffers while the host posts the rest; `bufs` may
        be a generator that builds them meanwhile); returns the works to check. Matching is
        by posting order alone (one tag), so the two ends may group differently.
        """
        post = self._group.send if send else self._group.recv
        if send:
            bufs = self._counted(bufs)
        first = "s.g1" if send else "r.g1"
        if self.backend != "nccl":
            works = []
            for buf in bufs:
                works.append(post([buf], self.peer, 0))
                if len(works) == 1:
                    mark(first)
            return works
        # Always grouped, even one buffer: ProcessGroupNCCL runs grouped P2P on the group's
        # communicator but a lone send/recv on a second, per-peer one, which it would build
        # lazily inside that op (both ranks inside it, or both hang). One kind of call, one
        # communicator, built by the warm-up.
        works, in_group = [], 0
        for buf in bufs:
            if in_group == 0:
                self._group._start_coalescing()
            post([buf], self.peer, 0)
            in_group += 1
            if in_group == GROUP_OPS:
                works.append(self._group._end_coalescing())
                in_group = 0
                if len(works) == 1:
                    mark(first)
        if in_group:
            works.append(self._group._end_coalescing())
        return works

    def _counted(self, bufs: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
        for buf in bufs:
            self.sends += 1
            self.sent_bytes += buf.numel() * buf.element_size()
            yield buf

    def wait(self, work, timeout_s: float) -> None:
        """Raises (RuntimeError) if `work` is not done within timeout_s."""
        work.wait(datetime.timedelta(seconds=max(timeout_s, 0.001)))
        if self.device.type == "cuda":
            # NCCL's wait only orders the current stream (the pair's CopyStream) after the op;
            # the data is ready when that stream is.
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        """Aborts pending operations (they end with an error) and frees the communicator.
        Idempotent."""
        group, self._group = self._group, None
        if group is None:
            return
        try:
            group.abort()
        except RuntimeError as err:  # an already-broken communicator
            log.debug("pair group abort: %s", err)
        self._store = None
