"""Host memory of a serving process: large freed buffers go back to the OS.

glibc's malloc serves an allocation above its mmap threshold (128 KiB at start) with a mmap of
its own, unmapped on free; but each such free raises the threshold to the freed size (up to
32 MiB), so later large buffers come from the malloc arenas, which keep what is freed. A
prefill worker's transient buffers vary in size request by request (the attention scores of
a 1,500-token prompt are 36 MB per layer for the tiny model), so its arenas only grew: in a
soak of mixed lengths the prefill worker went from ~470 MB to 1.1 GB, ~600 MB of it memory
malloc held free (mallinfo2), while its live heap stayed at ~105 MB. The gateway kept the
buffers of a megabytes-long prompt's tokenization the same way.

Setting the threshold pins it (glibc then stops adjusting it, and the trim threshold), so
every buffer of `MMAP_THRESHOLD_BYTES` or more is mapped for itself and returned when freed;
smaller ones are reused from the arenas as before. The cost is a page fault per page of such
a buffer, small beside the compute that fills it (on GPU workers such host buffers are few).
"""

from __future__ import annotations

import ctypes
import ctypes.util

MMAP_THRESHOLD_BYTES = 128 << 10
"""glibc's own starting value, kept: at 1 MiB the prefill worker still crept ~0.5 MB/s
(buffers of 128 KiB-1 MiB, their sizes varying with the prompt, fragmenting the arenas)."""
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_large_frees_to_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pins this process's mmap threshold (see the module docstring); False where malloc is
    not glibc's (musl, macOS), which changes nothing."""
    mallopt = getattr(_libc(), "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def release_free_memory() -> bool:
    """Gives the free pages of every malloc arena back to the OS (`malloc_trim(0)`): what the
    threshold does not cover, a burst of small buffers freed together (the per-token strings
    of a megabytes-long prompt's tokenization, ~450 MB in the gateway). Takes milliseconds per
    hundred MB free; False where malloc is not glibc's."""
    trim = getattr(_libc(), "malloc_trim", None)
    return bool(trim is not None and trim(0))


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None
