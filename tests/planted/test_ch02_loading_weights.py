"""Planted mistakes for chapter 2: classic loader bugs, injected into the solutions, fail with the intended hint."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from exercises import test_ch02_loading_weights as grading
from exercises.solutions import ch02_loading_weights as good


def header_length_as_start(path):
    header, data_start = good.read_header(path)
    return header, data_start - 8  # returns N, forgetting the 8 length bytes


def bf16_by_value(u16):
    return np.asarray(u16).astype(np.float32)  # converts the integer instead of reinterpreting the bits


def offsets_from_file_start(path, name):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    t = json.loads(raw[8 : 8 + n])[name]
    start, end = t["data_offsets"]  # BUG: should be 8 + n + start
    dtype = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8"}[t["dtype"]]
    array = np.frombuffer(raw[start:end], dtype=dtype).reshape(t["shape"])
    if t["dtype"] == "BF16":
        return good.bf16_to_float32(array)
    return array.astype(np.float32) if t["dtype"] == "F16" else array


def map_by_reading(path, name):
    return np.array(good.map_tensor(path, name))  # a copy: does not follow the file


def first_shard_only(directory):
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return good.load_checkpoint(directory)
    first = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    header, _ = good.read_header(directory / first)
    return {n: good.read_tensor(directory / first, n) for n in header if n != "__metadata__"}


def head_dim_from_hidden(config):
    config = dict(config, head_dim=config["hidden_size"] // config["num_attention_heads"])
    return good.expected_shapes(config)


def every_layer_sparse(config):
    if config.get("model_type") == "qwen3_moe":
        config = dict(config, decoder_sparse_step=1, mlp_only_layers=[])
    return good.expected_shapes(config)


def test_header_length_is_not_data_start(solutions, assert_caught):
    assert_caught(grading.test_read_header, solutions.with_overrides("ch02", read_header=header_length_as_start),
                  hint="the header's length")  # fmt: skip


def test_bf16_converted_by_value(solutions, assert_caught):
    assert_caught(grading.test_bf16_to_float32, solutions.with_overrides("ch02", bf16_to_float32=bf16_by_value),
                  hint="reinterpret")  # fmt: skip


def test_offsets_from_file_start(solutions, assert_caught):
    buggy = solutions.with_overrides("ch02", read_tensor=offsets_from_file_start)
    assert_caught(grading.test_read_tensor, buggy, hint="counted from the start of the file")
    assert_caught(
        grading.test_read_tensor_in_checkpoint_files, buggy, hint="counted from the start of the file"
    )


def test_map_tensor_copies(solutions, assert_caught):
    assert_caught(grading.test_map_tensor, solutions.with_overrides("ch02", map_tensor=map_by_reading),
                  hint="a copy of the bytes")  # fmt: skip


def test_only_first_shard(solutions, assert_caught):
    buggy = solutions.with_overrides("ch02", load_checkpoint=first_shard_only)
    assert_caught(grading.test_load_sharded, buggy, hint="only one shard was read")


def test_head_dim_derived(solutions, assert_caught):
    buggy = solutions.with_overrides("ch02", expected_shapes=head_dim_from_hidden)
    assert_caught(grading.test_expected_shapes_dense, buggy, hint="head_dim computed as hidden_size")


def test_every_layer_sparse(solutions, assert_caught):
    buggy = solutions.with_overrides("ch02", expected_shapes=every_layer_sparse)
    assert_caught(grading.test_expected_shapes_moe, buggy, hint="every layer was made sparse")
