"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

A decode step is a chain of ~400 short kernels. On Hopper a kernel launched with PDL may start
before the kernel ahead of it in the stream has finished: its programs become resident as soon
as every program of the one ahead has started and signalled (`griddepcontrol.launch_dependents`),
then block in `griddepcontrol.wait` until that kernel has completed and its writes are visible.
The launch latency and the ramp-up of the next kernel then hide behind the tail of the current
one, and a matrix-vector kernel can issue the loads of its first weight tile (read-only, never
written by the step) before it waits.

Rules every kernel here follows (a kernel launched with PDL that breaks them races):
- `enter(PDL)` runs before the kernel's first read of anything the step writes (activations,
  caches, counters, split partials) and before its first write;
- only weights, scales and other load-time constants may be loaded before it.
A kernel launched without PDL, or any torch kernel, orders normally in the stream. Waiting is
transitive: a kernel past `enter` knows the one ahead completed, and that one waited for its own
predecessor before it finished.

Launch sites pass `**launch(tensor.device)`: `PDL=True, launch_pdl=True` on a GPU of compute
capability 9.0 or newer, `PDL=False` elsewhere (CPU, the Triton interpreter, older GPUs) or when
the environment sets KVRELAY_PDL=0 (for A/B timing). CUDA-graph capture keeps the programmatic
edges.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV = "KVRELAY_PDL"


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (see the module docstring)."""
    if device.type != "cuda":
        return False
    return _enabled(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _enabled(index: int) -> bool:
    # Read once per process and GPU (launches are on the decode step's host path); tests
    # that flip the environment call `_enabled.cache_clear()`.
    if os.environ.get(ENV, "1") == "0" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def launch(device: torch.device) -> dict:
    """The launch arguments of a kernel that takes the `PDL` constexpr and calls `enter`."""
    if enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def enter(PDL: tl.constexpr):
    """Wait for the kernel ahead to complete (its writes visible), then let the next kernel's
    programs start launching. A no-op without PDL."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
