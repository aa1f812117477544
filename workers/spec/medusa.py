"""Medusa heads proposer (Cai et al. 2024): extra heads on the target's last hidden state.

Checkpoint layout (FasterDecoding/Medusa): a folder with config.json (`medusa_num_heads`,
`medusa_num_layers`) and the heads' tensors in `medusa_lm_head.safetensors` (or any
*.safetensors), named `{head}.{layer}.linear.weight|bias` for each head's residual blocks
(x + SiLU(W x + b)) and `{head}.{medusa_num_layers}.weight` for its LM head ([vocab,
hidden], no bias). With load_format 'dummy' the heads are random (seeded), of the target's
shape.

Head i on the hidden state that produced token t+1 predicts token t+2+i, so after each step
the engine hands the proposer the hidden row of every sequence's newest token
(`observe`); the next proposal is the top chain, each head's argmax (deterministic: the
rejection sampler treats it as one-hot, so sampling stays exact). With `medusa_tree='tree'`
a greedy request gets a static tree of the heads' top-k candidates instead
(workers/spec/tree.py), verified in one forward under a tree attention mask; sampling
requests keep the top chain (we do not implement typical acceptance over a tree, so the
target's distribution stays exact through the chain's rejection sampling). A sequence
without a current hidden row (its first step on a decode worker: its prompt's hidden state
stayed on the prefill worker) gets no drafts that step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workers.config import EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.engine.sequence import Sequence
from workers.errors import InvalidParameter
from workers.spec.proposer import DraftRun, Proposer
from workers.spec.tree import build_tree

WEIGHTS_FILE = "medusa_lm_head.safetensors"


class MedusaHead(nn.Module):
    def __init__(self, hidden: int, vocab: int, num_layers: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + nn.functional.silu(block(x))
        return self.lm_head(x)


def read_medusa_config(folder: str | Path) -> tuple[int, int]:
    """(num_heads, num_layers) from the folder's config.json."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
        return int(config["medusa_num_heads"]), int(config["medusa_num_layers"])
    except (OSError, ValueError, KeyError) as exc:
        message = f"{path}: no Medusa config (medusa_num_heads, medusa_num_layers): {exc}"
        raise InvalidParameter("draft_model", message) from None


def _state_dict_names(num_heads: int, num_layers: int) -> dict[str, str]:
    """Medusa checkpoint name -> our module's parameter name."""
    names = {}
    for head in range(num_heads):
        for layer in range(num_layers):
            for param in ("weight", "bias"):
                names[f"{head}.{layer}.linear.{param}"] = f"{head}.blocks.{layer}.{param}"
        names[f"{head}.{num_layers}.weight"] = f"{head}.lm_head.weight"
    return names


def make_random_medusa(folder: str | Path, hidden: int, vocab: int, num_heads: int,
                       num_layers: int = 1, seed: int = 0) -> Path:
    """Writes random Medusa heads in the checkpoint layout (tests, benchmarks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    heads = nn.ModuleList(MedusaHead(hidden, vocab, num_layers) for _ in range(num_heads))
    ours = heads.state_dict()
    tensors = {name: ours[mine].contiguous()
               for name, mine in _state_dict_names(num_heads, num_layers).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps(
        {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers}))
    return folder


class MedusaProposer(Proposer):
    name = "medusa"
    uses_hidden = True

    def __init__(self, config: EngineConfig, target: ModelRunner):
        spec = config.speculative
        num_heads, num_layers = read_medusa_config(spec.draft_model)
        if spec.num_speculative_tokens > num_heads:
            raise InvalidParameter("num_speculative_tokens",
                                   f"{spec.num_speculative_tokens} exceeds the "
                                   f"{num_heads} Medusa heads of {spec.draft_model}")
        if target.parallel.pp_size > 1:
            raise InvalidParameter("speculative", "medusa reads the last stage's hidden "
                                                  "states: pipeline parallelism is not supported")
        self.tree_size = spec.medusa_tree_size if spec.medusa_tree == "tree" else None
        if self.tree_size is not None and target.parallel.tp_size > 1:
            raise InvalidParameter("medusa_tree", "a tree's accepted KV is compacted in the "
                                                  "driver's cache only: tensor parallelism "
                                                  "needs --medusa-tree chain")
        model = target.model_config
        self.target = target
        with torch.random.fork_rng(devices=[]):  # dummy heads: seeded, random
            torch.manual_seed(config.seed)
            self.heads = nn.ModuleList(
                MedusaHead(model.hidden_size, model.vocab_size, num_layers)
                for _ in range(num_heads))
        if config.load_format != "dummy":
            self._load(spec.draft_model, num_heads, num_layers)
        self.heads.to(device=target.device, dtype=target.dtype).eval()
        self._hidden: dict[str, tuple[int, torch.Tensor]] = {}

    def _load(self, folder: str, num_heads: int, num_layers: int) -> None:
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise InvalidParameter("draft_model", f"{folder}: no *.safetensors Medusa heads")
        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            tensors.update(load_file(str(path)))
        ours = self.heads.state_dict()
        names = _state_dict_names(num_heads, num_layers)
        missing = sorted(set(names) - set(tensors))
        if missing:
            raise InvalidParameter("draft_model", f"{folder}: Medusa tensors missing: "
                                                  f"{missing[:4]}")
        for name, mine in names.items():
            if tensors[name].shape != ours[mine].shape:
                raise InvalidParameter(
                    "draft_model", f"Medusa tensor {name} has shape "
                                   f"{tuple(tensors[name].shape)}, the target needs "
                                   f"{tuple(ours[mine].shape)} (hidden_size "
                                   f"{self.target.model_config.hidden_size}, vocab_size "
                                   f"{self.target.model_config.vocab_size})")
            ours[mine].copy_(tensors[name])

    def observe(self, seqs: list[Sequence], num_tokens: list[int],
                hidden: torch.Tensor) -> None:
        for i, seq in enumerate(seqs):
            self._hidden[seq.seq_id] = (num_tokens[i], hidden[i])

    def forget(self, seq_id: str) -> None:
        self._hidden.pop(seq_id, None)

    def max_drafts(self, k: int) -> int:
        return k if self.tree_size is None else build_tree(k, self.tree_size).num_nodes

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[DraftRun]:
        ready = [i for i, seq in enumerate(seqs)
                 if self._hidden.get(seq.seq_id, (-1,))[0] == seq.num_tokens]
        runs = [DraftRun([]) for _ in seqs]
        if not ready:
            return runs
        hidden = torch.stack([self._hidden[seqs[i].seq_id][1] for i in ready])
        k = max(max_tokens[i] for i in ready)
        width = 1 if self.tree_size is None else max(
            build_tree(max_tokens[i], self.tree_size).width for i in ready)
        # [ready, head, width]: each head's top candidates, best first.
        top = torch.stack([head(hidden).topk(width, dim=-1).indices for head in self.heads[:k]],
                          dim=1).tolist()
        for row, i in enumerate(ready):
            if self.tree_size is None or not seqs[i].params.greedy:
                runs[i] = DraftRun([head[0] for head in top[row][: max_tokens[i]]])
                continue
            tree = build_tree(max_tokens[i], self.tree_size)
            runs[i] = DraftRun([top[row][len(path) - 1][path[-1]] for path in tree.paths],
                               parents=list(tree.parents))
        return runs
