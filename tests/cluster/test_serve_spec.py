"""kvrelay serve's speculative flags reach every worker's EngineConfig; bad ones fail before
anything starts, naming the field."""

from __future__ import annotations

import pytest

from cluster.serve import build_config, parse_args
from workers.errors import InvalidParameter


def config_of(tiny_model_dir, *flags: str):
    return build_config(parse_args(["--model", str(tiny_model_dir), *flags]))


def test_speculative_flags_reach_the_engine_config(tiny_model_dir):
    spec = config_of(tiny_model_dir, "--speculative", "draft", "--num-speculative-tokens",
                     "4", "--draft-model", str(tiny_model_dir)).engine.speculative
    assert (spec.method, spec.num_speculative_tokens, spec.draft_model) == \
        ("draft", 4, str(tiny_model_dir))
    assert config_of(tiny_model_dir).engine.speculative.method is None
    assert spec.medusa_tree == "chain"
    medusa = config_of(tiny_model_dir, "--speculative", "medusa", "--num-speculative-tokens",
                       "3", "--draft-model", "heads", "--medusa-tree", "tree").engine.speculative
    assert (medusa.method, medusa.medusa_tree) == ("medusa", "tree")


@pytest.mark.parametrize(("flags", "field"), [
    (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
    (["--speculative", "ngram", "--num-speculative-tokens", "8"], "num_speculative_tokens"),
    (["--speculative", "draft", "--num-speculative-tokens", "3"], "draft_model"),
    (["--speculative", "ngram", "--num-speculative-tokens", "3", "--medusa-tree", "tree"],
     "medusa_tree"),
])
def test_bad_speculative_flags_fail_naming_the_field(tiny_model_dir, flags, field):
    with pytest.raises(InvalidParameter) as err:
        config_of(tiny_model_dir, *flags)
    assert err.value.field == field
