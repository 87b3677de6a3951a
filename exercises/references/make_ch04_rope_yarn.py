"""Reference arrays for chapter 4 (RoPE and YaRN), made with transformers' own Qwen3 rotary code. tinyqwen is never
imported.

    python exercises/references/make_ch04_rope_yarn.py    # from the repository root, with .[crosscheck] installed

Needs torch and transformers (the `crosscheck` extra). Configs are the repo's copies of the real ones
(tinyqwen/data/configs/; the YaRN variant and the fixtures' in tests/fixtures/configs/), read with `AutoConfig.from_pretrained`; `Qwen3RotaryEmbedding(config)` gives inv_freq, the
attention factor (`attention_scaling`) and the cos/sin tables; `apply_rotary_pos_emb` rotates queries and keys. Every
random input has its own fixed seed. Writes ch04_rope_yarn.npz with:

freq.<case>.{head_dim, theta, inv_freq}
    Plain RoPE: `Qwen3RotaryEmbedding(config).inv_freq` [head_dim/2] float32.
      qwen3_0_6b   Qwen3-0.6B (head_dim 128, rope_theta 1000000)
      fixture      the tiny fixtures' size (head_dim 32, rope_theta 10000, tests/fixtures/dense-untied-bf16-sharded)

yarn.<case>.{head_dim, theta, factor, original, beta_fast, beta_slow, inv_freq, attention_factor}
    YaRN: the same module on a config with rope_scaling {"rope_type": "yarn", ...}.
      qwen3_0_6b   Qwen3-0.6B-yarn.json: factor 4, original_max_position_embeddings 32768 (the model card's setting)
      fixture      tests/fixtures/dense-yarn: head_dim 32, theta 10000, factor 4, original 64
      custom       Qwen3-0.6B with factor 8, original 4096, beta_fast 16, beta_slow 2 (so the betas matter)
    plus yarn_factor_one.attention_factor: factor 1.0 (no stretching) gives 1.0.

cos_sin.<case>.{positions, inv_freq, attention_factor, cos, sin}
    `Qwen3RotaryEmbedding.forward(x, position_ids)` in float32: cos, sin [B, T, head_dim].
      short        Qwen3-0.6B, positions [[0..7]]
      batch        fixture size, two rows with different positions [[0..5], [3..8]]
      long         Qwen3-0.6B, positions 0, 1023, 8191, 32767, 40959 (its whole context of 40960)
      yarn_long    Qwen3-0.6B-yarn, positions 0, 1, 1023, 8191, 32767, 100000, 131071 (past the original window)

rope.<case>.{q, k, cos, sin, q_embed, k_embed}
    `apply_rotary_pos_emb(q, k, cos, sin)` with cos/sin from the module above:
      heads        q [2, 4, 6, 32], k [2, 2, 6, 32] ~ N(0, 1), fixture size, positions [[0..5], [3..8]]
      yarn_long    q [1, 2, 5, 128], k [1, 1, 5, 128], Qwen3-0.6B-yarn at positions 0, 1023, 32767, 100000, 131071
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[1] / "tests" / "fixtures" / "configs"
OFFICIAL = HERE.parents[1] / "tinyqwen" / "data" / "configs"  # the official files, as tinyqwen ships them
NAME = "ch04_rope_yarn"


def config_from(name: str, **changes):
    """AutoConfig of a stored config.json (an official one, else a test fixture's), with top-level keys replaced
    by `changes`."""
    data = json.loads(((OFFICIAL if (OFFICIAL / name).is_file() else CONFIGS) / name).read_text())
    data.update(changes)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(data))
        return AutoConfig.from_pretrained(tmp)


def rotary(config) -> Qwen3RotaryEmbedding:
    return Qwen3RotaryEmbedding(config).float()


def cos_sin(module: Qwen3RotaryEmbedding, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = torch.zeros(1, dtype=torch.float32)  # only its dtype and device are used
    with torch.no_grad():
        cos, sin = module(x, torch.from_numpy(positions.astype(np.int64)))
    return cos.numpy(), sin.numpy()


def main() -> None:
    out: dict[str, np.ndarray] = {}
    plain = {
        "qwen3_0_6b": config_from("Qwen3-0.6B.json"),
        "fixture": config_from("fixture-dense-untied-bf16-sharded.json"),
    }
    for case, cfg in plain.items():
        module = rotary(cfg)
        out[f"freq.{case}.head_dim"] = np.array(cfg.head_dim)
        out[f"freq.{case}.theta"] = np.array(float(cfg.rope_parameters["rope_theta"]))
        out[f"freq.{case}.inv_freq"] = module.inv_freq.numpy()
        assert module.attention_scaling == 1.0

    yarn = {
        "qwen3_0_6b": config_from("Qwen3-0.6B-yarn.json"),
        "fixture": config_from("fixture-dense-yarn.json"),
        "custom": config_from(
            "Qwen3-0.6B.json",
            max_position_embeddings=32768,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "beta_fast": 16.0,
                "beta_slow": 2.0,
            },
        ),
    }
    for case, cfg in yarn.items():
        p = cfg.rope_parameters
        assert p["rope_type"] == "yarn", p
        module = rotary(cfg)
        out[f"yarn.{case}.head_dim"] = np.array(cfg.head_dim)
        out[f"yarn.{case}.theta"] = np.array(float(p["rope_theta"]))
        out[f"yarn.{case}.factor"] = np.array(float(p["factor"]))
        out[f"yarn.{case}.original"] = np.array(int(p["original_max_position_embeddings"]))
        out[f"yarn.{case}.beta_fast"] = np.array(float(p.get("beta_fast") or 32.0))
        out[f"yarn.{case}.beta_slow"] = np.array(float(p.get("beta_slow") or 1.0))
        out[f"yarn.{case}.inv_freq"] = module.inv_freq.numpy()
        out[f"yarn.{case}.attention_factor"] = np.array(module.attention_scaling, dtype=np.float64)
        assert math.isclose(module.attention_scaling, 0.1 * math.log(float(p["factor"])) + 1.0)
    one = config_from(
        "Qwen3-0.6B.json",
        rope_scaling={"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 40960},
    )
    out["yarn_factor_one.attention_factor"] = np.array(rotary(one).attention_scaling, dtype=np.float64)

    tables = {
        "short": (plain["qwen3_0_6b"], np.arange(8)[None]),
        "batch": (plain["fixture"], np.stack([np.arange(6), np.arange(3, 9)])),
        "long": (plain["qwen3_0_6b"], np.array([[0, 1023, 8191, 32767, 40959]])),
        "yarn_long": (yarn["qwen3_0_6b"], np.array([[0, 1, 1023, 8191, 32767, 100000, 131071]])),
    }
    for case, (cfg, positions) in tables.items():
        module = rotary(cfg)
        cos, sin = cos_sin(module, positions)
        out[f"cos_sin.{case}.positions"] = positions.astype(np.int64)
        out[f"cos_sin.{case}.inv_freq"] = module.inv_freq.numpy()
        out[f"cos_sin.{case}.attention_factor"] = np.array(module.attention_scaling, dtype=np.float64)
        out[f"cos_sin.{case}.cos"], out[f"cos_sin.{case}.sin"] = cos, sin

    rotations = {
        "heads": (plain["fixture"], np.stack([np.arange(6), np.arange(3, 9)]), (4, 2), 401),
        "yarn_long": (yarn["qwen3_0_6b"], np.array([[0, 1023, 32767, 100000, 131071]]), (2, 1), 402),
    }
    for case, (cfg, positions, (hq, hkv), seed) in rotations.items():
        cos, sin = cos_sin(rotary(cfg), positions)
        B, T = positions.shape
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((B, hq, T, cfg.head_dim)).astype(np.float32)
        k = rng.standard_normal((B, hkv, T, cfg.head_dim)).astype(np.float32)
        with torch.no_grad():
            q_embed, k_embed = apply_rotary_pos_emb(*(torch.from_numpy(a) for a in (q, k, cos, sin)))
        out |= {f"rope.{case}.q": q, f"rope.{case}.k": k, f"rope.{case}.cos": cos, f"rope.{case}.sin": sin}
        out[f"rope.{case}.q_embed"], out[f"rope.{case}.k_embed"] = q_embed.numpy(), k_embed.numpy()

    path = HERE / f"{NAME}.npz"
    np.savez_compressed(path, **out)
    print(
        f"wrote {path.relative_to(HERE.parents[1])}: {len(out)} arrays, {path.stat().st_size / 1024:.0f} KiB"
    )
    print(f"torch {torch.__version__}, transformers {__import__('transformers').__version__}")


if __name__ == "__main__":
    main()
