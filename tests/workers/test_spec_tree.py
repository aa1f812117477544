"""Medusa tree verification: static trees hold the top chain, a tree run's positions and
masks are its depths and ancestors, the greedy tree walk keeps the longest path plain
greedy decoding takes (never shorter than the chain's), and in the engine greedy output with
a tree equals output without speculation and transformers, with the accepted path's KV
compacted into place and every block free after aborts mid-verification."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.workers.test_spec_engine import NUM_NEW, greedy, repetitive_prompts
from workers.engine.sampler import Sampler, SamplingRow
from workers.engine.sampling_params import SamplingParams
from workers.spec.proposer import DraftRun
from workers.spec.rejection import verify
from workers.spec.tree import ancestor_masks, build_tree, path_to, tree_positions

VOCAB = 32


@pytest.mark.parametrize(("depth", "size"), [(1, 1), (1, 7), (3, 3), (3, 7), (4, 6), (7, 7)])
def test_static_tree_holds_the_chain_and_parents_come_first(depth, size):
    tree = build_tree(depth, size)
    assert tree.paths[:depth] == tuple((0,) * d for d in range(1, depth + 1))
    assert depth <= tree.num_nodes <= size and max(map(len, tree.paths)) == depth
    for j, (path, parent) in enumerate(zip(tree.paths, tree.parents, strict=True)):
        assert parent < j
        assert (tree.paths[parent] if parent >= 0 else ()) == path[:-1]


def test_tree_positions_masks_and_paths():
    parents = [-1, 0, -1, 1, 2]  # (0,), (0, 0), (1,), (0, 0, 0), (1, 0)
    assert tree_positions(10, parents) == [10, 11, 12, 11, 13, 12]
    assert ancestor_masks(parents) == [0b1, 0b11, 0b111, 0b1001, 0b10111, 0b101001]
    assert path_to(parents, 3) == [0, 1, 3] and path_to(parents, 4) == [2, 4]
    assert path_to(parents, -1) == []


def one_hot_logits(tokens: list[int]) -> torch.Tensor:
    logits = torch.randn(len(tokens), VOCAB) * 0.1
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return logits


def greedy_rows(n: int) -> list[SamplingRow]:
    params = SamplingParams(temperature=0, max_tokens=16)
    return [SamplingRow(params, [], []) for _ in range(n)]


def test_tree_walk_accepts_a_path_the_chain_misses():
    """Tree (0,), (0, 0), (1,), (1, 0): the target follows the second candidate then its
    child, so the chain accepts nothing and the tree two tokens plus the bonus."""
    parents, tokens = [-1, 0, -1, 2], [5, 6, 7, 8]
    # Rows: root, node 0, node 1, node 2, node 3; the target's argmax in each.
    logits = one_hot_logits([7, 1, 2, 8, 9])
    sampler = Sampler("cpu", seed=0)
    result = verify(sampler, logits, greedy_rows(5), [DraftRun(tokens, parents=parents)])
    assert result.token_ids == [[7, 8, 9]] and result.num_accepted == [2]
    assert result.rows == [[0, 3, 4]]
    chain = verify(sampler, one_hot_logits([7, 1, 2]), greedy_rows(3), [DraftRun([5, 6])])
    assert chain.num_accepted == [0] and chain.token_ids == [[7]]


def test_tree_accepts_at_least_the_chain_on_random_targets():
    """The tree holds the chain: over random targets and candidates it never accepts less,
    and its emitted tokens are a greedy continuation (each the argmax after the previous)."""
    rng = random.Random(0)
    sampler = Sampler("cpu", seed=0)
    more = 0
    for _ in range(200):
        tree = build_tree(3, 7)
        top = [[rng.randrange(4) for _ in range(tree.width)] for _ in range(3)]
        tokens = [top[len(p) - 1][p[-1]] for p in tree.paths]
        # A deterministic target: the next token is a function of the previous one.
        table = [rng.randrange(4) for _ in range(VOCAB)]

        def target(prefix: list[int], table=table) -> int:
            return table[prefix[-1]]

        rows = [[1], *([1, *(tokens[j] for j in path_to(list(tree.parents), n))]
                       for n in range(tree.num_nodes))]
        logits = one_hot_logits([target(r) for r in rows])
        result = verify(sampler, logits, greedy_rows(len(rows)),
                        [DraftRun(tokens, parents=list(tree.parents))])
        chain_rows = rows[:4]
        chain = verify(sampler, one_hot_logits([target(r) for r in chain_rows]),
                       greedy_rows(4), [DraftRun(tokens[:3])])
        assert result.num_accepted[0] >= chain.num_accepted[0]
        more += result.num_accepted[0] > chain.num_accepted[0]
        out = result.token_ids[0]
        for i, token in enumerate(out):
            assert token == target([1, *out[:i]])
    assert more > 0


@pytest.fixture(scope="session")
def echo_medusa_dir(tmp_path_factory, tiny_model_dir):
    """Medusa heads that accept sometimes on the tiny model: zero residual blocks and the
    target's own LM head, so every head proposes the target's top-k for the current position
    (the random tiny model often repeats tokens; the tree also offers its second choices)."""
    from safetensors.torch import load_file, save_file

    from workers.spec.medusa import WEIGHTS_FILE, make_random_medusa

    config = json.loads((tiny_model_dir / "config.json").read_text())
    folder = make_random_medusa(tmp_path_factory.mktemp("echo-medusa"), config["hidden_size"],
                                config["vocab_size"], num_heads=4)
    target = {}
    for path in tiny_model_dir.glob("*.safetensors"):
        target.update(load_file(str(path)))
    heads = load_file(str(folder / WEIGHTS_FILE))
    for name in heads:
        heads[name] = (target["lm_head.weight"].clone() if name.endswith(".1.weight")
                       else torch.zeros_like(heads[name]))
    save_file(heads, str(folder / WEIGHTS_FILE))
    return folder


def record_accepted_rows(engine) -> list[list[int]]:
    """The accepted rows of every verified run from now on (verification still runs)."""
    paths: list[list[int]] = []
    verify_runs = engine.spec.verify

    def recording(*args, **kwargs):
        result = verify_runs(*args, **kwargs)
        paths.extend(result.rows)
        return result

    engine.spec.verify = recording
    return paths


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_greedy_with_a_medusa_tree_equals_without_and_transformers(
    backend, spec_engine, echo_medusa_dir, medusa_dir, tiny_model_dir, hf_greedy
):
    """Mixed per-request K (0..3), chunked prefill; random heads and heads that accept,
    some of them off the top chain (so accepted KV was moved into place); the Triton backend
    runs the tree-masked paged decode kernel (interpreted on CPU)."""
    prompts = repetitive_prompts(8 if backend == "torch" else 3, seed=31)
    num_new = 2 * NUM_NEW
    params = [SamplingParams(max_tokens=num_new, min_tokens=num_new, temperature=0,
                             num_speculative_tokens=i % 4 if i % 3 else None)
              for i in range(len(prompts))]
    expected = hf_greedy(tiny_model_dir, prompts, num_new)
    for heads in (medusa_dir, echo_medusa_dir):
        engine = spec_engine("medusa", 3, heads, medusa_tree="tree", attention_backend=backend,
                             long_prefill_token_threshold=7)
        paths = record_accepted_rows(engine)
        assert [o.token_ids for o in engine.generate(prompts, params)] == expected
        assert engine.spec.totals.num_drafts >= len(prompts)
    assert any(path != list(range(len(path))) for path in paths)


def test_tree_accepts_at_least_the_chain_with_the_same_heads(spec_engine, echo_medusa_dir):
    prompts = repetitive_prompts(8, seed=31)
    accepted = {}
    for mode in ("chain", "tree"):
        engine = spec_engine("medusa", 3, echo_medusa_dir, medusa_tree=mode)
        engine.generate(prompts, greedy())
        accepted[mode] = engine.spec.totals.num_accepted_tokens
    assert accepted["tree"] >= accepted["chain"] > 0, accepted


def test_aborts_in_the_middle_of_tree_verification_free_every_block(spec_engine,
                                                                      echo_medusa_dir):
    engine = spec_engine("medusa", 3, echo_medusa_dir, medusa_tree="tree", num_blocks=128)
    prompts = repetitive_prompts(10, seed=37)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy())
    for _ in range(3):
        engine.step()
    engine.spec.propose(engine.scheduler.running)  # trees proposed, their slots taken
    assert any(seq.spec_tree for seq in engine.scheduler.running)
    for i in range(0, 10, 2):
        engine.abort(f"r{i}")
    engine.step()
    engine.spec.propose(engine.scheduler.running)
    for i in range(1, 10, 2):
        engine.abort(f"r{i}")
    assert not engine.has_unfinished()
    assert engine.num_free_blocks == engine.num_total_blocks


def test_sampling_requests_keep_the_chain_under_a_tree(spec_engine, echo_medusa_dir):
    """Temperature > 0 falls back to the top chain (exact rejection sampling); greedy
    requests in the same steps get trees. Seeded sampled outputs equal chain mode's."""
    prompts = repetitive_prompts(6, seed=41)
    params = [greedy() if i % 2 else SamplingParams(max_tokens=NUM_NEW, temperature=0.8,
                                                    seed=i, ignore_eos=True)
              for i in range(6)]
    outs = {}
    for mode in ("chain", "tree"):
        engine = spec_engine("medusa", 3, echo_medusa_dir, medusa_tree=mode)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params[i])
        finals, trees = {}, {}
        while engine.has_unfinished():
            engine.spec.propose(engine.scheduler.running)
            for seq in engine.scheduler.running:
                if seq.spec_token_ids:
                    trees.setdefault(seq.seq_id, set()).add(bool(seq.spec_tree))
            finals.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        outs[mode] = finals
        for rid, kinds in trees.items():
            greedy_request = int(rid[1:]) % 2 == 1
            assert kinds == {mode == "tree" and greedy_request}, (mode, rid, kinds)
    assert outs["tree"] == outs["chain"]


@pytest.mark.gpu
def test_medusa_tree_on_cuda_with_triton_equals_transformers(tiny_model_dir, echo_medusa_dir,
                                                             hf_greedy):
    """Tree steps run eagerly (the verify graphs hold no tree mask) beside graphed decode
    steps; the Triton kernel compiled for real."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from workers.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
    from workers.engine.engine import LLMEngine

    prompts = repetitive_prompts(6, seed=43)
    engine = LLMEngine(EngineConfig(
        model=str(tiny_model_dir), dtype="float32", device="cuda", attention_backend="triton",
        cache=CacheConfig(block_size=16, num_blocks=128),
        scheduler=SchedulerConfig(max_num_seqs=8),
        speculative=SpeculativeConfig("medusa", 3, str(echo_medusa_dir), medusa_tree="tree")))
    outs = [o.token_ids for o in engine.generate(prompts, greedy())]
    assert outs == hf_greedy(tiny_model_dir, prompts, NUM_NEW)
    assert engine.num_free_blocks == engine.num_total_blocks


def test_medusa_tree_on_a_decode_worker_equals_transformers(spec_engine, echo_medusa_dir,
                                                            tiny_model_dir, hf_greedy):
    """1P+1D in one process: the decode worker proposes trees from its second step on (the
    prompt's hidden state stayed on the prefill worker) and gives transformers' tokens."""
    from tests.workers.test_engine_disagg import decode_to_end, hand_over

    prompts = repetitive_prompts(6, seed=47)
    ids = [f"r{i}" for i in range(len(prompts))]
    prefill = spec_engine("medusa", 3, echo_medusa_dir, role="prefill", medusa_tree="tree")
    decode = spec_engine("medusa", 3, echo_medusa_dir, role="decode", medusa_tree="tree")
    paths = record_accepted_rows(decode)
    dest = {rid: decode.reserve_remote(rid, p, greedy()) for rid, p in zip(ids, prompts,
                                                                          strict=True)}
    for rid, prompt in zip(ids, prompts, strict=True):
        prefill.add_request(rid, prompt, greedy())
    hand_over(prefill, decode, dest)
    finals = decode_to_end(decode)
    assert [finals[rid].token_ids for rid in ids] == hf_greedy(tiny_model_dir, prompts, NUM_NEW)
    assert decode.spec.totals.num_drafts > 0 and paths
