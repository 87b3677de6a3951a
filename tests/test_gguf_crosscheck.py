"""Live cross-checks against llama.cpp: its GGUF files, its `gguf` package's dequantization and llama-cpp-python.

The files are the peers' (see the benchmarks' notes): a random-weight checkpoint with Qwen3-0.6B's exact config in
the Hugging Face layout, and llama.cpp's conversions of it — bf16 and q8_0 by its converter, Q4_K_M by its
quantizer. Point TINYQWEN_PEER_DIR at the folder holding them:

    qwen3-0.6b-random/                  the checkpoint (bf16 safetensors, config, tokenizer)
    qwen3-0.6b-random-bf16.gguf  qwen3-0.6b-random-q8_0.gguf  qwen3-0.6b-random-q4_k_m.gguf

Each test skips, saying why, when the folder, a file, `gguf` or `llama_cpp` is missing (CI builds no peers). Run
them with a python that has the crosscheck extra (`gguf`, and llama-cpp-python for the last test).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import tinyqwen
from tinyqwen.checkpoint import Checkpoint
from tinyqwen.config import load_config
from tinyqwen.gguf import GGUFFile
from tinyqwen.gguf_checkpoint import GGUFCheckpoint
from tinyqwen.quantization import QuantizedTensor

pytestmark = pytest.mark.crosscheck

NAMES = {kind: f"qwen3-0.6b-random-{kind}.gguf" for kind in ("bf16", "q8_0", "q4_k_m")}


def peer(name: str) -> Path:
    folder = os.environ.get("TINYQWEN_PEER_DIR")
    if not folder:
        pytest.skip(
            "TINYQWEN_PEER_DIR is not set (the folder with llama.cpp's GGUF files of the random Qwen3-0.6B)"
        )
    path = Path(folder) / name
    if not path.exists():
        pytest.skip(f"{path} is missing (made by the peers' setup script)")
    return path


def rows(value, start: int, stop: int) -> np.ndarray:  # float32 rows of a stored tensor, widened
    part = value[start:stop]
    return part.dequantize() if isinstance(part, QuantizedTensor) else np.asarray(part, np.float32)


@pytest.mark.parametrize("kind", list(NAMES))
def test_dequantization_is_bit_identical_to_the_gguf_package(kind):
    gguf = pytest.importorskip("gguf", reason="llama.cpp's gguf package (the crosscheck extra)")
    path = peer(NAMES[kind])
    reader = gguf.GGUFReader(path)
    theirs = {t.name: t for t in reader.tensors}
    seen: dict[str, int] = {}
    with GGUFFile(path) as f:
        assert set(f.tensors) == set(theirs)
        for name, info in f.tensors.items():
            t = theirs[name]
            assert t.tensor_type.name == info.ggml_type
            assert (
                tuple(int(n) for n in t.shape[::-1]) == info.shape
            )  # gguf lists ne0 first, as the file does
            ours = f.get(name)
            raw = np.asarray(t.data)
            n_rows = int(np.prod(info.shape[:-1]))
            theirs_rows = raw.reshape(n_rows, -1)
            if isinstance(ours, QuantizedTensor):
                view = QuantizedTensor(ours.qtype, (n_rows, info.shape[-1]), ours.data.reshape(n_rows, -1))
            else:
                view = np.asarray(ours).reshape(n_rows, -1)
            for r in range(0, n_rows, 16384):  # slabs: the 151,936-row embedding stays a few hundred MB
                want = gguf.quants.dequantize(theirs_rows[r : r + 16384], t.tensor_type).astype(np.float32)
                got = rows(view, r, r + 16384)
                assert np.array_equal(got.view(np.uint32), want.reshape(got.shape).view(np.uint32)), (name, r)
            seen[info.ggml_type] = seen.get(info.ggml_type, 0) + 1
    expected = {"bf16": {"BF16", "F32"}, "q8_0": {"Q8_0", "F32"}, "q4_k_m": {"Q4_K", "Q6_K", "F32"}}[kind]
    assert set(seen) == expected, seen
    if kind == "q4_k_m":
        assert seen == {"Q4_K": 168, "Q6_K": 29, "F32": 113}


def test_bf16_gguf_tensors_are_the_safetensors_bytes():
    # llama.cpp's converter does not permute Qwen3's q/k rows (it does so for LLaMA's interleaved RoPE only)
    folder = peer("qwen3-0.6b-random")
    with GGUFCheckpoint(peer(NAMES["bf16"])) as g, Checkpoint(folder) as c:
        assert g.keys() == c.keys() - {"lm_head.weight"}
        for name in sorted(c.keys() & g.keys()):
            if c.dtype(name) == "BF16" and g.dtype(name) == "BF16":
                assert np.array_equal(g.raw(name), c.raw(name)), name
            else:  # norms: F32 in the GGUF, bf16 in the checkpoint, widened exactly
                assert np.array_equal(g.get(name), c.get(name)), name
        assert g.config == load_config(folder)  # the metadata says what config.json says


def quantized_like_llama_cpp(kind: str, names: list[str]) -> dict[str, float]:
    """Our quantizer on the checkpoint's weights vs llama.cpp's blocks in its file: fraction of equal blocks."""
    folder = peer("qwen3-0.6b-random")
    equal = {}
    with GGUFCheckpoint(peer(NAMES[kind])) as g, Checkpoint(folder) as c:
        for name in names:
            theirs = g.get(name)
            ours = QuantizedTensor.quantize(c.get(name)[: theirs.shape[0]], theirs.qtype)
            size = {"q8_0": 34, "q4_k": 144, "q6_k": 210}[theirs.qtype]
            a, b = ours.data.reshape(-1, size), np.asarray(theirs.data).reshape(-1, size)
            equal[name] = float((a == b).all(axis=1).mean())
    return equal


def test_q8_0_blocks_equal_llama_cpps():
    names = ["model.embed_tokens.weight"] + [
        f"model.layers.{i}.{n}.weight"
        for i in (0, 13, 27)
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.down_proj",
        )
    ]
    equal = quantized_like_llama_cpp("q8_0", names)
    assert all(v == 1.0 for v in equal.values()), equal


def test_q4_k_m_blocks_equal_llama_cpps():
    names = [
        "model.layers.0.self_attn.q_proj.weight",  # Q4_K
        "model.layers.0.mlp.gate_proj.weight",  # Q4_K
        "model.layers.0.self_attn.v_proj.weight",  # Q6_K (use_more_bits)
        "model.layers.0.mlp.down_proj.weight",  # Q6_K
    ]
    equal = quantized_like_llama_cpp("q4_k_m", names)
    assert all(v >= 0.999 for v in equal.values()), equal


def test_llama_cpp_runs_our_quantized_files(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the peers' venv)")
    from tinyqwen.quantize import quantize_checkpoint
    from tinyqwen.testing import write_tiny_qwen3

    folder = write_tiny_qwen3(
        tmp_path / "m", seed=2, scale=0.1, hidden_size=256, intermediate_size=512, head_dim=64,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    ids = [151644, 872, 198, 9707, 11, 1879, 0, 151645]
    for target in ("q8_0", "q4_k_m"):
        path = tmp_path / f"m-{target}.gguf"
        quantize_checkpoint(folder, target, path)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], np.float32)
        ours = tinyqwen.load_model(path)(ids)
        p, q = log_softmax(theirs), log_softmax(ours)
        kl = float((np.exp(p) * (p - q)).sum(-1).mean())
        # llama.cpp quantizes the activations to 8 bits for its dot products and computes in its own order;
        # measured KL(llama.cpp || ours) on the peer files is ~1e-4: a wrong layout would give ~1
        assert kl < 1e-2, (target, kl)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
