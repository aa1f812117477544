"""A two-rank torch.distributed communicator for one (sender, receiver) pair.

No world group: each pair gets its own TCPStore (hosted by the receiver, rank 0) and a
ProcessGroupGloo (CPU tensors) or ProcessGroupNCCL (CUDA tensors) built directly on it, as
vLLM's StatelessProcessGroup does. So pairs come and go with workers, are created on first
contact, and are torn down when idle or after a failure (a per-pair NCCL communicator costs
tens of MB of GPU memory).
"""

from __future__ import annotations

import datetime
import logging

import torch
from torch.distributed import PrefixStore, TCPStore

log = logging.getLogger(__name__)

RECEIVER_RANK = 0
SENDER_RANK = 1


def host_store(host: str, timeout_s: float) -> TCPStore:
    """The receiver's side of a new pair's rendezvous, on a free port (`store.port`)."""
    return TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout_s),
                    wait_for_workers=False)


class PairGroup:
    """Both ranks construct one with the same (host, port, generation); construction blocks
    until the other rank has joined (or `timeout_s` passes, raising)."""

    def __init__(self, store: TCPStore | None, host: str, port: int, rank: int,
                 generation: int, device: torch.device, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store = TCPStore(host, port, 2, False, timeout=timeout)
        self._store = store
        self.rank = rank
        self.peer = 1 - rank
        self.generation = generation
        self.device = device
        prefix = PrefixStore(f"kvrelay/pair/{generation}", store)
        if device.type == "cuda":
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.backend = "nccl"
            self._group = ProcessGroupNCCL(prefix, rank, 2, options)
        else:
            from torch.distributed import ProcessGroupGloo

            self.backend = "gloo"
            self._group = ProcessGroupGloo(prefix, rank, 2, timeout)

    def send(self, buf: torch.Tensor, timeout_s: float) -> None:
        """One send of a contiguous buffer; raises (RuntimeError) if not done within timeout_s."""
        self.wait(self.post_send(buf), timeout_s)

    def post_send(self, buf: torch.Tensor, tag: int = 0):
        """Posts one send (ordered after work queued on the current stream); finish it with
        `wait`. Sends and recvs match in posting order (tags keep gloo's matching exact)."""
        return self._group.send([buf], self.peer, tag)

    def post_recv(self, buf: torch.Tensor, tag: int = 0):
        """Posts one recv into a contiguous buffer; finish it with `wait(work, timeout_s)`."""
        return self._group.recv([buf], self.peer, tag)

    def wait(self, work, timeout_s: float) -> None:
        """Raises (RuntimeError) if `work` is not done within timeout_s."""
        work.wait(datetime.timedelta(seconds=max(timeout_s, 0.001)))
        if self.device.type == "cuda":
            # NCCL's wait only orders the current stream (the pair's CopyStream) after the op;
            # the data is ready when that stream is.
            torch.cuda.current_stream(self.device).synchronize()

    def close(self) -> None:
        """Aborts pending operations and frees the communicator. Idempotent."""
        group, self._group = self._group, None
        if group is None:
            return
        try:
            group.abort()
        except RuntimeError as err:  # an already-broken communicator
            log.debug("pair group abort: %s", err)
        self._store = None
