"""Tokenizer against transformers' tokenizer on the same files; chat template; streaming
detokenization that never splits a multi-byte character; deterministic tiny-model files."""

from __future__ import annotations

import json

import pytest

from workers.errors import InvalidParameter
from workers.model.tiny_model import IM_END, make_tiny_model
from workers.text.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \U0001f642 and \u00e5",
    "  leading spaces, tabs\tand\nnewlines ",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi \u00e9"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_match_transformers(text, tokenizer, hf_tokenizer):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(add_generation_prompt, tokenizer, hf_tokenizer):
    ours = tokenizer.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_template_errors_are_typed(tiny_model_dir, tmp_path):
    for file in tiny_model_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('roles must alternate') }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidParameter, match="roles must alternate"):
        Tokenizer(tmp_path).apply_chat_template(CHAT)


def test_eos_ids_come_from_generation_config_list_and_eos_token(tokenizer):
    assert set(tokenizer.eos_token_ids) == {1, IM_END}


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_streams_whole_characters(text, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    generated = tokenizer.encode(text, add_special_tokens=False) + [IM_END]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add([token]) for token in generated] + [detok.flush()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(generated)


def test_multibyte_character_split_across_tokens_is_held_back(tokenizer):
    emoji = tokenizer.encode("\U0001f642", add_special_tokens=False)
    assert len(emoji) > 1, "the emoji should span several byte tokens"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add([t]) for t in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert detok.add(emoji[-1:]) == "\U0001f642"


def test_tiny_model_files_are_deterministic(tmp_path):
    first = make_tiny_model(tmp_path / "a", seed=3)
    second = make_tiny_model(tmp_path / "b", seed=3)
    other = make_tiny_model(tmp_path / "c", seed=4)
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_streamed_text_continues_the_prompt_with_a_metaspace_tokenizer(tmp_path):
    """SentencePiece-style decoders drop the first token's leading space; streaming with the
    prompt as context must keep it, so prompt text + deltas == decode(prompt + generated)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from workers.model.tiny_model import CORPUS

    raw = HFTokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    raw.train_from_iterator(CORPUS.splitlines(), trainer)
    raw.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path)
    prompt = tokenizer.encode("Once upon a time")
    generated = tokenizer.encode(" there was a little robot", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join([detok.add([token]) for token in generated] + [detok.flush()])
    assert tokenizer.decode(prompt) + streamed == tokenizer.decode(prompt + generated)
    assert streamed.startswith(" there")


def test_transformers5_layout_chat_template_file_and_added_token_dicts(tiny_model_dir, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    config = {
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": {"content": "<|im_end|>", "special": True},
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.bos_token_id == 0 and IM_END in tokenizer.eos_token_ids
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi"
