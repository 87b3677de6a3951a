"""A small trainer for Qwen3 / Qwen3-MoE in plain NumPy (chapter 13).

    for step in 1..steps:
        grads = Σ over `grad_accum` micro-batches of loss_and_grads(...)   (each scaled by 1 / grad_accum)
        clip the global gradient norm to `grad_clip`
        lr = warm-up then cosine(step)
        AdamW update (decoupled weight decay)
        log; every `eval_every` steps the validation loss; every `save_every` a checkpoint

Checkpoints are folders in the Hugging Face layout — config.json, generation_config.json, model.safetensors with
the official tensor names (one tensor per expert), the tokenizer files — so `tinyqwen.load_model`,
`tinyqwen generate/chat --model DIR` and transformers' `from_pretrained` all read them. Beside them,
`trainer_state.json` and `optimizer.safetensors` (AdamW's moments) make a run resumable exactly: batches are drawn
from a generator seeded by (seed, step), so a resumed run sees the same data as an uninterrupted one.

Run it with `tinyqwen train --config FILE` (JSON, or TOML on Python ≥ 3.11); `TrainConfig` lists every key.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from tinyqwen.blas_threads import (
    blas_threads,
    limit_blas_threads,  # noqa: F401 (re-exported: chapter 13's exercises import it here)
)
from tinyqwen.config import Qwen3Config, load_config
from tinyqwen.corpus import build_dataset, unigram_loss
from tinyqwen.errors import TinyQwenError
from tinyqwen.grad import copy_weights, loss_and_grads, named_parameters
from tinyqwen.model import AttentionWeights, LayerWeights, MLPWeights, MoEWeights, Weights, load_model
from tinyqwen.moe import AUX_LOSS_SCOPES
from tinyqwen.safetensors import load_file, save_file


class TrainError(TinyQwenError):
    """A training config or checkpoint the trainer cannot use."""


# --------------------------------------------------------------------------------------------- config

MODEL_DEFAULTS = {  # a tiny Qwen3-MoE: every key of an official Qwen3-MoE config.json
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "decoder_sparse_step": 1,
    "eos_token_id": None,  # filled in from the tokenizer
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 96,
    "initializer_range": 0.02,
    "intermediate_size": 192,
    "max_position_embeddings": 256,
    "max_window_layers": 4,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 64,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 512,
}


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny-moe"
    model: dict = field(default_factory=dict)  # overrides of MODEL_DEFAULTS (config.json keys)
    init_from: str | None = None  # a checkpoint folder to start from instead of random weights
    docs: int = 20000  # synthetic documents (tinyqwen.corpus)
    data_seed: int = 0
    val_fraction: float = 0.05
    seq_len: int = 64
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    aux_coef: float | None = None  # default: the model config's router_aux_loss_coef
    # "global": transformers' aux loss, f_e and P_e over all MoE layers pooled (balances expert e summed over
    # layers); "layer": the loss per MoE layer, averaged over layers (balances every layer's own experts)
    aux_loss_scope: str = "global"
    eval_every: int = 50
    log_every: int = 1  # one log line per this many steps (loss, aux, expert load averaged over them)
    eval_batches: int = 8
    # a resumable checkpoint every this many steps (and always at the end), so an interrupted run loses at most
    # save_every steps: `tinyqwen train --config FILE --resume OUT_DIR/checkpoint`; 0: only at the end
    save_every: int = 100
    seed: int = 0
    progress: bool = True
    blas_threads: int | None = 1  # see limit_blas_threads; None leaves BLAS as it is

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise TrainError(f"cannot read training config {path}: {e.strerror}") from None
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, ImportError) as e:
            kind = "TOML" if path.suffix == ".toml" else "JSON"
            raise TrainError(f"{path}: not a valid {kind} file: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "config") -> TrainConfig:
        if not isinstance(data, dict):
            raise TrainError(f"{where}: a training config is an object of settings")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise TrainError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(known)})")
        cfg = cls(**data)
        if "betas" in data:
            cfg.betas = tuple(data["betas"])
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "docs"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 1:
                raise TrainError(f"{where}: {name} must be a positive integer, got {value!r}")
        if cfg.aux_loss_scope not in AUX_LOSS_SCOPES:
            raise TrainError(
                f"{where}: aux_loss_scope must be one of {', '.join(AUX_LOSS_SCOPES)}, got {cfg.aux_loss_scope!r}"
            )
        if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
            raise TrainError(
                f"{where}: need 0 ≤ min_lr ≤ lr and lr > 0, got lr={cfg.lr}, min_lr={cfg.min_lr}"
            )
        return cfg


# --------------------------------------------------------------------------------------------- schedule, AdamW


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to lr over `warmup` steps, then a cosine from lr down to min_lr at the last step.

    >>> c = TrainConfig(lr=1.0, min_lr=0.0, warmup=10, steps=110)
    >>> [round(learning_rate(s, c), 3) for s in (1, 10, 60, 110)]
    [0.1, 1.0, 0.5, 0.0]
    """
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def global_norm(grads: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))


def clip_gradients(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / ‖g‖) in place (‖g‖ over all of them); returns ‖g‖ before."""
    norm = global_norm(grads)
    if max_norm > 0 and norm > max_norm:
        for g in grads.values():
            g *= np.float32(max_norm / norm)
    return norm


@dataclass
class AdamW:
    """Adam with *decoupled* weight decay (Loshchilov & Hutter): decay shrinks the weight directly,
    w ← w − lr·wd·w, instead of being added to the gradient (where Adam's per-weight scaling would distort it).

    Only matrices are decayed; RMSNorm weights (1-D) are not — decaying them would pull every norm towards 0.
    """

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    step: int = 0
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        b1, b2 = self.betas
        self.step += 1
        c1, c2 = 1 - b1**self.step, 1 - b2**self.step  # bias corrections: m and v start at 0
        for name, p in params.items():
            g = grads[name]
            m = self.m.setdefault(name, np.zeros_like(p))
            v = self.v.setdefault(name, np.zeros_like(p))
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            if self.weight_decay and p.ndim >= 2:
                p *= np.float32(1 - lr * self.weight_decay)
            p -= np.float32(lr / c1) * m / (np.sqrt(v / np.float32(c2)) + np.float32(self.eps))


# --------------------------------------------------------------------------------------------- weights, checkpoints


def init_weights(c: Qwen3Config, seed: int, std: float = 0.02) -> Weights:
    """Random weights as transformers initialises Qwen3: N(0, initializer_range²) matrices, RMSNorm weights 1."""
    g = np.random.default_rng(seed)

    def normal(*shape):
        return (g.standard_normal(shape) * std).astype(np.float32)

    h, d = c.hidden_size, c.head_dim
    layers = []
    for i in range(c.num_hidden_layers):
        attn = AttentionWeights(
            normal(c.q_size, h), normal(c.kv_size, h), normal(c.kv_size, h), normal(h, c.q_size),
            np.ones(d, np.float32), np.ones(d, np.float32),
        )  # fmt: skip
        if c.is_moe_layer(i):
            E, f = c.num_experts, c.moe_intermediate_size
            mlp = MoEWeights(normal(E, h), normal(E, f, h), normal(E, f, h), normal(E, h, f))
        else:
            f = c.intermediate_size
            mlp = MLPWeights(normal(f, h), normal(f, h), normal(h, f))
        layers.append(LayerWeights(np.ones(h, np.float32), attn, np.ones(h, np.float32), mlp))
    embed = normal(c.vocab_size, h)
    lm_head = embed if c.tie_word_embeddings else normal(c.vocab_size, h)
    return Weights(embed, layers, np.ones(h, np.float32), lm_head)


def hf_tensors(w: Weights) -> dict[str, np.ndarray]:
    """The weights under the official checkpoint names: stacked experts split into one tensor per expert."""
    out = {}
    for name, a in named_parameters(w).items():
        if ".mlp.experts." in name:
            kind = name.rsplit(".", 1)[1]
            for e in range(a.shape[0]):
                out[name.replace(f"experts.{kind}", f"experts.{e}.{kind}.weight")] = a[e]
        else:
            out[name] = a
    return out


def save_checkpoint(folder: Path, config: dict, w: Weights, tokenizer_dir: Path | None, state: dict | None,
                    opt: AdamW | None) -> None:  # fmt: skip
    """config.json, generation_config.json, model.safetensors (+ tokenizer, + trainer state and AdamW moments)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
           "do_sample": False, "transformers_version": config.get("transformers_version")}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(hf_tensors(w), folder / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    if opt is not None:
        moments = {f"m.{k}": a for k, a in opt.m.items()} | {f"v.{k}": a for k, a in opt.v.items()}
        save_file(moments, folder / "optimizer.safetensors")
    if state is not None:
        (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_checkpoint(folder: Path) -> tuple[Qwen3Config, dict, Weights, AdamW | None, dict | None]:
    """Read what `save_checkpoint` wrote: (config, config dict, writable float32 weights, AdamW or None, state)."""
    model = load_model(folder)
    w = copy_weights(model.weights)
    raw = json.loads((folder / "config.json").read_text())
    opt, state = None, None
    if (folder / "trainer_state.json").is_file():
        state = json.loads((folder / "trainer_state.json").read_text())
        moments = load_file(folder / "optimizer.safetensors")
        opt = AdamW(tuple(state["betas"]), state["adam_eps"], state["weight_decay"], state["step"])
        opt.m = {k[2:]: np.array(a) for k, a in moments.items() if k.startswith("m.")}
        opt.v = {k[2:]: np.array(a) for k, a in moments.items() if k.startswith("v.")}
    return model.config, raw, w, opt, state


# --------------------------------------------------------------------------------------------- batches, eval


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """`batch_size` random windows of `seq_len` tokens; the draw depends only on (seed, step), so resuming at a
    step sees exactly the batch an uninterrupted run would have seen."""
    if len(tokens) < seq_len:
        raise TrainError(f"{len(tokens)} tokens cannot fill one window of seq_len {seq_len}")
    g = np.random.default_rng([seed, step])
    # a window may start at 0 … len - seq_len inclusive: `integers` excludes its upper bound, hence the + 1
    starts = g.integers(0, len(tokens) - seq_len + 1, size=batch_size)
    return np.stack([tokens[s : s + seq_len] for s in starts])


def evaluate(c: Qwen3Config, w: Weights, val: np.ndarray, cfg: TrainConfig) -> float:
    """Mean next-token cross-entropy over `eval_batches` fixed validation windows."""
    losses = []
    for b in range(cfg.eval_batches):
        ids = sample_batch(val, cfg.batch_size, cfg.seq_len, cfg.seed + 10_000, b)
        losses.append(loss_and_grads(c, w, ids, aux_coef=0.0, forward_only=True).ce)
    return float(np.mean(losses))


def peak_memory_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: str | Path | None = None, stop_after: int | None = None) -> dict:
    """Train as `cfg` says; returns the final summary (also written to out_dir/summary.json).

    `stop_after`: end (and save a resumable checkpoint) after this step, as an interrupted run would; the
    schedule still runs towards `cfg.steps`.
    """
    with blas_threads(cfg.blas_threads):  # the process's BLAS left as we found it
        return _train(cfg, resume, stop_after)


def _train(cfg: TrainConfig, resume, stop_after) -> dict:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    data = build_dataset(cfg.docs, cfg.data_seed, MODEL_DEFAULTS["vocab_size"] if "vocab_size" not in cfg.model
                         else cfg.model["vocab_size"], cfg.val_fraction, tok_dir)  # fmt: skip
    eos = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    eos_id = len(eos)  # <|endoftext|> is the first added token, right after the BPE vocabulary

    start, opt, log_mode = 0, None, "w"
    if resume is not None:
        c, raw, w, opt, state = load_checkpoint(Path(resume))
        if state is None:
            raise TrainError(f"{resume}: no trainer_state.json, so this checkpoint cannot be resumed")
        start, log_mode = state["step"], "a"
        _truncate_log(out / "log.jsonl", start)
    elif cfg.init_from:
        c, raw, w, _, _ = load_checkpoint(Path(cfg.init_from))
    else:
        raw = MODEL_DEFAULTS | {"eos_token_id": eos_id, "bos_token_id": eos_id} | cfg.model
        if raw["vocab_size"] < eos_id + 3:
            raise TrainError(f"vocab_size {raw['vocab_size']} is smaller than the tokenizer's {eos_id + 3}")
        (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        c = load_config(out)
        w = init_weights(c, cfg.seed, raw.get("initializer_range", 0.02))
    if opt is None:
        opt = AdamW(cfg.betas, cfg.adam_eps, cfg.weight_decay)
    aux_coef = cfg.aux_coef if cfg.aux_coef is not None else (c.router_aux_loss_coef if c.is_moe else 0.0)
    if cfg.seq_len > c.max_position_embeddings:
        raise TrainError(f"seq_len {cfg.seq_len} exceeds max_position_embeddings {c.max_position_embeddings}")
    params = named_parameters(w)
    baseline = unigram_loss(data["train"], data["val"], c.vocab_size)
    n_params = sum(a.size for a in params.values())

    log_path = out / "log.jsonl"
    log = log_path.open(log_mode, encoding="utf-8")
    if start == 0:
        log.write(json.dumps({"kind": "run", "config": _jsonable(asdict(cfg)), "model": raw, "parameters":
                  int(n_params), "train_tokens": int(len(data["train"])), "val_tokens": int(len(data["val"])),
                  "unigram_val_loss": baseline, "aux_coef": aux_coef, "aux_loss_scope": cfg.aux_loss_scope})
                  + "\n")  # fmt: skip

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    t_start, cpu_start, val_loss = time.perf_counter(), time.process_time(), float("nan")
    window = {"ce": 0.0, "aux": 0.0, "n": 0, "t": 0.0, "counts": None}
    last = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    for step in range(start + 1, last + 1):
        t0 = time.perf_counter()
        grads = None
        for micro in range(cfg.grad_accum):
            ids = sample_batch(
                data["train"], cfg.batch_size, cfg.seq_len, cfg.seed, step * cfg.grad_accum + micro
            )
            r = loss_and_grads(c, w, ids, aux_coef=aux_coef, grads=grads, grad_scale=1.0 / cfg.grad_accum,
                               aux_scope=cfg.aux_loss_scope)  # fmt: skip
            grads = r.grads
            window["ce"] += r.ce / cfg.grad_accum
            window["aux"] += r.aux / cfg.grad_accum
            cnt = r.expert_counts
            window["counts"] = (
                cnt
                if window["counts"] is None
                else [a + b for a, b in zip(window["counts"], cnt, strict=True)]
            )
        g = named_parameters(grads)
        norm = clip_gradients(g, cfg.grad_clip)
        lr = learning_rate(step, cfg)
        opt.update(params, g, lr)
        window["t"] += time.perf_counter() - t0
        window["n"] += 1
        evaluate_now = (cfg.eval_every and step % cfg.eval_every == 0) or step == last
        if evaluate_now:
            val_loss = evaluate(c, w, data["val"], cfg)
        if step % cfg.log_every == 0 or step == last or evaluate_now:
            n = window["n"]
            entry = {"kind": "step", "step": step, "tokens": step * tokens_per_step, "ce": window["ce"] / n,
                     "aux": window["aux"] / n, "lr": lr, "grad_norm": norm,
                     "tok_per_s": n * tokens_per_step / window["t"],
                     # share of the (token, slot) routing pairs each expert got, per MoE layer (uniform: 1/E)
                     "expert_load": [(a / a.sum()).round(4).tolist() for a in window["counts"] or []]}  # fmt: skip
            entry["loss"] = entry["ce"] + aux_coef * entry["aux"]
            if evaluate_now:
                entry["val_loss"] = val_loss
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if bar is not None:
                bar.set_postfix_str(_postfix(entry, c.num_experts if c.is_moe else 0, val_loss))
            window = {"ce": 0.0, "aux": 0.0, "n": 0, "t": 0.0, "counts": None}
        if bar is not None:
            bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step != last:
            _save(out / "checkpoint", raw, w, tok_dir, step, cfg, opt, val_loss)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start
    _save(out / "checkpoint", raw, w, tok_dir, last, cfg, opt, val_loss)
    summary = {"kind": "summary", "steps": last, "tokens_seen": last * tokens_per_step,
               "wall_s": wall, "cpu_s": time.process_time() - cpu_start, "val_loss": val_loss, "unigram_val_loss": baseline, "parameters": int(n_params),
               "peak_rss_mib": peak_memory_mib(), "checkpoint": str(out / "checkpoint")}  # fmt: skip
    log.write(json.dumps(summary) + "\n")
    log.close()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _postfix(e: dict, n_experts: int, val_loss: float) -> str:
    s = f"loss {e['ce']:.3f} aux {e['aux']:.3f} val {val_loss:.3f} {e['tok_per_s']:.0f} tok/s"
    if n_experts and e["expert_load"]:
        share = np.array(e["expert_load"]) * n_experts  # [layers, E], 1 = uniform
        pooled = share.mean(axis=0)  # every layer routes the same number of picks
        s += f" load ×uniform per layer {share.min():.2f}–{share.max():.2f}, pooled {pooled.min():.2f}–{pooled.max():.2f}"
    return s


def _save(folder, raw, w, tok_dir, step, cfg, opt, val_loss) -> None:
    state = {"step": step, "val_loss": val_loss, "betas": list(cfg.betas), "adam_eps": cfg.adam_eps,
             "weight_decay": cfg.weight_decay}  # fmt: skip
    # write beside, then swap: a run killed while saving still has its previous whole checkpoint
    tmp, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    save_checkpoint(tmp, raw, w, tok_dir, state, opt)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def _truncate_log(path: Path, step: int) -> None:
    """Drop the log entries an interrupted run wrote after its last checkpoint (`step`): the resumed run writes
    them again, so the log reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "summary" or (entry.get("kind") == "step" and entry["step"] > step):
            break
        keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))
