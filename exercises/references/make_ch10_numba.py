"""Reference files for chapter 10 (making it fast on the CPU), made with torch's bfloat16. tinyqwen is never
imported: these files say what torch computes, not what we compute.

    python exercises/references/make_ch10_numba.py    # from the repository root, with .[crosscheck] installed

Needs torch. Deterministic (fixed seeds). Writes ch10_numba.npz:

widen.bits          uint16 [65536]: every bfloat16 bit pattern
widen.f32           float32 [65536]: torch's float32 value of each (`.view(torch.bfloat16).float()`, the official
                    widening)
narrow.x            float32 [N]: values to round to bf16: exact bf16 values, ties (low half exactly 0x8000) with an
                    even and an odd kept bit, values just above and below a tie, random normals of several sizes,
                    subnormals, ±0, ±inf, values that overflow to inf, the largest finite float32
narrow.bits         uint16 [N]: torch's bf16 bits of each (`torch.from_numpy(x).to(torch.bfloat16)`, round to nearest,
                    ties to even), read back with `.view(torch.int16)`
gemv.<case>.w       uint16 [m, n]: bf16 weight bit patterns (torch's rounding of random normals × 0.05)
gemv.<case>.x       float32 [n]
gemv.<case>.y       float32 [m]: torch's `w.view(torch.bfloat16).double() @ x.double()`, rounded to float32 (the
                    exact product of the bf16 weights, summed in float64)
                    cases: small [3, 4] (readable by hand), square [64, 64] (the transposed product has the same
                    shape), odd [300, 257] (not a multiple of any block size), long [128, 1024] (rows as long as Qwen3-0.6B's)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent / "ch10_numba.npz"


def bf16_bits(x: np.ndarray) -> np.ndarray:  # float32 -> uint16, torch's rounding
    return (
        torch.from_numpy(np.ascontiguousarray(x, np.float32))
        .to(torch.bfloat16)
        .view(torch.int16)
        .numpy()
        .view(np.uint16)
    )


def widen(bits: np.ndarray) -> np.ndarray:  # uint16 -> float32, torch's widening
    return torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()


def narrow_inputs() -> np.ndarray:
    rng = np.random.default_rng(10)
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x40490000 | 0x8000], np.uint32)
    near = np.concatenate([ties - 1, ties + 1]).astype(np.uint32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -2.0, np.pi, 3.3895e38, 3.4e38,
                         np.finfo(np.float32).max, 1e-40, -1e-40, 1e-45], np.float32)  # fmt: skip
    randoms = np.concatenate([rng.standard_normal(200) * s for s in (1e-3, 0.05, 1.0, 1e4)]).astype(
        np.float32
    )
    return np.concatenate([ties.view(np.float32), near.view(np.float32), specials, randoms]).astype(
        np.float32
    )


def gemv_case(rng: np.random.Generator, m: int, n: int) -> dict[str, np.ndarray]:
    w = bf16_bits((rng.standard_normal((m, n)) * 0.05).astype(np.float32))
    x = rng.standard_normal(n).astype(np.float32)
    wt = torch.from_numpy(w.view(np.int16).copy()).view(torch.bfloat16)
    y = (wt.double() @ torch.from_numpy(x).double()).float().numpy()
    return {"w": w, "x": x, "y": y}


def main() -> None:
    arrays: dict[str, np.ndarray] = {}
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    arrays["widen.bits"], arrays["widen.f32"] = bits, widen(bits)
    x = narrow_inputs()
    arrays["narrow.x"], arrays["narrow.bits"] = x, bf16_bits(x)
    rng = np.random.default_rng(0)
    small = {"w": bf16_bits(np.array([[1, 2, 0, -1], [0.5, 0, 0, 0], [1, 1, 1, 1]], np.float32)),
             "x": np.array([1, 0.5, 2, 4], np.float32)}  # fmt: skip
    small["y"] = (widen(small["w"]).astype(np.float64) @ small["x"]).astype(np.float32)
    cases = {"small": small, "square": gemv_case(rng, 64, 64), "odd": gemv_case(rng, 300, 257),
             "long": gemv_case(rng, 128, 1024)}  # fmt: skip
    small_torch = (widen(small["w"]).astype(np.float64) @ small["x"].astype(np.float64)).astype(np.float32)
    assert np.array_equal(small["y"], small_torch)  # [2, 0.5, 7.5] — exact
    for name, case in cases.items():
        for key, value in case.items():
            arrays[f"gemv.{name}.{key}"] = value
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
