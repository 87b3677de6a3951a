"""The GGUF reader and writer, hostile files, and GGUF checkpoints through tinyqwen.load_model (dense and MoE, every
supported tensor type). Every file here is built by the test; the live comparisons with llama.cpp's own files and
its `gguf` package are in tests/test_gguf_crosscheck.py."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import tinyqwen
from tinyqwen.bf16 import bf16_to_float32, float32_to_bf16
from tinyqwen.errors import GGUFError, TinyQwenError
from tinyqwen.gguf import GGUFFile, StringArray, write_gguf
from tinyqwen.quantization import QuantizedTensor
from tinyqwen.quantize import quantize_checkpoint, tensor_type, use_more_bits
from tinyqwen.safetensors import save_file
from tinyqwen.testing import write_tiny_qwen3

FIXTURES = Path(__file__).parent / "fixtures"
RNG = np.random.default_rng(7)


def sample_file(path: Path, alignment: int = 32) -> dict:
    tensors = {
        "f32": RNG.standard_normal((3, 5)).astype(np.float32),
        "f16": RNG.standard_normal(7).astype(np.float16),
        "bf16": ("BF16", float32_to_bf16(RNG.standard_normal((2, 4)).astype(np.float32))),
        "q8": QuantizedTensor.quantize(RNG.standard_normal((2, 64)).astype(np.float32), "q8_0"),
        "q4": QuantizedTensor.quantize(RNG.standard_normal((3, 256)).astype(np.float32), "q4_k"),
        "q6": QuantizedTensor.quantize(RNG.standard_normal((2, 512)).astype(np.float32), "q6_k"),
        "experts": QuantizedTensor.quantize(RNG.standard_normal((4, 2, 32)).astype(np.float32), "q8_0"),
    }
    metadata = {
        "u8": (200, "UINT8"), "i8": (-5, "INT8"), "u16": (60000, "UINT16"), "i16": (-300, "INT16"),
        "u32": (4_000_000_000, "UINT32"), "i32": (-7, "INT32"), "f32": (0.5, "FLOAT32"), "bool": (True, "BOOL"),
        "str": ("héllo", "STRING"), "u64": (2**63, "UINT64"), "i64": (-(2**40), "INT64"), "f64": (0.1, "FLOAT64"),
        "ints": (np.array([1, -2, 3], np.int32), "ARRAY[INT32]"),
        "strs": (["a", "", "ĠHello"], "ARRAY[STRING]"),
        "nested": ([["x", "y"], ["z"]], "ARRAY[ARRAY]"),
    }  # fmt: skip
    write_gguf(path, metadata, tensors, alignment=alignment)
    return {"metadata": metadata, "tensors": tensors}


@pytest.mark.parametrize("alignment", [32, 64])
def test_round_trip_every_value_type_and_tensor_type(tmp_path, alignment):
    path = tmp_path / "s.gguf"
    want = sample_file(path, alignment)
    with GGUFFile(path) as f:
        for key, (value, _) in want["metadata"].items():
            got = f.metadata[key]
            if isinstance(value, np.ndarray):
                assert got.dtype == value.dtype and got.tolist() == value.tolist()
            elif key == "f32":
                assert got == 0.5
            else:
                assert got == value, key
        assert f.types["u8"] == "UINT8" and f.types["ints"] == "ARRAY[INT32]"
        assert f.alignment == alignment
        for t in f.tensors.values():
            assert t.offset % alignment == 0
        t = want["tensors"]
        assert np.array_equal(f.get("f32"), t["f32"])
        assert np.array_equal(f.get("f16"), t["f16"].astype(np.float32))
        assert np.array_equal(f.get("bf16"), bf16_to_float32(t["bf16"][1]))
        for name in ("q8", "q4", "q6", "experts"):
            got = f.get(name)
            assert isinstance(got, QuantizedTensor) and got.shape == t[name].shape
            assert np.array_equal(got.data, t[name].data)
        assert f.tensors["q4"].ggml_type == "Q4_K" and f.tensors["q4"].shape == (3, 256)
        assert f.get("experts")[2].shape == (2, 32)


def test_read_into_copies_the_stored_bytes_by_a_file_read(tmp_path):
    # read_into fills process memory from the file (not the mapping): the same bytes as the mapped view, whole or
    # from a row on (one expert of a stack), and a buffer that does not fit the tensor is refused
    path = tmp_path / "s.gguf"
    want = sample_file(path)
    with GGUFFile(path) as f:
        out = f.read_into("bf16", np.empty((2, 4), np.uint16))
        assert np.array_equal(out, want["tensors"]["bf16"][1]) and np.array_equal(out, f.raw("bf16"))
        expert = f.read_into("experts", np.empty(f.raw("experts")[2].shape, np.uint8), first=2)
        assert np.array_equal(expert, f.raw("experts")[2])
        with pytest.raises(GGUFError, match="cannot read"):
            f.read_into("experts", np.empty(f.raw("experts")[2].shape, np.uint8), first=4)


def _mapped_rss(path: Path) -> int:  # resident bytes of this process's mappings of `path` (/proc/self/smaps)
    total, current = 0, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):
            current = head[5] if len(head) > 5 else None
        elif line.startswith("Rss:") and current == str(path):
            total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_parsed_header_pages_leave_the_resident_memory(tmp_path):
    # a 4 MB header (a 200,000-token vocabulary, as a Qwen3 file's 5.7 MiB) is read through the mapping to parse
    # it; once parsed, its pages are handed back: the open file's mapping holds (almost) nothing resident, and the
    # tensor data still reads as written
    path = tmp_path / "big-header.gguf"
    tokens = [f"token-{i:06d}" for i in range(200_000)]
    weight = np.arange(2048, dtype=np.float32)
    write_gguf(path, {"tokenizer.ggml.tokens": (tokens, "ARRAY[STRING]")}, {"w": weight})
    with GGUFFile(path) as f:
        assert f.data_start > 3 << 20
        assert _mapped_rss(path) < 64 << 10  # at most the page the data section starts in, and its neighbours
        assert f.metadata["tokenizer.ggml.tokens"][199_999] == "token-199999"
        assert np.array_equal(f.get("w"), weight)


def test_big_string_arrays_are_checked_at_open_and_read_when_used(tmp_path):
    # a Qwen3-sized vocabulary (200,000 tokens, 100,000 merges): opening the file makes none of its ~300,000
    # strings (eagerly they were ~20 MB of Python objects, whose freed arenas stayed in the process), and the
    # arrays still read back exactly, by position, by value and whole
    import tracemalloc

    path = tmp_path / "vocab.gguf"
    tokens = [f"tok-{i:06d}-é" for i in range(200_000)]
    merges = [f"a{i} b{i}" for i in range(100_000)]
    metadata = {
        "tokenizer.ggml.tokens": (tokens, "ARRAY[STRING]"),
        "tokenizer.ggml.merges": (merges, "ARRAY[STRING]"),
    }
    write_gguf(path, metadata, {"w": np.ones(4, np.float32)})
    tracemalloc.start()
    try:
        f = GGUFFile(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak  # the strings alone: > 16 MB
    with f:
        t, m = f.metadata["tokenizer.ggml.tokens"], f.metadata["tokenizer.ggml.merges"]
        assert isinstance(t, StringArray) and f.types["tokenizer.ggml.tokens"] == "ARRAY[STRING]"
        assert len(t) == 200_000 and t._items is None
        assert t.index("tok-123456-é") == 123_456 and "tok-199999-é" in t and "tok-200000-é" not in t
        assert t._items is None  # (index compares bytes)
        assert list(m) == merges and t == tokens and t[-1] == tokens[-1] and t[5:7] == tokens[5:7]
        # written back, the array is the same bytes
        again = tmp_path / "again.gguf"
        write_gguf(again, {k: (f.metadata[k], f.types[k]) for k in metadata}, {"w": np.ones(4, np.float32)})
    assert again.read_bytes() == path.read_bytes()


def test_a_bad_string_in_a_big_array_fails_at_open_and_a_changed_file_when_read(tmp_path):
    path = tmp_path / "v.gguf"
    write_gguf(
        path, {"tokenizer.ggml.tokens": (["ab", "cd", "ef"], "ARRAY[STRING]")}, {"w": np.ones(4, np.float32)}
    )
    raw = path.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(raw.replace(b"cd", b"c\xff"))
    with pytest.raises(
        GGUFError, match=r"bad.gguf: metadata 'tokenizer.ggml.tokens'\[1\] is not valid UTF-8"
    ):
        GGUFFile(bad)
    f = GGUFFile(path)
    tokens = f.metadata["tokenizer.ggml.tokens"]
    path.write_bytes(
        raw.replace(b"\x02\x00\x00\x00\x00\x00\x00\x00cd", b"\xff\x00\x00\x00\x00\x00\x00\x00cd")
    )
    with pytest.raises(GGUFError, match=r"v.gguf: metadata 'tokenizer.ggml.tokens'\[1\] runs past the array"):
        list(tokens)
    path.write_bytes(raw[:40])
    with pytest.raises(GGUFError, match="v.gguf: metadata 'tokenizer.ggml.tokens' is cut short"):
        tokens.index("ef")
    f.close()


def test_doc_example_bytes(tmp_path):
    path = tmp_path / "x.gguf"
    write_gguf(path, {"a": (7, "UINT32")}, {"x": np.array([1.0, 2.0], np.float32)})
    raw = path.read_bytes()
    assert raw[:8] == b"GGUF\x03\x00\x00\x00"
    assert struct.unpack("<QQ", raw[8:24]) == (1, 1)
    assert raw[24:41] == struct.pack("<Q", 1) + b"a" + struct.pack("<II", 4, 7)  # key "a", UINT32, 7
    # the data section starts at 96 (the 73-byte header padded to 32); the tensor is padded to 32 as llama.cpp does
    assert len(raw) == 128 and raw[96:104] == np.array([1.0, 2.0], np.float32).tobytes()


# ------------------------------------------------------------------------------------------ hostile files


def header(n_tensors=0, n_kv=0, version=3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def s(text: str) -> bytes:
    return struct.pack("<Q", len(text.encode())) + text.encode()


def tensor_info(name="w", dims=(4,), ggml_type=0, offset=0) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def padded(raw: bytes) -> bytes:
    return raw + b"\0" * (-len(raw) % 32)


HOSTILE = {
    "bad magic": (b"GGML" + b"\0" * 40, "not a GGUF file"),
    "version": (header(version=9) + b"\0" * 8, "version 9"),
    "huge counts": (header(n_tensors=2**60, n_kv=1), "more than"),
    "huge string": (header(n_kv=1) + struct.pack("<Q", 2**62) + b"abc", "metadata key #0 claims"),
    "truncated string": (header(n_kv=1) + struct.pack("<Q", 10) + b"abc", "claims 10 bytes"),
    "unknown value type": (
        header(n_kv=1) + s("k") + struct.pack("<I", 99) + b"\0" * 16,
        "unknown value type 99",
    ),
    "huge array": (
        header(n_kv=1) + s("k") + struct.pack("<IIQ", 9, 4, 2**50) + b"\0" * 8,
        "claims 1125899906842624 UINT32 elements",
    ),
    "bad utf8": (
        header(n_kv=1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 7) + b"\0" * 9,
        "UTF-8",
    ),
    "bad bool": (header(n_kv=1) + s("k") + struct.pack("<I", 7) + b"\x05" + b"\0" * 9, "must be 0 or 1"),
    "duplicate key": (header(n_kv=2) + (s("k") + struct.pack("<IB", 0, 1)) * 2 + b"\0" * 9, "appears twice"),
    "bad alignment": (
        header(n_kv=1) + s("general.alignment") + struct.pack("<II", 4, 3) + b"\0" * 9,
        "power of two",
    ),
    "too many dims": (header(n_tensors=1) + tensor_info(dims=(1, 1, 1, 1, 1)) + b"\0" * 8, "5 dimensions"),
    "zero dim": (padded(header(n_tensors=1) + tensor_info(dims=(0,))) + b"\0" * 16, "must all be positive"),
    "unknown ggml type": (
        padded(header(n_tensors=1) + tensor_info(ggml_type=77)) + b"\0" * 16,
        "unknown ggml type 77",
    ),
    "unsupported ggml type": (
        padded(header(n_tensors=1) + tensor_info(ggml_type=2, dims=(32,))) + b"\0" * 32,
        "Q4_0",
    ),
    "partial block": (
        padded(header(n_tensors=1) + tensor_info(ggml_type=8, dims=(33,))) + b"\0" * 64,
        "whole 32",
    ),
    "lying offset": (
        padded(header(n_tensors=1) + tensor_info(offset=2**40)) + b"\0" * 16,
        "truncated or lying",
    ),
    "misaligned": (padded(header(n_tensors=1) + tensor_info(offset=4)) + b"\0" * 64, "not a multiple"),
    "huge dims": (
        padded(header(n_tensors=1) + tensor_info(dims=(2**40, 2**40))) + b"\0" * 16,
        "truncated or lying",
    ),
    "overlap": (
        padded(header(n_tensors=2) + tensor_info("a", dims=(16,)) + tensor_info("b", dims=(8,), offset=32))
        + b"\0" * 128,
        "overlap",
    ),
    "duplicate tensor": (
        padded(header(n_tensors=2) + tensor_info("a") + tensor_info("a", offset=32)) + b"\0" * 64,
        "appears twice",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_files_fail_with_one_line_naming_file_and_field(tmp_path, case):
    raw, fragment = HOSTILE[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with pytest.raises(GGUFError) as err:
        GGUFFile(path)
    message = str(err.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_every_truncation_of_a_real_file_is_a_gguf_error(tmp_path):
    path = tmp_path / "s.gguf"
    sample_file(path)
    raw = path.read_bytes()
    with GGUFFile(path) as f:
        end = max(t.offset + t.nbytes for t in f.tensors.values())  # after it, only the last tensor's padding
    cut = tmp_path / "cut.gguf"
    for n in sorted({*range(0, 400, 7), *range(end - 300, end, 13)}):
        cut.write_bytes(raw[:n])
        with pytest.raises(GGUFError, match="cut.gguf"):
            GGUFFile(cut)


def test_random_byte_flips_never_crash(tmp_path):
    path = tmp_path / "s.gguf"
    sample_file(path)
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(3)
    bad = tmp_path / "flip.gguf"
    header_end = GGUFFile(path).data_start
    for _ in range(200):
        flipped = bytearray(raw)
        for i in rng.integers(0, header_end, 3):
            flipped[i] = rng.integers(0, 256)
        bad.write_bytes(bytes(flipped))
        try:
            GGUFFile(bad).close()
        except GGUFError:
            pass


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(GGUFError, match="cannot open GGUF file"):
        GGUFFile(tmp_path / "none.gguf")


# ------------------------------------------------------------------------------------------ models


def test_llama_cpp_q4_k_m_mix_rule():
    # the peer's Q4_K_M of the 28-layer Qwen3-0.6B: token_embd (tied head) and 14 layers' attn_v and ffn_down Q6_K
    assert sum(use_more_bits(i, 28) for i in range(28)) == 14
    config = tinyqwen.load_model(FIXTURES / "dense-tied").config
    assert tensor_type("token_embd.weight", (512, 256), config, "q4_k_m") == "Q6_K"
    assert (
        tensor_type("blk.1.attn_v.weight", (256, 256), config, "q4_k_m") == "Q6_K"
    )  # 2 layers: the last one
    assert tensor_type("blk.0.attn_v.weight", (256, 256), config, "q4_k_m") == "Q4_K"
    assert tensor_type("blk.0.attn_q.weight", (256, 256), config, "q4_k_m") == "Q4_K"
    assert (
        tensor_type("blk.0.attn_q.weight", (256, 64), config, "q4_k_m") == "Q8_0"
    )  # rows not whole super-blocks
    assert tensor_type("blk.0.attn_norm.weight", (256,), config, "q4_k_m") == "F32"


def dense_256(tmp_path) -> Path:
    """A tiny dense model whose rows are whole Q4_K super-blocks (hidden 256, ffn 512), with a small vocabulary."""
    return write_tiny_qwen3(
        tmp_path / "dense", seed=1, scale=0.3, with_tokenizer=False, hidden_size=256, intermediate_size=512,
        head_dim=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=512, bos_token_id=None,
        eos_token_id=511,
    )  # fmt: skip


def dequantized_twin(gguf_path: Path, folder: Path, tmp_path: Path) -> Path:
    """A safetensors checkpoint holding exactly the GGUF file's values (its blocks widened), beside the config."""
    from tinyqwen.gguf_checkpoint import GGUFCheckpoint

    twin = tmp_path / (gguf_path.stem + "-twin")
    shutil.copytree(folder, twin)
    (twin / "model.safetensors").unlink()
    with GGUFCheckpoint(gguf_path) as ck:
        tensors = {}
        for name in ck.keys():
            value = ck.get(name)
            tensors[name] = value.dequantize() if isinstance(value, QuantizedTensor) else np.array(value)
    save_file(tensors, twin / "model.safetensors")
    return twin


@pytest.mark.parametrize("target", ["f32", "bf16", "q8_0", "q4_k_m"])
def test_dense_gguf_logits_are_its_weights_logits(tmp_path, target):
    folder = dense_256(tmp_path)
    path = tmp_path / f"m-{target}.gguf"
    counts = quantize_checkpoint(folder, target, path)
    model = tinyqwen.load_model(path)
    reference = tinyqwen.load_model(folder)
    assert model.config.hidden_size == 256 and model.config.tie_word_embeddings
    assert model.config.vocab_size == 512 and model.config.num_key_value_heads == 2
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    logits = model(ids)
    if target == "f32":
        assert np.array_equal(logits, reference(ids))  # the same bytes, the same kernels: bit-identical
        return
    if target == "q4_k_m":
        assert counts == {
            "F32": 9,
            "Q4_K": 12,
            "Q6_K": 3,
        }  # the tied head, attn_v and ffn_down of the last layer
        assert isinstance(model.weights.layers[0].attn.q_proj, QuantizedTensor)
    # bit-identical to a float model holding the widened blocks: the numpy reference widens them exactly so
    twin = tinyqwen.load_model(dequantized_twin(path, folder, tmp_path))
    assert np.array_equal(logits, twin(ids))
    # each matrix near the original: relative RMS error of a Gaussian's blocks, measured 0.0054 (Q8_0), 0.0717
    # (Q4_K), 0.0178 (Q6_K) and bounded with ~10% margin, so a wrong scale, offset or nibble order fails
    from tinyqwen.checkpoint import Checkpoint
    from tinyqwen.gguf_checkpoint import GGUFCheckpoint

    bound = {"q8_0": 0.006, "q4_k": 0.08, "q6_k": 0.02}
    with GGUFCheckpoint(path) as ck, Checkpoint(folder) as original:
        for name in original.keys():
            value, x = ck.get(name), original.get(name)
            if isinstance(value, QuantizedTensor):
                err = np.sqrt(np.mean((value.dequantize() - x) ** 2)) / x.std()
                assert err < bound[value.qtype], (name, value.qtype, err)
    # and the logits near the unquantized model's. These random 0.3-scale weights amplify errors through the
    # layers, so the bounds (measured bf16 0.012, q8_0 0.028, q4_k_m 0.25 of the largest logit, ~1.5x margin)
    # catch a broken path, not rank the formats
    err = np.abs(logits - reference(ids)).max() / np.abs(reference(ids)).max()
    assert err < {"bf16": 0.02, "q8_0": 0.045, "q4_k_m": 0.4}[target], err


@pytest.mark.parametrize("target", ["f32", "q8_0"])
def test_moe_gguf_keeps_experts_stacked_in_blocks(tmp_path, target):
    folder = FIXTURES / "moe-norm-topk"
    path = tmp_path / "moe.gguf"
    quantize_checkpoint(folder, target, path)
    model = tinyqwen.load_model(path)
    reference = tinyqwen.load_model(folder)
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    assert model.config.moe_intermediate_size == 32 and model.config.norm_topk_prob
    assert not model.config.tie_word_embeddings
    ids = np.arange(12)[None] * 37 % 512
    if target == "f32":
        assert np.array_equal(model(ids), reference(ids))
        return
    mlp = model.weights.layers[0].mlp
    assert isinstance(mlp.gate_proj, QuantizedTensor) and mlp.gate_proj.shape == (8, 32, 64)
    assert not isinstance(mlp.router, QuantizedTensor)  # llama.cpp never quantizes the router
    twin = tinyqwen.load_model(dequantized_twin(path, folder, tmp_path))
    assert np.array_equal(model(ids), twin(ids))


def test_gguf_tokenizer_matches_the_official_one(tmp_path):
    from tests.tokenizer_corpus import code_text, mixed_documents
    from tinyqwen.tokenizer import Tokenizer

    folder = write_tiny_qwen3(tmp_path / "tiny")
    path = tmp_path / "tiny.gguf"
    quantize_checkpoint(folder, "f32", path)
    ours, official = Tokenizer.from_gguf(path), Tokenizer.from_pretrained(folder)
    assert len(ours) == len(official) and ours.eos_token_id == official.eos_token_id
    assert ours.pad_token_id == official.pad_token_id
    texts = [
        *mixed_documents(60_000, seed=1),
        code_text(5_000),
        "<|im_start|>user\n<think>Hi</think><|im_end|>",
    ]
    for text in texts:
        assert ours.encode(text) == official.encode(text), text[:60]
    # the independent vectors: llama.cpp's own for its qwen2 vocabulary, and transformers'
    data = Path(__file__).parent / "data"
    inp = (
        (data / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    )
    out = (data / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inp) == len(out) == 46
    for text, ids in zip(inp, out, strict=True):
        assert ours.encode(text) == [int(x) for x in ids.split()], text
    for case in json.loads((data / "hf_transformers_vectors.json").read_text(encoding="utf-8"))["encode"]:
        assert ours.encode(case["text"]) == case["ids"] and ours.decode(case["ids"]) == case["decoded"]
    with GGUFFile(path) as f:
        assert f.metadata["tokenizer.ggml.pre"] == "qwen2"
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 151936
        # the template travels as the checkpoint's tokenizer_config.json has it: the one tinyqwen's
        # chat_template.py spells out branch by branch (checked against transformers in test_chat_template.py)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert f.metadata["tokenizer.chat_template"] == config["chat_template"]
    # replies end where llama.cpp ends them: eos <|im_end|> and <|endoftext|>, generation_config.json's pair
    assert tinyqwen.load_model(path).generation_config == {"eos_token_id": [151645, 151643]}


def test_loading_a_gguf_model_makes_no_token_string(tmp_path, monkeypatch):
    # load_model reads the config, the weights and the end-of-reply ids from the metadata: the 151,936 token
    # strings and the merges stay in the file until the tokenizer is built from it
    from tinyqwen.tokenizer import Tokenizer

    path = tmp_path / "tiny.gguf"
    quantize_checkpoint(write_tiny_qwen3(tmp_path / "tiny"), "q8_0", path)

    def made(self):
        raise AssertionError(f"{self.what} was made into strings")

    with monkeypatch.context() as m:
        m.setattr(StringArray, "__iter__", made)
        model = tinyqwen.load_model(path, backend="numpy")
        assert model.generation_config == {"eos_token_id": [151645, 151643]}
        assert model(np.array([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)
    tok = Tokenizer.from_gguf(path)  # (the strings, now: the tokenizer is asked for)
    assert tok.decode(tok.encode("Hello, world")) == "Hello, world"


def test_cli_runs_a_gguf_file(tmp_path, capsys):
    from tinyqwen.cli import main

    folder = dense_256(tmp_path)
    path = tmp_path / "m.gguf"
    assert main(["quantize", str(folder), "--to", "q4_k_m", str(path)]) == 0
    assert main(["info", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q4_K" in out and "bits per weight" in out and "resident" in out
    # verify's reference is transformers on a checkpoint folder: a GGUF file is told so in one line
    assert main(["verify", "--model", str(path)]) != 0
    err = capsys.readouterr().err
    assert (
        "verify compares with transformers" in err
        and "GGUF file" in err
        and len(err.strip().splitlines()) == 1
    )


@pytest.mark.parametrize("fixture", ["moe-norm-topk", "dense-tied", "with-tokenizer"])
def test_quantize_takes_a_gguf_file(tmp_path, fixture):
    """`tinyqwen quantize X.gguf`: an F32 GGUF of a checkpoint quantizes to the very bytes the checkpoint itself
    does (F32 holds the weights exactly), tokenizer keys copied as they are; the source is never overwritten."""
    from tinyqwen.cli import main

    folder = write_tiny_qwen3(tmp_path / "tok", seed=1) if fixture == "with-tokenizer" else FIXTURES / fixture
    f32, direct, via = tmp_path / "m-f32.gguf", tmp_path / "direct.gguf", tmp_path / "via.gguf"
    quantize_checkpoint(folder, "f32", f32)
    quantize_checkpoint(folder, "q8_0", direct)
    assert main(["quantize", str(f32), "--to", "q8_0", str(via)]) == 0
    a, b = GGUFFile(direct), GGUFFile(via)
    assert list(a.tensors) == list(b.tensors)
    for name in a.tensors:
        assert a.tensors[name].ggml_type == b.tensors[name].ggml_type
        assert np.array_equal(np.asarray(a.raw(name)), np.asarray(b.raw(name))), name
    tokenizer_keys = [k for k in a.metadata if k.startswith("tokenizer.")]
    assert bool(tokenizer_keys) == (fixture == "with-tokenizer")
    for k in tokenizer_keys:
        assert (
            np.array_equal(np.asarray(a.metadata[k]), np.asarray(b.metadata[k])) and a.types[k] == b.types[k]
        )
    before = f32.read_bytes()
    with pytest.raises(TinyQwenError, match="would overwrite the file being read"):
        quantize_checkpoint(f32, "q8_0", f32)
    assert f32.read_bytes() == before


def test_info_predicts_the_full_models_rss_from_a_truncated_file(tmp_path, capsys):
    """A 2-layer q4_k_m file predicts the weights of the same model with 4 layers byte for byte: per layer tensor
    bytes × 4, the _M mix's Q6_K layers (attn_v, ffn_down) re-chosen by use_more_bits for 4 layers."""
    from tinyqwen.cli import main
    from tinyqwen.cli.info import NUMBA_RUNTIME_BYTES, predict_rss

    paths = {}
    for layers in (2, 4):
        paths[layers] = tmp_path / f"moe-{layers}.gguf"
        quantize_checkpoint(moe_k_quants(tmp_path, layers), "q4_k_m", paths[layers])
    with GGUFFile(paths[4]) as f:
        full = sum(t.nbytes for t in f.tensors.values() if t.name != "token_embd.weight")
        types = {t.name: t.ggml_type for t in f.tensors.values()}
    assert types["blk.2.ffn_down_exps.weight"] == "Q6_K" and types["blk.1.ffn_down_exps.weight"] == "Q4_K"
    got = predict_rss(paths[2], context=100, layers=4)
    assert got["weights"] == full
    assert predict_rss(paths[4], context=100)["weights"] == full
    assert got["kv_cache"] == 100 * 2 * 4 * 2 * 64 * 2  # context · K,V · layers · kv heads · head_dim · bf16
    assert 0 < got["embedding"] <= 100 * (256 // 256 * 144 + 4096)  # the rows read, not the 512-row table
    assert (
        got["total"] == full + got["embedding"] + got["kv_cache"] + got["activations"] + NUMBA_RUNTIME_BYTES
    )
    assert main(["info", "--model", str(paths[2]), "--layers", "4", "--context", "100"]) == 0
    assert "numba RSS    about" in capsys.readouterr().out
    assert main(["info", "--model", str(paths[2]), "--as-config", "Qwen3-30B-A3B"]) == 0
    assert "for 48 layers and a 4,096-token context" in capsys.readouterr().out
    assert main(["info", "--model", str(paths[2]), "--as-config", "nope"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--as-config: nope is neither a config.json nor a published model" in err[0]


def test_gguf_that_is_not_qwen3_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, {"general.architecture": "llama"}, {"token_embd.weight": np.zeros((4, 8), np.float32)})
    with pytest.raises(TinyQwenError, match="general.architecture is 'llama'"):
        tinyqwen.load_model(path)


def moe_k_quants(tmp_path, layers: int = 2) -> Path:
    """A tiny MoE checkpoint whose rows are whole Q4_K super-blocks (hidden 256, 4 experts of width 256), random
    float32 weights: q4_k_m gives it Q4_K and Q6_K expert stacks."""
    from tinyqwen.config import config_from_dict, expected_tensors

    config = json.loads((FIXTURES / "moe-norm-topk" / "config.json").read_text())
    config.update(
        hidden_size=256, moe_intermediate_size=256, intermediate_size=512, head_dim=64, num_experts=4
    )
    config.update(num_hidden_layers=layers, max_window_layers=layers)
    folder = tmp_path / ("moe" if layers == 2 else f"moe-{layers}")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    tensors = {
        name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.1 * rng.standard_normal(shape))
        for name, shape in expected_tensors(config_from_dict(config)).items()
    }
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, folder / "model.safetensors")
    return folder


def test_moe_gguf_in_k_quants(tmp_path):
    """A MoE whose rows are whole super-blocks: expert stacks in Q4_K (ffn_down_exps Q6_K in the last layer, the
    one use_more_bits picks of two), the router in F32, logits equal to the widened weights' model."""
    folder = moe_k_quants(tmp_path)
    path = tmp_path / "moe.gguf"
    counts = quantize_checkpoint(folder, "q4_k_m", path)
    # untied: token_embd Q4_K, output Q6_K; per layer q/k/o and the gate/up stacks Q4_K, v and the down stack
    # Q6_K in layer 1 only; 5 norms/router per layer and output_norm F32
    assert counts == {"F32": 11, "Q4_K": 13, "Q6_K": 3}
    model = tinyqwen.load_model(path)
    mlp = model.weights.layers[1].mlp
    assert mlp.gate_proj.qtype == "q4_k" and mlp.gate_proj.shape == (4, 256, 256)
    assert mlp.down_proj.qtype == "q6_k" and model.weights.layers[0].mlp.down_proj.qtype == "q4_k"
    ids = np.arange(10)[None] * 41 % 512
    twin = tinyqwen.load_model(dequantized_twin(path, folder, tmp_path))
    assert np.array_equal(model(ids), twin(ids))
