"""Test-side parts shared by tests/cluster and tests/e2e: a ZMQ PULL collector standing in
for the gateway's socket, and greedy references computed with transformers."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import torch
import zmq

from workers.protocol import OutputChunk, decode


class ChunkCollector:
    """Binds a PULL socket and gathers every OutputChunk by request id (a real socket, as the
    gateway's). `wait_finished(ids)` blocks until each id got its finished chunk."""

    def __init__(self) -> None:
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.chunks: dict[str, list[OutputChunk]] = defaultdict(list)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop:
            if self._sock.poll(50):
                chunk = decode(self._sock.recv())
                with self._cond:
                    self.chunks[chunk.request_id].append(chunk)
                    self._cond.notify_all()

    def finished(self, rid: str) -> bool:
        return any(c.finished for c in self.chunks.get(rid, []))

    def wait_finished(self, ids: list[str], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not all(self.finished(r) for r in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [r for r in ids if not self.finished(r)]
                    raise TimeoutError(f"no finished chunk for {missing} in {timeout_s} s")
                self._cond.wait(left)

    def wait_tokens(self, rid: str, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while len(self.tokens(rid)) < count and not self.finished(rid):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{rid}: fewer than {count} tokens in {timeout_s} s")
                self._cond.wait(left)

    def tokens(self, rid: str) -> list[int]:
        return [t for c in self.chunks.get(rid, []) for t in c.new_token_ids]

    def final(self, rid: str) -> OutputChunk:
        finals = [c for c in self.chunks[rid] if c.finished]
        summary = [(c.new_token_ids, c.finish_reason, c.error_type, c.worker_id)
                   for c in self.chunks[rid]]
        assert len(finals) == 1, f"{rid}: {len(finals)} finished chunks: {summary}"
        return finals[0]

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by transformers (float32, no EOS stop: compare with ignore_eos)."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
        do_sample=False, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def prompts(count: int, vocab: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    """Token-id prompts of mixed lengths in [low, high)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
