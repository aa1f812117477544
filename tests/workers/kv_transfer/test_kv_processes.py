"""The two ends of a pair in two real processes (gloo and ZMQ over loopback), including a
receiver whose process is paused mid-transfer (SIGSTOP): the sender fails within its deadline,
the receiver's side ends by its own (a recv on the torn-down group fails), and the pair
recovers for the next transfer.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp
from kv_peer_process import random_caches, serve_receiver

from workers.errors import TransferTimeout
from workers.kv_transfer import TransferConfig, TransferState, make_sender

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGSTOP")


class PeerProcess:
    """A Receiver in its own process (kv_peer_process.serve_receiver) on `device`, as in
    serving; it inherits this process's environment (NCCL_*, CUDA_VISIBLE_DEVICES). Every
    call fails the test after `answer_s` instead of hanging on a peer that hangs or died."""

    def __init__(self, layout, config, num_blocks, seed, device="cpu", answer_s=120.0):
        ctx = mp.get_context("spawn")
        self.answer_s = answer_s
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=serve_receiver, daemon=True,
                                   args=(child_conn, layout.to_dict(), config, num_blocks, seed,
                                         device))
        self.process.start()
        child_conn.close()  # the child's end lives in the child only: its death reads as EOF
        self.address = self._answer("start", answer_s)

    def call(self, *command, answer_s: float | None = None):
        try:
            self.conn.send(command)
        except BrokenPipeError:
            pass  # the peer died: `_answer` reads the EOF and says so
        return self._answer(command[0], answer_s or self.answer_s)

    def _answer(self, what: str, answer_s: float):
        try:
            if self.conn.poll(answer_s):
                return self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise AssertionError(f"receiver process died on {what!r} "
                                 f"(exit code {self.process.exitcode})") from None
        self.process.kill()
        self.process.join(10)
        raise AssertionError(f"receiver process did not answer {what!r} in {answer_s} s")

    def close(self):
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGCONT)  # a paused peer must answer close
            try:
                self.call("close", answer_s=30)
            except AssertionError:
                pass  # it died or hung (then killed): the test's own checks say what failed
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)
        self.conn.close()


def assert_landed(peer: PeerProcess, src, src_ids, dst_ids):
    """The peer's blocks dst_ids hold the bytes of src's src_ids (any dtype, any device);
    returns the peer's (K, V) per layer of them, on the CPU."""
    landed = peer.call("blocks", dst_ids)
    for (sk, sv), (dk, dv) in zip(src, landed, strict=True):
        assert torch.equal(dk.view(torch.uint8), sk[src_ids].cpu().view(torch.uint8))
        assert torch.equal(dv.view(torch.uint8), sv[src_ids].cpu().view(torch.uint8))
    return landed


@pytest.fixture(params=["torch", "zmq"])
def peer(request, layout):
    config = TransferConfig(transport=request.param, probe_bytes=1 << 16, timeout_s=10)
    process = PeerProcess(layout, config, num_blocks=8, seed=2)
    yield process, config
    process.close()


def test_paused_receiver_fails_within_deadline_and_pair_recovers(peer, layout):
    process, config = peer
    src = random_caches(layout, 8, seed=1)
    sender = make_sender(layout, src, config)
    try:
        process.call("expect", "r0", [5, 2, 7], 10)
        sender.send("r0", process.address, [1, 6], [5, 2, 7], num_tokens=7)
        assert sender.wait("r0", 20) is TransferState.DONE
        assert process.call("wait", "r0", 5)[0] == "done"
        assert_landed(process, src, [1, 6], [5, 2])

        process.call("expect", "r1", [0, 1], 3.0)
        os.kill(process.process.pid, signal.SIGSTOP)
        start = time.monotonic()
        sender.send("r1", process.address, [3, 4], [0, 1], timeout_s=0.5)
        sender.send("r2", process.address, [3], [6], timeout_s=5)  # queued behind r1
        sender.abort("r2")
        assert sender.state("r2") is TransferState.ABORTED and not sender.in_flight("r2")
        assert sender.wait("r1", 5) is TransferState.FAILED
        # By its own 0.5 s deadline (plus slack for a loaded 2-core machine), not by the
        # receiver's 3 s one.
        assert time.monotonic() - start < 0.5 + 1.5
        assert "timeout" in sender.table.get("r1").reason.lower()
        assert isinstance(sender.error("r1"), TransferTimeout)
        os.kill(process.process.pid, signal.SIGCONT)

        # The receiver's half of r1 cannot hang: it ends by its own 3 s deadline.
        state, reason = process.call("wait", "r1", 6)
        if config.transport == "zmq" or state == "done":
            # The data had reached the paused process's socket whole: it lands intact.
            assert state == "done", reason
            assert_landed(process, src, [3, 4], [0, 1])
        else:  # torch: its receives waited on a pair the sender tore down
            assert state == "failed", reason
        # A send stuck past its deadline tears its pair down, failing whatever is in flight on
        # it; so the next transfer starts once r1's and r2's sends have ended, on a live pair.
        for rid in ("r1", "r2"):
            quiet = threading.Event()
            sender.when_quiet(rid, quiet.set)
            assert quiet.wait(2 * config.timeout_s + 10), f"{rid}'s sends never ended"
        process.call("expect", "r3", [3, 4], 10)
        sender.send("r3", process.address, [0, 7], [3, 4])
        assert sender.wait("r3", 20) is TransferState.DONE, sender.table.get("r3").reason
        assert_landed(process, src, [0, 7], [3, 4])
    finally:
        sender.close()
