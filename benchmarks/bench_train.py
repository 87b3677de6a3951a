"""Training throughput and peak memory: tinyqwen's NumPy trainer vs the same model trained with torch, same run.

    python benchmarks/bench_train.py --peer-python python [--steps 40] [--threads 1] [--json]

Both engines train the model of `training/tiny-moe-aux0.001.json` from the *same* initial weights (tinyqwen's
init, saved as a Hugging Face checkpoint and loaded by transformers' Qwen3MoeForCausalLM, float32, eager
attention and experts) on the *same* batches (tinyqwen.train.sample_batch of the synthetic corpus) with the same
loss (cross-entropy + 0.001 × aux, `output_router_logits=True`), the same AdamW settings and schedule, gradient
clipping at 1.0. Each engine runs in its own process (so peak RSS is its own), with BLAS / torch limited to
`--threads` threads. The first `--warmup` steps are not timed. Reported: tokens/s over the timed steps, peak RSS
(ru_maxrss) and peak RSS above the process's RSS after imports, and the losses of the last step (the two engines
follow the same trajectory, so they must agree to a few 1e-3).

torch appears only here, never in tinyqwen/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "tiny-moe-aux0.001.json"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def setup(workdir: Path, steps: int):
    """The training config, data and initial checkpoint both engines share (built with NumPy only)."""
    sys.path.insert(0, str(REPO))
    from tinyqwen import train
    from tinyqwen.config import load_config

    cfg = train.TrainConfig.from_file(CONFIG)
    cfg.steps, cfg.out_dir, cfg.progress = steps, str(workdir / "run"), False
    tok = workdir / "tok"
    data = train.build_dataset(cfg.docs, cfg.data_seed, cfg.model["vocab_size"], cfg.val_fraction, tok)
    eos = len(json.loads((tok / "vocab.json").read_text(encoding="utf-8")))
    raw = train.MODEL_DEFAULTS | {"eos_token_id": eos, "bos_token_id": eos} | cfg.model
    init = workdir / "init"
    if not (init / "model.safetensors").exists():
        init.mkdir(parents=True, exist_ok=True)
        (init / "config.json").write_text(json.dumps(raw))
        w = train.init_weights(load_config(init), cfg.seed)
        train.save_checkpoint(init, raw, w, tok, None, None)
    return cfg, data, init


def run_numpy(workdir: Path, steps: int, warmup: int, threads: int) -> dict:
    from tinyqwen import train
    from tinyqwen.grad import loss_and_grads, named_parameters

    cfg, data, init = setup(workdir, steps)
    train.limit_blas_threads(threads)
    c, _, w, _, _ = train.load_checkpoint(init)
    rss0 = current_rss_mib()
    params = named_parameters(w)
    opt = train.AdamW(cfg.betas, cfg.adam_eps, cfg.weight_decay)
    tokens = cfg.batch_size * cfg.seq_len
    for step in range(1, steps + 1):
        if step == warmup + 1:
            t0 = time.perf_counter()
        ids = train.sample_batch(data["train"], cfg.batch_size, cfg.seq_len, cfg.seed, step)
        r = loss_and_grads(c, w, ids, aux_coef=cfg.aux_coef)
        g = named_parameters(r.grads)
        train.clip_gradients(g, cfg.grad_clip)
        opt.update(params, g, train.learning_rate(step, cfg))
    dt = time.perf_counter() - t0
    return {"engine": "tinyqwen-numpy", "tok_per_s": (steps - warmup) * tokens / dt, "peak_rss_mib": rss_mib(),
            "rss_after_load_mib": rss0, "last_ce": r.ce, "last_aux": r.aux}  # fmt: skip


def run_torch(workdir: Path, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from tinyqwen import train

    torch.set_num_threads(threads)
    cfg, data, init = setup(workdir, steps)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32, attn_implementation="eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.router_aux_loss_coef = cfg.aux_coef
    model.train()
    rss0 = current_rss_mib()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
    )  # fmt: skip
    tokens = cfg.batch_size * cfg.seq_len
    for step in range(1, steps + 1):
        if step == warmup + 1:
            t0 = time.perf_counter()
        ids = torch.from_numpy(train.sample_batch(data["train"], cfg.batch_size, cfg.seq_len, cfg.seed, step))
        for group in opt.param_groups:
            group["lr"] = train.learning_rate(step, cfg)
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    dt = time.perf_counter() - t0
    ce = out.loss.item() - cfg.aux_coef * out.aux_loss.item()
    return {"engine": "torch-cpu (transformers)", "tok_per_s": (steps - warmup) * tokens / dt,
            "peak_rss_mib": rss_mib(), "rss_after_load_mib": rss0, "last_ce": ce,
            "last_aux": out.aux_loss.item(), "torch": torch.__version__}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-python", default=os.environ.get("TINYQWEN_PEER_PYTHON", sys.executable),
                    help="a Python with torch + transformers")  # fmt: skip
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--engine", choices=["numpy", "torch"], help=argparse.SUPPRESS)  # internal: one engine
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        run = run_numpy if args.engine == "numpy" else run_torch
        print(json.dumps(run(Path(args.workdir), args.steps, args.warmup, args.threads)))
        return 0
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for engine, python in (("numpy", sys.executable), ("torch", args.peer_python)):
            cmd = [python, __file__, "--engine", engine, "--workdir", tmp, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
            env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    report = {
        "config": str(CONFIG.relative_to(REPO)), "steps": args.steps, "warmup": args.warmup,
        "threads": args.threads, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "results": results,
        "numpy_over_torch_tok_per_s": results[0]["tok_per_s"] / results[1]["tok_per_s"],
        "numpy_over_torch_peak_rss": results[0]["peak_rss_mib"] / results[1]["peak_rss_mib"],
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for r in results:
            print(f"{r['engine']:28s} {r['tok_per_s']:9.0f} tok/s   peak RSS {r['peak_rss_mib']:7.1f} MiB "
                  f"(after loading {r['rss_after_load_mib']:.1f})   last CE {r['last_ce']:.4f} aux {r['last_aux']:.4f}")  # fmt: skip
        print(f"numpy / torch: {report['numpy_over_torch_tok_per_s']:.2f}x tokens/s, "
              f"{report['numpy_over_torch_peak_rss']:.2f}x peak RSS")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
