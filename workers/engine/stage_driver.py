"""`StageDriver`: the driver rank's side of a TP/PP group's steps.

The engine's rank (the driver, rank 0) hands each step to the group's other ranks over a
step channel (workers/actors/step_broadcast.py) and runs its own part through its
ModelRunner; the other ranks run `ModelRunner.run_pipeline` with the steps they receive.
With pp_size > 1 the driver runs the first stage and the last stage's TP rank 0 sends the
logits back: `submit` starts a step (a micro-batch, workers/engine/micro_batches.py) and
`collect` takes the oldest one's logits, up to pp_size steps in flight at once. A runner of
one rank (no channel, pp_size 1) just runs each step.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from workers.engine.model_runner import ModelRunner
from workers.engine.step_input import StepInput


class StepChannel(Protocol):
    """How the driver rank of a TP/PP group hands each step to the other ranks
    (workers/actors/step_broadcast.py)."""

    def send(self, step: StepInput) -> None: ...

    def broken(self, error: Exception) -> None:
        """A step failed on this rank: the group can never run in step again."""


class StageDriver:
    """Runs the driver's steps on `runner` (this rank's ModelRunner), handing each to the
    other ranks over `channel` first (None: no other rank takes steps from this one).
    `execute(step)` is one step at a time; with pp_size > 1, `submit(step)` and later
    `collect()` keep up to `pipeline_depth` steps in flight."""

    def __init__(self, runner: ModelRunner, channel: StepChannel | None = None):
        self.runner = runner
        self.channel = channel
        self._in_flight: deque[StepInput] = deque()
        self._held_hidden: torch.Tensor | None = None

    @property
    def pipeline_depth(self) -> int:
        """Most steps in flight at once through `submit`/`collect`: one per pipeline stage."""
        return self.runner.parallel.pp_size

    @property
    def num_in_flight(self) -> int:
        """Steps submitted whose logits were not collected yet."""
        return len(self._in_flight)

    @torch.inference_mode()
    def execute(
        self, step: StepInput, layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor | None:
        """The engine's entry point: float32 logits [len(step.logits_indices), vocab] of the
        whole model, one step at a time. With a channel the step goes to the other ranks
        first, which run `run_pipeline` in step. Requires no step in flight (see `submit`)."""
        if self.channel is None and self.pipeline_depth == 1:
            return self.runner.execute(step, layer_done)
        if self.pipeline_depth == 1:
            with self._group_step():
                self.channel.send(step)
                return self.runner.execute(step, layer_done)
        if self._in_flight:
            raise RuntimeError(f"execute with {len(self._in_flight)} steps in flight")
        self.submit(step, layer_done)
        return self.collect()

    @torch.inference_mode()
    def submit(self, step: StepInput, layer_done: Callable[[int], None] | None = None) -> None:
        """Driver of a pipeline (pp_size > 1): starts `step` (a micro-batch) without waiting
        for its logits. The step goes to the other ranks, this rank runs the first stage, and
        the hidden states go to the next stage at once, unless `pipeline_depth` steps are now
        in flight: then they wait for the next `collect`, which first takes the oldest
        step's logits. So on the link between the driver and the last stage (the same pair of
        ranks at pp_size 2) the driver's sends and receives come in the order the last stage
        makes them (receive step n, send its logits, receive step n + 1): blocking
        point-to-point calls never wait on each other in a cycle. The caller collects
        whenever `pipeline_depth` steps are in flight, before the next submit."""
        if len(self._in_flight) == self.pipeline_depth:
            raise RuntimeError(f"{self.pipeline_depth} steps in flight: collect one first")
        with self._group_step():
            if self.channel is not None:
                self.channel.send(step)
            hidden = self.runner.forward_stage(step, None, layer_done).hidden
            self._in_flight.append(step)
            if len(self._in_flight) < self.pipeline_depth:
                self.runner.parallel.send_to_next_stage(hidden)
            else:
                self._held_hidden = hidden

    @torch.inference_mode()
    def collect(self) -> torch.Tensor:
        """Float32 logits [len(step.logits_indices), vocab] of the oldest step in flight
        (sent back by the last stage's TP rank 0); then hands the held step, if any, to the
        next stage (see `submit`)."""
        step = self._in_flight.popleft()
        runner = self.runner
        with self._group_step():
            logits = torch.empty(len(step.logits_indices), runner.model_config.vocab_size,
                                 dtype=torch.float32, device=runner.device)
            if step.logits_indices:
                runner.parallel.recv_from_last_stage(logits)
            if self._held_hidden is not None:
                hidden, self._held_hidden = self._held_hidden, None
                runner.parallel.send_to_next_stage(hidden)
        return logits

    @contextlib.contextmanager
    def _group_step(self) -> Iterator[None]:
        """A collective failed: the ranks are out of step for good (the group goes whole)."""
        try:
            yield
        except RuntimeError as exc:
            if self.channel is not None:
                self.channel.broken(exc)
            raise
