"""Model presets: `--dummy-config llama3-8b` names a shipped config.json of real shapes."""

from pathlib import Path

from workers.model.config import ModelConfig
from workers.model.presets import load_preset, preset_names, resolve_config_path


def test_llama3_8b_preset_resolves_to_a_config_with_its_real_shapes(tmp_path):
    assert "llama3-8b" in preset_names()
    path = resolve_config_path("llama3-8b")
    cfg = ModelConfig.from_path(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.vocab_size) == (
        32, 4096, 8, 128256)
    assert load_preset("llama3-8b")["rope_scaling"]["rope_type"] == "llama3"
    own = tmp_path / "config.json"
    own.write_text("{}")
    assert resolve_config_path(str(own)) == str(own)  # a path is used as given
    assert Path(path).name == "llama3-8b.json"
