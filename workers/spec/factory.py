"""Builds an engine's SpeculativeDecoder from its EngineConfig (or None where it does not
speculate).

Only colocated and decode-role engines speculate; a prefill-role engine ends each request
after its first token, so it loads no proposer. Under disaggregation the decode worker
speculates from its first decode step: the n-gram proposer needs only the tokens (the
prompt arrives with the request), and the draft model prefills itself on the decode worker
the first time it proposes for a sequence (workers/spec/draft_model.py). We chose that over
shipping draft KV from the prefill worker: no draft on prefill workers, no second KV layout
in the transfer plan or the handshake, and the draft's prefill of a prompt costs about
(draft params / target params) of the target's prefill on the decode worker, once per
request (workers/bench/bench_spec.py measures it beside a target decode step).
"""

from __future__ import annotations

from workers.config import EngineConfig
from workers.engine.block_pool import BlockPool
from workers.engine.model_runner import ModelRunner
from workers.spec.decoder import SpeculativeDecoder, check_speculative_config
from workers.spec.proposer import Proposer
from workers.text.tokenizer import Tokenizer


def build_speculative_decoder(
    config: EngineConfig, runner: ModelRunner, pool: BlockPool, max_model_len: int,
    tokenizer: Tokenizer | None,
) -> SpeculativeDecoder | None:
    spec = config.speculative
    check_speculative_config(spec)
    if spec.method is None or config.role == "prefill":
        return None
    return SpeculativeDecoder(spec, _proposer(config, runner, tokenizer), pool, max_model_len,
                              pad_to_k=runner.verify_graph_runner is not None,
                              kv_caches=runner.kv_caches)


def _proposer(config: EngineConfig, runner: ModelRunner, tokenizer: Tokenizer | None
              ) -> Proposer:
    spec = config.speculative
    if spec.method == "ngram":
        from workers.spec.ngram import NgramProposer

        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "draft":
        from workers.spec.draft_model import DraftModelProposer
        from workers.text.request_text import load_tokenizer

        draft_tokenizer = load_tokenizer(
            EngineConfig(model=spec.draft_model)) if tokenizer is not None else None
        return DraftModelProposer(config, runner, tokenizer, draft_tokenizer)
    from workers.spec.medusa import MedusaProposer

    return MedusaProposer(config, runner)
