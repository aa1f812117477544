"""A non-driver rank's end of its worker's KV transfers (workers/actors/rank_actor.py).

A prefill or decode worker of several ranks moves KV rank to rank: each rank has its own
TorchSender (prefill) or Receiver (decode) over its own slice of the cache. The driver runs
the scheduler, so it tells the other ranks what to do with commands that ride in its step
broadcast (workers/kv_transfer/messages.py: RankSetup, RankOpen, RankSpans, RankFinish,
RankExpect, RankAbort, RankConnect), in order with the steps: a prefill rank learns a step's
spans just before it runs the step, and posts each layer's sends as its own layers finish.
The rank reports back over a ZMQ PUSH (RankNotice): set up, expected, ended, quiet.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import zmq

from workers.kv_transfer import messages as msg
from workers.kv_transfer.base import TransferState, _TransferEnd
from workers.kv_transfer.config import TransferConfig
from workers.kv_transfer.layout import KVLayout
from workers.kv_transfer.packing import KVCaches
from workers.kv_transfer.rank_routes import RankShape
from workers.kv_transfer.receiver import Receiver
from workers.kv_transfer.stream_plan import PrefillSpan
from workers.kv_transfer.torch_sender import TorchSender
from workers.protocol import decode, encode

log = logging.getLogger(__name__)


class RankFollower:
    """`handle(side)` runs the driver's commands (the rank's step thread); `layer_hook` is
    what the rank's step calls after each layer (prefill ranks only, else None)."""

    def __init__(self, rank: int, layout: KVLayout, shape: RankShape, kv_caches: KVCaches,
                 config_for: Callable[[str, str, int], TransferConfig]):
        self.rank = rank
        self.layout = layout
        self.shape = shape
        self.kv_caches = kv_caches
        self._config_for = config_for
        self.end: _TransferEnd | None = None
        self._push: zmq.Socket | None = None
        self._push_lock = threading.Lock()

    @property
    def layer_hook(self) -> Callable[[int], None] | None:
        return self.end.layer_done if isinstance(self.end, TorchSender) else None

    def handle(self, side: list[bytes]) -> None:
        for blob in side:
            command = decode(blob)
            try:
                self._run(command)
            except Exception:  # noqa: BLE001 - one bad command must not stop the rank's steps
                log.exception("rank %d: kv command %s failed", self.rank, type(command).__name__)

    def _run(self, command) -> None:
        if isinstance(command, msg.RankSetup):
            self._setup(command)
        elif isinstance(command, msg.RankOpen):
            self._open(command)
        elif isinstance(command, msg.RankSpans):
            if command.fence:
                self.end.fence()
            self.end.before_step([PrefillSpan(rid, start, end, table)
                                  for rid, start, end, table in command.spans])
        elif isinstance(command, msg.RankFinish):
            self.end.finish(command.request_id, extra=command.extra)
        elif isinstance(command, msg.RankExpect):
            self.end.expect(command.request_id, command.block_ids, command.timeout_s)
            self._when_quiet(command.request_id)
            self._notice(msg.RankNotice(self.rank, "expected", command.request_id))
        elif isinstance(command, msg.RankAbort):
            self.end.abort(command.request_id)
            if isinstance(self.end, TorchSender):
                self.end.forget(command.request_id)
        elif isinstance(command, msg.RankConnect):
            self.end.connect(command.dest)

    def _setup(self, setup: msg.RankSetup) -> None:
        if self.end is not None:
            self.end.close()
        config = self._config_for(setup.kv_transport, setup.host, setup.max_pairs)
        if setup.role == "prefill":
            self.end = TorchSender(self.layout, self.kv_caches, config, self._ended_ok,
                                   self._ended, f"{setup.sender_id}-r{self.rank}", self.shape,
                                   self.rank)
        else:
            self.end = Receiver(self.layout, self.kv_caches, config, self._ended_ok,
                                self._ended)
        if self._push is None:
            self._push = zmq.Context.instance().socket(zmq.PUSH)
            self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(setup.notice_address)
        self._notice(msg.RankNotice(self.rank, "ready",
                                address=getattr(self.end, "address", "")))

    def _open(self, command: msg.RankOpen) -> None:
        self.end.open(command.request_id, command.dest, command.dest_block_ids,
                      command.num_tokens, command.timeout_s)
        if self.end.table.get(command.request_id) is not None:  # this rank feeds the dest
            self._when_quiet(command.request_id)

    def _when_quiet(self, rid: str) -> None:
        self.end.when_quiet(rid, lambda: self._notice(msg.RankNotice(self.rank, "quiet", rid)))

    def _ended_ok(self, rid: str, extra: dict) -> None:
        self._ended(rid, TransferState.DONE, "")

    def _ended(self, rid: str, state: TransferState, reason: str) -> None:
        record = self.end.table.get(rid)
        self._notice(msg.RankNotice(
            self.rank, "ended", rid, state.value, reason,
            record.num_bytes if record else 0, record.seconds if record else 0.0,
            peer_bytes=dict(record.peer_bytes) if record else {}))

    def _notice(self, notice: msg.RankNotice) -> None:
        """Any thread (table callbacks run on the transfer threads)."""
        with self._push_lock:
            if self._push is not None:
                self._push.send(encode(notice))

    def close(self) -> None:
        if self.end is not None:
            self.end.close()
        with self._push_lock:
            if self._push is not None:
                self._push.close(linger=0)
                self._push = None
