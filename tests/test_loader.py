"""Loading a checkpoint directory: every way it can be broken gives a tinyqwen error naming the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tinyqwen
from tinyqwen.config import count_parameters, expected_tensors
from tinyqwen.errors import BackendError, CheckpointError, ConfigError, GenerationError, TinyQwenError
from tinyqwen.safetensors import load_file, save_file

FIXTURES = Path(__file__).parent / "fixtures"
DENSE = FIXTURES / "dense-tied"


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the tied dense fixture."""
    dst = tmp_path / "ckpt"
    shutil.copytree(DENSE, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        tinyqwen.load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        tinyqwen.load_model(tmp_path / "file")


def test_home_is_expanded(ckpt, monkeypatch):
    monkeypatch.setenv("HOME", str(ckpt.parent))
    model = tinyqwen.load_model("~/ckpt")
    assert model.path == ckpt and model.config.vocab_size == 512
    assert tinyqwen.load_config("~/ckpt").vocab_size == 512


def test_a_hub_id_is_found_in_the_hugging_face_cache_as_the_cli_finds_it(ckpt, tmp_path, monkeypatch):
    repo = tmp_path / "cache" / "models--Tiny--Qwen3"
    (repo / "snapshots").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(ckpt, repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tinyqwen.load_model("Tiny/Qwen3")
    assert model.path == repo / "snapshots" / "0123abcd"
    np.testing.assert_array_equal(model(np.array([1, 2, 3])), tinyqwen.load_model(ckpt)(np.array([1, 2, 3])))
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        tinyqwen.load_model("Tiny/Other")
    monkeypatch.chdir(tmp_path)  # a local folder of that name wins over the cache
    shutil.copytree(ckpt, tmp_path / "Tiny" / "Other")
    assert tinyqwen.load_model("Tiny/Other").path == Path("Tiny/Other")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        tinyqwen.load_model(ckpt)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        tinyqwen.load_model(ckpt)


def test_missing_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight.*missing"):
        tinyqwen.load_model(ckpt)


def test_wrong_shape_names_key_expected_and_got(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = w[:-1]
    save_file(tensors, ckpt / "model.safetensors")
    expected = list(w.shape)
    got = [w.shape[0] - 1, w.shape[1]]
    with pytest.raises(
        CheckpointError, match=rf"up_proj.*{got}.*{expected}".replace("[", r"\[").replace("]", r"\]")
    ):
        tinyqwen.load_model(ckpt)


def test_unexpected_tensor_is_named(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.extra.weight"):
        tinyqwen.load_model(ckpt)


def test_truncated_weights_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        tinyqwen.load_model(ckpt)


def test_config_that_does_not_fit_the_weights(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"model.layers.{cfg['num_hidden_layers'] - 1}.*missing"):
        tinyqwen.load_model(ckpt)


def test_unknown_backend():
    with pytest.raises(BackendError, match="unknown backend 'tpu'"):
        tinyqwen.load_model(DENSE, backend="tpu")


def test_loading_does_not_modify_the_checkpoint(ckpt):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    model = tinyqwen.load_model(ckpt)
    model(np.array([1, 2, 3]))
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


def test_bad_ids_are_clear_errors():
    model = tinyqwen.load_model(DENSE)
    v = model.config.vocab_size
    with pytest.raises(GenerationError, match=f"token id {v} is outside.*{v}"):
        model(np.array([1, v]))
    with pytest.raises(GenerationError, match="integers"):
        model(np.array([1.5, 2.0]))
    with pytest.raises(GenerationError, match="shape"):
        model(np.zeros((1, 1, 2), np.int64))
    with pytest.raises(GenerationError, match="positions must be"):
        model.forward(np.array([[1, 2]]), positions=np.array([[0, 1, 2]]))
    with pytest.raises(GenerationError, match="attention_mask must have shape"):
        model.forward(np.array([[1, 2]]), attention_mask=np.ones((1, 3)))
    with pytest.raises(GenerationError, match="context"):
        model(np.zeros(model.config.max_position_embeddings + 1, np.int64))
    assert all(issubclass(e, TinyQwenError) for e in (GenerationError, CheckpointError, ConfigError))


def test_expected_tensors_and_parameter_count_by_hand():
    cfg = tinyqwen.load_config(DENSE)
    names = expected_tensors(cfg)
    # per layer: 2 norms + 4 projections + 2 qk-norms + 3 mlp = 11; plus embed and final norm; tied: no lm_head
    assert len(names) == 11 * cfg.num_hidden_layers + 2
    assert "lm_head.weight" not in names
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    per_layer = (
        2 * h + (cfg.q_size + 2 * cfg.kv_size) * h + h * cfg.q_size + 2 * d + 3 * h * cfg.intermediate_size
    )
    assert count_parameters(cfg) == cfg.vocab_size * h + L * per_layer + h


def test_multi_shard_checkpoint_shows_loading_progress(capsys):
    tinyqwen.load_model(FIXTURES / "dense-untied-bf16-sharded")
    assert "loading layers" in capsys.readouterr().err  # tqdm, on stderr
    tinyqwen.load_model(DENSE)  # one file: quiet by default
    assert "loading layers" not in capsys.readouterr().err
