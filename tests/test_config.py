"""Reading config.json: official Hub files, transformers-5 re-saved files, and clear errors for what we don't run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyqwen.config import CONFIG_DIR, config_from_dict, load_config, load_generation_config
from tinyqwen.errors import ConfigError

CONFIGS = Path(__file__).parent / "fixtures" / "configs"  # the fixtures' configs, re-saves, invalid ones

QWEN3_06B = {  # the published Qwen3-0.6B values (the real file is tinyqwen/data/configs too)
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 40960,
    "tie_word_embeddings": True, "sliding_window": None, "use_sliding_window": False, "hidden_act": "silu",
}  # fmt: skip
MOE = dict(
    QWEN3_06B, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
)  # fmt: skip


def test_official_dense_config():
    c = config_from_dict(QWEN3_06B)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (1024, 16, 8, 128)
    assert c.q_size == 2048 != c.hidden_size  # head_dim is decoupled from hidden / heads
    assert c.rope_theta == 1e6 and c.rope_scaling is None and c.tie_word_embeddings and not c.is_moe


def test_head_dim_defaults_to_hidden_over_heads():
    d = dict(QWEN3_06B)
    del d["head_dim"]
    assert config_from_dict(d).head_dim == 1024 // 16


def test_moe_layers_follow_sparse_step_and_mlp_only_layers():
    c = config_from_dict(dict(MOE, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3]))
    assert [c.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    c = config_from_dict(dict(MOE, num_hidden_layers=3))
    assert [c.is_moe_layer(i) for i in range(3)] == [True, True, True]


def test_yarn_official_and_transformers5_spellings_agree():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    old = config_from_dict(dict(QWEN3_06B, rope_scaling=yarn, max_position_embeddings=131072))
    new_dict = dict(QWEN3_06B, max_position_embeddings=131072, rope_parameters=dict(yarn, rope_theta=1000000))
    del new_dict["rope_theta"], new_dict["rope_scaling"]
    new = config_from_dict(new_dict)
    assert old.rope_scaling == new.rope_scaling and old.rope_theta == new.rope_theta == 1e6
    assert old.rope_scaling.factor == 4.0 and old.rope_scaling.original_max_position_embeddings == 32768
    # the pre-"rope_type" spelling {"type": "yarn"} of older files
    legacy = dict(yarn)
    legacy["type"] = legacy.pop("rope_type")
    assert config_from_dict(dict(QWEN3_06B, rope_scaling=legacy)).rope_scaling.factor == 4.0


def test_num_local_experts_spelling():
    d = dict(MOE)
    d["num_local_experts"] = d.pop("num_experts")
    assert config_from_dict(d).num_experts == 8


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope type 'longrope'"),
        ({"rope_scaling": {"rope_type": "yarn"}}, "factor"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"hidden_size": "1024"}, "'hidden_size' must be int"),
        ({"num_hidden_layers": True}, "'num_hidden_layers' must be int"),
        ({"num_attention_heads": 0}, "must be positive"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"head_dim": 7}, "even"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_or_broken_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config_from_dict(dict(QWEN3_06B, **change))


def test_moe_config_errors():
    d = dict(MOE)
    del d["num_experts"]
    with pytest.raises(ConfigError, match="num_experts"):
        config_from_dict(d)
    with pytest.raises(ConfigError, match="exceeds num_experts"):
        config_from_dict(dict(MOE, num_experts_per_tok=9))


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)
    assert load_generation_config(tmp_path) == {}


def _config_files():
    """Every stored config: the shipped official files and the test fixtures' (re-saves and invalid ones too)."""
    return sorted(CONFIG_DIR.glob("*.json")) + (sorted(CONFIGS.glob("*.json")) if CONFIGS.is_dir() else [])


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
def test_config_fixture_files(path):
    """Every stored config either loads, or (files named invalid-*) fails with a ConfigError."""
    if path.name.startswith("invalid"):
        with pytest.raises(ConfigError):
            load_config(path)
    else:
        c = load_config(path)
        raw = json.loads(path.read_text())
        assert c.hidden_size == raw["hidden_size"] and c.num_hidden_layers == raw["num_hidden_layers"]
