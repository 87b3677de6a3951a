"""The trainer: AdamW, schedule, clipping, accumulation, checkpoints (HF layout, resume), corpus, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import tinyqwen
from tinyqwen import corpus, grad, train
from tinyqwen.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures"

TINY = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    "vocab_size": 300, "max_position_embeddings": 64,
}  # fmt: skip


def tiny_config(tmp_path, **kw) -> train.TrainConfig:
    settings = dict(out_dir=str(tmp_path / "run"), model=TINY, docs=600, seq_len=16, batch_size=4, steps=6,
                    warmup=2, eval_every=3, eval_batches=1, progress=False)  # fmt: skip
    return train.TrainConfig.from_dict(settings | kw)


def test_adamw_one_step_by_hand():
    # step 1: m = (1-b1) g, v = (1-b2) g², bias-corrected m̂ = g, v̂ = g², so the step is lr · g/(|g| + eps) = lr·sign
    # (g); decoupled decay first multiplies the matrix by (1 - lr·wd); the 1-D weight is not decayed
    p = {"w": np.array([[1.0, -2.0]], np.float32), "n": np.array([1.0], np.float32)}
    g = {"w": np.array([[0.5, -3.0]], np.float32), "n": np.array([2.0], np.float32)}
    opt = train.AdamW(betas=(0.9, 0.99), eps=0.0, weight_decay=0.5)
    opt.update(p, g, lr=0.1)
    np.testing.assert_allclose(p["w"], [[1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1]], rtol=1e-6)
    np.testing.assert_allclose(p["n"], [0.9], rtol=1e-6)
    # step 2 with the same gradient: m̂ and v̂ are again g and g² (the bias corrections undo the zero start)
    opt.update(p, g, lr=0.1)
    np.testing.assert_allclose(p["n"], [0.8], rtol=1e-6)


def test_schedule_and_clipping():
    c = train.TrainConfig(lr=1.0, min_lr=0.1, warmup=4, steps=14)
    assert train.learning_rate(2, c) == pytest.approx(0.5)
    assert train.learning_rate(4, c) == pytest.approx(1.0)
    assert train.learning_rate(9, c) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert train.learning_rate(14, c) == pytest.approx(0.1)
    g = {"a": np.array([3.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert train.clip_gradients(g, 1.0) == pytest.approx(5.0)
    assert train.global_norm(g) == pytest.approx(1.0, rel=1e-6)
    g = {"a": np.array([0.3], np.float32)}
    assert train.clip_gradients(g, 1.0) == pytest.approx(0.3, rel=1e-6) and g["a"][0] == np.float32(0.3)


def test_gradient_accumulation_equals_the_big_batch():
    # two half batches with grad_scale 1/2 add up to the gradient of the whole batch (equal target counts per
    # row; dense model, so no aux loss, which pools its statistics over the batch it sees)
    m = tinyqwen.load_model(FIXTURES / "dense-tied")
    w = grad.copy_weights(m.weights, np.float64)
    ids = np.random.default_rng(0).integers(0, 512, size=(4, 8))
    whole = grad.named_parameters(grad.loss_and_grads(m.config, w, ids).grads)
    acc = grad.loss_and_grads(m.config, w, ids[:2], grad_scale=0.5).grads
    acc = grad.loss_and_grads(m.config, w, ids[2:], grads=acc, grad_scale=0.5).grads
    for name, a in grad.named_parameters(acc).items():
        np.testing.assert_allclose(a, whole[name], rtol=1e-10, atol=1e-13, err_msg=name)


def test_training_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, steps=30, lr=1e-2, eval_every=10)
    threads = train.limit_blas_threads(3)  # training runs BLAS on 1 thread, then restores what it found
    summary = train.train(cfg)
    if threads is not None:
        assert train.limit_blas_threads(threads) == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if e["kind"] == "step"]
    assert steps[-1]["ce"] < steps[0]["ce"] - 1.0  # from ~ln(300) = 5.7 down
    assert len(steps[0]["expert_load"]) == 2 and sum(steps[0]["expert_load"][0]) == pytest.approx(1, abs=1e-3)
    ckpt = Path(summary["checkpoint"])
    model = tinyqwen.load_model(ckpt)  # the official layout: one tensor per expert, config.json
    assert model.config.is_moe and model.config.num_experts == 4
    names = set(tinyqwen.safetensors.load_file(ckpt / "model.safetensors"))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    tok = tinyqwen.Tokenizer.from_pretrained(ckpt)
    ids = tok.encode("12 + 3 = 15")
    assert tok.decode(ids) == "12 + 3 = 15"
    # the checkpoint's logits are what the training forward computes
    _, _, w, _, _ = train.load_checkpoint(ckpt)
    r = grad.loss_and_grads(model.config, w, np.array([ids]), keep_logits=True, forward_only=True)
    np.testing.assert_array_equal(model(ids), r.logits[0])


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = train.train(tiny_config(tmp_path / "a", steps=6))
    train.train(tiny_config(tmp_path / "b", steps=6), stop_after=3)  # "interrupted" after step 3
    resumed = train.train(tiny_config(tmp_path / "b", steps=6), resume=tmp_path / "b" / "run" / "checkpoint")
    a = tinyqwen.safetensors.load_file(Path(straight["checkpoint"]) / "model.safetensors")
    b = tinyqwen.safetensors.load_file(Path(resumed["checkpoint"]) / "model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed["val_loss"] == straight["val_loss"]


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(tmp_path, monkeypatch):
    # checkpoints every 2 steps by default-style saving; the run dies in step 6 (after the step-4 checkpoint and the step-5 log line), and
    # resuming from that checkpoint ends with the weights and the log of a run that was never interrupted
    assert train.TrainConfig().save_every > 0  # periodic checkpoints are on unless a config turns them off
    straight = train.train(tiny_config(tmp_path / "a", steps=6, save_every=2, log_every=1))
    real_lr = train.learning_rate

    def dies_in_step_6(step, cfg):
        if step == 6:
            raise KeyboardInterrupt
        return real_lr(step, cfg)

    monkeypatch.setattr(train, "learning_rate", dies_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_config(tmp_path / "b", steps=6, save_every=2, log_every=1))
    monkeypatch.setattr(train, "learning_rate", real_lr)
    ckpt = tmp_path / "b" / "run" / "checkpoint"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    assert not (tmp_path / "b" / "run" / "checkpoint.partial").exists()
    resumed = train.train(tiny_config(tmp_path / "b", steps=6, save_every=2, log_every=1), resume=ckpt)
    a = tinyqwen.safetensors.load_file(Path(straight["checkpoint"]) / "model.safetensors")
    b = tinyqwen.safetensors.load_file(Path(resumed["checkpoint"]) / "model.safetensors")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    def steps(run):
        lines = (tmp_path / run / "run" / "log.jsonl").read_text().splitlines()
        return [(e["step"], e["ce"]) for e in map(json.loads, lines) if e["kind"] == "step"]

    assert steps("b") == steps("a")  # each step once, with the same loss


def test_sample_batch_reaches_every_window():
    tokens = np.arange(10)
    starts = {
        int(row[0]) for step in range(200) for row in train.sample_batch(tokens, 4, 8, seed=0, step=step)
    }
    assert starts == {0, 1, 2}  # the last window, tokens[2:10], included
    np.testing.assert_array_equal(
        train.sample_batch(tokens, 2, 10, 0, 0), [tokens, tokens]
    )  # exactly one window
    with pytest.raises(train.TrainError, match="9 tokens cannot fill one window of seq_len 10"):
        train.sample_batch(tokens[:9], 2, 10, 0, 0)


def test_corpus_is_deterministic_and_bpe_roundtrips(tmp_path):
    assert corpus.synthetic_documents(50, seed=3) == corpus.synthetic_documents(50, seed=3)
    assert {t for t, _ in corpus.synthetic_documents(200)} == set(corpus.TASKS)
    data = corpus.build_dataset(300, 0, 300, 0.1, tmp_path / "tok")
    tok = tinyqwen.Tokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300 and tok.eos_token_id == 297
    text = tok.decode(data["val"].tolist())
    assert text.count("<|endoftext|>") == 30
    assert len(data["val"]) < 0.6 * len(text)  # only 41 merges here, and they already compress
    base = corpus.unigram_loss(data["train"], data["val"], 300)
    assert 2.0 < base < math.log(300)


def test_cli_train_and_bad_configs(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"out_dir": str(tmp_path / "out"), "model": TINY, "docs": 300, "seq_len": 16,
                                "batch_size": 2, "steps": 2, "eval_batches": 1}))  # fmt: skip
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    assert "validation loss" in capsys.readouterr().out
    path.write_text(json.dumps({"stepz": 3}))
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown setting 'stepz'" in err
    path.write_text("{nope")
    assert main(["train", "--config", str(path)]) == 1
    assert "not a valid JSON file" in capsys.readouterr().err
    path.write_text(json.dumps({"steps": 0}))
    assert main(["train", "--config", str(path)]) == 1
    assert "steps must be a positive integer" in capsys.readouterr().err
    path.write_text(json.dumps({"aux_loss_scope": "expert"}))
    assert main(["train", "--config", str(path)]) == 1
    assert "aux_loss_scope must be one of global, layer" in capsys.readouterr().err


def test_aux_loss_scope_reaches_the_loss(tmp_path):
    # the same two steps with the two scopes: the run records its scope and the logged aux values differ (TINY
    # has two MoE layers, whose routing the pooled loss mixes and the per-layer one does not)
    logs = {}
    for scope in ("global", "layer"):
        cfg = train.TrainConfig(out_dir=str(tmp_path / scope), model=TINY, docs=300, seq_len=16, batch_size=2, steps=2,
                          eval_batches=1, progress=False, aux_coef=0.1, aux_loss_scope=scope)  # fmt: skip
        train.train(cfg)
        lines = [json.loads(x) for x in (tmp_path / scope / "log.jsonl").read_text().splitlines()]
        assert lines[0]["aux_loss_scope"] == scope
        logs[scope] = [e["aux"] for e in lines if e["kind"] == "step"]
    assert abs(logs["layer"][0] - logs["global"][0]) > 1e-4


def test_generate_on_a_trained_base_model_feeds_the_prompt_as_written(tmp_path, capsys):
    # the trained tokenizer has <|im_start|> and <|im_end|> but no chat template: its model never saw a chat, so
    # `generate` says so in one line and encodes the prompt as written (what --raw does), not the chat template
    from tinyqwen.generation import generate

    summary = train.train(tiny_config(tmp_path, steps=2))
    ckpt = summary["checkpoint"]
    tok = tinyqwen.Tokenizer.from_pretrained(ckpt)
    assert not tok.has_chat_template and tinyqwen.Tokenizer.qwen3().has_chat_template
    prompt = "12 + 3 ="
    argv = ["generate", "--model", ckpt, "--temperature", "0", "--max-new-tokens", "5", "--json", prompt, "x"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "the tokenizer has no chat template, so prompts go in as written" in err
    want = generate(tinyqwen.load_model(ckpt), tok.encode(prompt), 5, eos_token_ids=[tok.eos_token_id])
    assert json.loads(out.splitlines()[0])["ids"] == want
    assert main([*argv[:-2], "--raw", prompt, "x"]) == 0  # asked for: no note
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out.splitlines()[0])["ids"] == want
