"""Static candidate trees for Medusa tree verification (Cai et al. 2024, "sparse trees").

A tree node is a path (c_1, .., c_d): the c_1-th top candidate of head 0, then the c_2-th of
head 1, ..; its token is the c_d-th top token of head d - 1 (Medusa's heads all read the same
hidden state, so candidates are products of per-head top-k lists). A tree is verified in
one target forward of 1 + n tokens: the sequence's last token (the root, query 0) and the n
nodes (query j + 1 is node j), each at position root + depth, each attending to the context,
the root and its own ancestors only (`ancestor_masks`; kernels/attention_ref.py). The
nodes' KV lands in n consecutive slots after the root; the accepted path's KV is then moved
to the first slots (workers/spec/decoder.py) and the rest rolled back.

Our trees always hold the top chain ((0,), (0, 0), ..) to depth K, so a tree accepts at least
what the chain accepts on the same heads; the other nodes follow a Medusa-style priority
order (top-1 continuations and second/third choices of the first heads first). A run has at
most 8 query tokens (the paged decode kernel's limit), so at most 7 nodes.

Pure Python: the scheduler builds positions and masks from these.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from workers.config import MAX_SPECULATIVE_TOKENS

_PRIORITY: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,),
    (0, 0, 1), (2, 0), (0, 1, 0), (1, 1), (0, 0, 0, 0), (0, 0, 2), (1, 0, 0),
    (0, 0, 0, 1), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0),
)
"""Candidate paths, most useful first (modelled on the head of Medusa's mc_sim_7b_63 tree);
every path's parent comes before it."""


@dataclass(frozen=True)
class SpecTree:
    paths: tuple[tuple[int, ...], ...]
    """The nodes, parents before children."""
    parents: tuple[int, ...]
    """Node j's parent node, -1: the root (the sequence's last token)."""

    @property
    def num_nodes(self) -> int:
        return len(self.paths)

    @property
    def width(self) -> int:
        """How many top candidates per head the tree reads."""
        return 1 + max(max(path) for path in self.paths)


@functools.cache
def build_tree(depth: int, num_nodes: int) -> SpecTree:
    """The top chain to `depth`, then the priority paths no deeper than it, up to num_nodes
    (>= depth, <= 7) nodes."""
    assert 1 <= depth <= num_nodes <= MAX_SPECULATIVE_TOKENS, (depth, num_nodes)
    paths = [(0,) * d for d in range(1, depth + 1)]
    for path in _PRIORITY:
        if len(paths) == num_nodes:
            break
        if len(path) <= depth and path not in paths and path[:-1] in (*paths, ()):
            paths.append(path)
    index = {path: j for j, path in enumerate(paths)}
    return SpecTree(tuple(paths), tuple(index.get(path[:-1], -1) for path in paths))


def tree_positions(root: int, parents: list[int]) -> list[int]:
    """Positions of a tree run's 1 + n tokens: the root's, then root + each node's depth."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 + (depths[parent] if parent >= 0 else 0))
    return [root, *(root + d for d in depths)]


def ancestor_masks(parents: list[int]) -> list[int]:
    """Per query token of the run (root first): bit a set where query a is itself or an
    ancestor (the root is everyone's)."""
    masks = [1]
    for j, parent in enumerate(parents):
        masks.append((1 << (j + 1)) | masks[parent + 1])
    return masks


def path_to(parents: list[int], node: int) -> list[int]:
    """The nodes from the root's child down to `node` (empty for the root, -1)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]
