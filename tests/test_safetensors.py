"""Tests for tinyqwen.safetensors: the byte layout, bf16 rounding, validation of hostile files, checkpoints.

Expected bytes and bit patterns are derived by hand in the comments; the official `safetensors` package (a dev
dependency) is the reference for everything else. The torch tests are `crosscheck` only.
"""

import json
import mmap
import struct
import time
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy as official

from tinyqwen.bf16 import bf16_to_float32, float32_to_bf16
from tinyqwen.checkpoint import Checkpoint
from tinyqwen.errors import CheckpointError, SafetensorsError
from tinyqwen.safetensors import (
    DTYPES,
    MAX_HEADER_BYTES,
    SafetensorsFile,
    TensorInfo,
    load_file,
    read_header,
    save_file,
)


def write_raw(path, header, data=b"", length=None):
    """A safetensors file from parts: `header` as a dict (JSON-encoded) or raw bytes, and an optional lying length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def f32(name, n, start):
    return {name: {"dtype": "F32", "shape": [n], "data_offsets": [start, start + 4 * n]}}


def bits(values):  # float32 values -> their uint32 bit patterns
    return np.array(values, dtype=np.float32).view(np.uint32)


def from_bits(patterns):  # uint32 bit patterns -> float32 values
    return np.array(patterns, dtype=np.uint32).view(np.float32)


# --- the byte layout -------------------------------------------------------------------------------------------


def test_worked_example_bytes(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"x": np.array([1.0, 2.0], dtype=np.float32)}, path)
    header = b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'  # 54 bytes, padded to 56
    assert len(header) == 54
    expected = (
        b"\x38\0\0\0\0\0\0\0" + header + b"  " + b"\0\0\x80\x3f" + b"\0\0\0\x40"
    )  # 1.0, 2.0 little-endian
    assert path.read_bytes() == expected
    tensors, metadata = read_header(path)
    assert tensors == {"x": TensorInfo("x", "F32", (2,), 64, 72)}  # absolute positions: 8 + 56 + [0, 8)
    assert metadata == {}


def test_bf16_bytes_by_hand(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": np.array([1.0, -2.0], dtype=np.float32)}, path, bf16=True)
    header = b'{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'  # 55 bytes, padded to 56
    assert path.read_bytes() == b"\x38" + b"\0" * 7 + header + b" " + b"\x80\x3f\x00\xc0"  # 0x3F80, 0xC000
    with SafetensorsFile(path) as f:
        assert f.raw("w").dtype == np.uint16 and f.raw("w").tolist() == [0x3F80, 0xC000]
        np.testing.assert_array_equal(f.get("w"), np.array([1.0, -2.0], dtype=np.float32))
        assert f.get("w").dtype == np.float32


def test_reading_a_hand_built_file_with_metadata_and_unsorted_offsets(tmp_path):
    header = {"__metadata__": {"format": "pt"}, **f32("b", 1, 4), **f32("a", 1, 0)}
    path = write_raw(tmp_path / "h.safetensors", header, struct.pack("<ff", 3.0, 5.0))
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        assert f.get("a").tolist() == [3.0] and f.get("b").tolist() == [5.0]


SAMPLES = {
    "F64": np.array([[1.5, -2.25], [1e300, -0.0]], dtype=np.float64),
    "F32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "F16": np.array([0.5, -65504.0, 6e-8], dtype=np.float16),
    "C64": np.array([1 + 2j, -3.5j], dtype=np.complex64),
    "I64": np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    "I32": np.array([[-(2**31)], [7]], dtype=np.int32),
    "I16": np.array([-32768, 32767], dtype=np.int16),
    "I8": np.array([-128, 127], dtype=np.int8),
    "U64": np.array([2**64 - 1], dtype=np.uint64),
    "U32": np.array([2**32 - 1], dtype=np.uint32),
    "U16": np.array([65535, 1], dtype=np.uint16),
    "U8": np.array([0, 255], dtype=np.uint8),
    "BOOL": np.array([[True, False, True]]),
}


@pytest.mark.parametrize("dtype_name", sorted(SAMPLES))
def test_round_trip_every_dtype(tmp_path, dtype_name):
    array = SAMPLES[dtype_name]
    tensors = {
        "t": array,
        "scalar": array.reshape(-1)[:1].reshape(()),
        "empty": array.reshape(-1)[:0].reshape(0, 2),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    for name, value in load_file(path).items():
        assert read_header(path)[0][name].dtype == dtype_name
        assert value.shape == tensors[name].shape
        expected = (
            tensors[name].astype(np.float32) if dtype_name == "F16" else tensors[name]
        )  # F16 is widened
        assert value.dtype == expected.dtype
        np.testing.assert_array_equal(value, expected)


def test_every_dtype_has_its_size():
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "C64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1}
    sizes |= {"U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
    assert {name: dtype.itemsize for name, dtype in DTYPES.items()} == sizes


def test_big_endian_and_non_contiguous_input_are_written_correctly(tmp_path):
    path = tmp_path / "t.safetensors"
    big = np.array([1.0, 2.0, 3.0], dtype=">f4")
    strided = np.arange(12, dtype=np.int32).reshape(3, 4).T  # Fortran order: must be written in C order
    save_file({"big": big, "strided": strided}, path)
    out = load_file(path)
    np.testing.assert_array_equal(out["big"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(out["strided"], strided)


# --- bfloat16 ----------------------------------------------------------------------------------------------------


def test_bf16_to_float32_known_patterns():
    patterns = np.array([0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x3E80, 0x0001], dtype=np.uint16)
    out = bf16_to_float32(patterns)
    assert out.dtype == np.float32
    # widening = the 16 bits in the high half: 0x3F80 -> 0x3F800000 = 1.0, 0x3E80 -> 0x3E800000 = 0.25, ...
    assert out.view(np.uint32).tolist() == [p << 16 for p in patterns.tolist()]
    assert out[:7].tolist() == [1.0, -2.0, 0.0, -0.0, np.inf, -np.inf, 0.25]
    assert out[7] == 2.0**-133  # smallest bf16 subnormal: mantissa 1 of 7 bits, exponent -126
    assert np.isnan(bf16_to_float32(np.array([0x7FC0, 0xFFC1], dtype=np.uint16))).all()


def test_float32_to_bf16_rounds_to_nearest_even():
    cases = {
        0x3F800000: 0x3F80,  # 1.0
        0xC0000000: 0xC000,  # -2.0
        0x3F807FFF: 0x3F80,  # just below the halfway point: down
        0x3F808000: 0x3F80,  # exactly halfway between 0x3F80 and 0x3F81: to the even 0x3F80
        0x3F808001: 0x3F81,  # just above halfway: up
        0x3F818000: 0x3F82,  # halfway between 0x3F81 and 0x3F82: to the even 0x3F82
        0xBF818000: 0xBF82,  # the same, negative
        0x3F80FFFF: 0x3F81,
        0x3FFFFFFF: 0x4000,  # carry ripples into the exponent: 1.99999... -> 2.0
        0x7F7FFFFF: 0x7F80,  # float32 max rounds up past bf16 max: +inf
        0x7F7F7FFF: 0x7F7F,  # but just below the midpoint stays finite (bf16 max)
        0x7F800000: 0x7F80,  # +inf
        0xFF800000: 0xFF80,  # -inf
        0x80000000: 0x8000,  # -0.0 keeps its sign
        0x00008000: 0x0000,  # tiny subnormal, a tie with 0: to even 0
        0x00018000: 0x0002,  # subnormal tie between 1 and 2: to even 2
    }
    out = float32_to_bf16(from_bits(list(cases)))
    assert out.dtype == np.uint16
    assert [hex(v) for v in out.tolist()] == [hex(v) for v in cases.values()]


def test_float32_to_bf16_keeps_nan_a_nan():
    # 0x7F800001 is a signalling NaN: plain truncation would give 0x7F80 = inf. And 0xFFFFFFFF + 0x7FFF would
    # overflow a uint32. Both must stay NaN (canonical quiet NaN, sign kept).
    out = float32_to_bf16(from_bits([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0xFF800001]))
    assert out.tolist() == [0x7FC0, 0x7FC0, 0xFFC0, 0xFFC0]
    assert np.isnan(bf16_to_float32(out)).all()


def test_float32_to_bf16_shapes_and_scalars():
    assert float32_to_bf16(np.float32(1.0)).shape == () and int(float32_to_bf16(np.float32(1.0))) == 0x3F80
    assert float32_to_bf16(np.float32(np.nan)) == 0x7FC0  # 0-d NaN: no overflow warning, no crash
    assert float32_to_bf16(np.zeros((2, 0, 3), np.float32)).shape == (2, 0, 3)
    assert float32_to_bf16(np.ones((2, 3), np.float64)).tolist() == [[0x3F80] * 3] * 2


def test_every_bf16_value_survives_a_round_trip():
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = bf16_to_float32(patterns)
    keep = ~np.isnan(widened)
    assert keep.sum() == 65536 - 2 * 127  # 2 signs x (2**7 - 1) non-zero mantissas with exponent 0xFF
    np.testing.assert_array_equal(float32_to_bf16(widened)[keep], patterns[keep])


# --- cross-checks against the official safetensors package ---------------------------------------------------


def test_reads_files_written_by_the_official_package(tmp_path):
    path = tmp_path / "official.safetensors"
    tensors = {f"{name.lower()}.weight": value for name, value in SAMPLES.items()}
    tensors["zero_d"] = np.array(3, dtype=np.int64)
    official.save_file(tensors, str(path), metadata={"format": "np", "ünï": "cödé"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "np", "ünï": "cödé"}
        assert set(f.keys()) == set(tensors)
        for name, value in tensors.items():
            np.testing.assert_array_equal(f.get(name), value)
            assert f.get(name).shape == value.shape


def test_official_package_reads_our_files(tmp_path):
    path = tmp_path / "ours.safetensors"
    tensors = {f"{name.lower()}.w": value for name, value in SAMPLES.items()} | {
        "e": np.zeros((0, 3), np.float32)
    }
    save_file(tensors, path, metadata={"format": "pt"})
    back = official.load_file(str(path))
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


def test_our_writer_is_byte_identical_to_the_official_one(tmp_path):
    tensors = {f"b.{name}": value for name, value in SAMPLES.items()}
    tensors |= {"a.scalar": np.float32(2.5), "zz": np.ones((2, 2), np.float32), "ünicode": np.int8([1])}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    for metadata in (None, {}, {"format": "pt"}):
        save_file(tensors, ours, metadata=metadata)
        official.save_file({k: np.asarray(v) for k, v in tensors.items()}, str(theirs), metadata=metadata)
        assert ours.read_bytes() == theirs.read_bytes()
    # With several metadata keys the official order is a Rust HashMap's (arbitrary); ours is sorted. Same content:
    metadata = {"format": "pt", "b": "two", "a": "ü"}
    save_file(tensors, ours, metadata=metadata)
    official.save_file({k: np.asarray(v) for k, v in tensors.items()}, str(theirs), metadata=metadata)
    assert read_header(ours) == read_header(theirs)
    assert ours.stat().st_size == theirs.stat().st_size


# Small malformed (and odd-but-valid) files: ours and the official reader must agree on accept vs reject.
AGREEMENT = {
    "hole": ({**f32("a", 1, 0), **f32("b", 1, 8)}, 12, False),
    "trailing bytes": (f32("a", 1, 0), 8, False),
    "overlap": ({**f32("a", 2, 0), **f32("b", 1, 4)}, 8, False),
    "first tensor not at 0": (f32("a", 1, 4), 8, False),
    "size mismatch": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, 4, False),
    "offsets out of order": ({**f32("a", 1, 4), **f32("b", 1, 0)}, 8, True),
    "empty header": ({}, 0, True),
    "zero-size tensors anywhere": (
        {**f32("a", 1, 0), **f32("z", 0, 4), **f32("y", 0, 0), **f32("b", 1, 4), **f32("x", 0, 8)},
        8,
        True,
    ),
    "null metadata": ({"__metadata__": None, **f32("a", 1, 0)}, 4, True),
    "extra entry field": ({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "extra": 1}}, 4, True),
}


@pytest.mark.parametrize("case", sorted(AGREEMENT))
def test_accepts_and_rejects_like_the_official_reader(tmp_path, case):
    header, data_size, valid = AGREEMENT[case]
    path = write_raw(tmp_path / "case.safetensors", header, b"\0" * data_size)
    try:
        official.load_file(str(path))
        official_valid = True
    except Exception:
        official_valid = False
    assert official_valid == valid
    if valid:
        load_file(path)
    else:
        with pytest.raises(SafetensorsError, match="case.safetensors"):
            load_file(path)


# --- validation of untrusted files, one problem at a time -------------------------------------------------------


def expect_error(path, *fragments):
    with pytest.raises(SafetensorsError) as info:
        read_header(path)
    message = str(info.value)
    for fragment in (path.name, *fragments):
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.safetensors", "cannot read", "No such file")


def test_file_shorter_than_the_length_prefix(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\0\0")
    expect_error(path, "3 bytes", "too short")


def test_header_length_beyond_the_file(tmp_path):
    expect_error(write_raw(tmp_path / "cut.safetensors", b"{}", length=100), "header length 100", "truncated")


def test_header_length_above_the_cap(tmp_path):
    path = write_raw(tmp_path / "cap.safetensors", b"{}", length=MAX_HEADER_BYTES + 1)
    expect_error(path, "100,000,001", "cap of 100,000,000 bytes")


def test_header_not_utf8(tmp_path):
    expect_error(write_raw(tmp_path / "utf.safetensors", b'{"\xff": 1}'), "not valid UTF-8", "header byte 2")


def test_header_not_json(tmp_path):
    expect_error(write_raw(tmp_path / "json.safetensors", b'{"a": '), "not valid JSON")
    expect_error(write_raw(tmp_path / "deep.safetensors", b"[" * 100_000), "nested too deeply")


def test_header_not_an_object(tmp_path):
    expect_error(write_raw(tmp_path / "list.safetensors", b"[1, 2]"), "must be a JSON object, got list")


def test_duplicate_tensor_names(tmp_path):
    raw = b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": []}}'
    expect_error(write_raw(tmp_path / "dup.safetensors", raw, b"\0" * 4), "duplicate key 'a'")


def test_entry_not_an_object(tmp_path):
    expect_error(write_raw(tmp_path / "e.safetensors", {"w": [1, 2]}), "tensor 'w'", "must be a JSON object")


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_field(tmp_path, field):
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    del entry[field]
    expect_error(
        write_raw(tmp_path / "m.safetensors", {"w": entry}, b"\0" * 4), "tensor 'w'", f"no '{field}'"
    )


@pytest.mark.parametrize("shape", [[-1], [1.0], [True], "4", [[2]], None])
def test_bad_shape(tmp_path, shape):
    entry = {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    expect_error(write_raw(tmp_path / "s.safetensors", entry, b"\0" * 4), "tensor 'w'", "non-negative ints")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4], ["0", "4"], [False, 4], None])
def test_data_offsets_not_two_ints(tmp_path, offsets):
    entry = {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    expect_error(write_raw(tmp_path / "o.safetensors", entry, b"\0" * 4), "tensor 'w'", "two ints")


@pytest.mark.parametrize("offsets", [[-4, 0], [4, 0]])
def test_data_offsets_out_of_order(tmp_path, offsets):
    entry = {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
    expect_error(write_raw(tmp_path / "o.safetensors", entry, b"\0" * 4), "tensor 'w'", "0 <= start <= end")


def test_size_mismatch_names_expected_and_got(tmp_path):
    entry = {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}}
    expect_error(
        write_raw(tmp_path / "n.safetensors", entry, b"\0" * 8), "tensor 'w'", "needs 12 bytes", "span 8"
    )


def test_truncated_data_says_expected_and_actual_size(tmp_path):
    path = write_raw(tmp_path / "trunc.safetensors", f32("w", 4, 0), b"\0" * 10)  # 16 data bytes claimed
    header_size = len(json.dumps(f32("w", 4, 0)))
    expect_error(
        path, "tensor 'w'", f"expected at least {8 + header_size + 16} bytes", f"has {8 + header_size + 10}"
    )


def test_overlapping_tensors_name_both(tmp_path):
    header = {**f32("first", 2, 0), **f32("second", 2, 4)}
    expect_error(write_raw(tmp_path / "ov.safetensors", header, b"\0" * 12), "'first'", "'second'", "overlap")


def test_hole_between_tensors(tmp_path):
    header = {**f32("a", 1, 0), **f32("b", 1, 8)}
    expect_error(
        write_raw(tmp_path / "hole.safetensors", header, b"\0" * 12), "[4, 8)", "'a'", "'b'", "no tensor"
    )


def test_trailing_bytes(tmp_path):
    expect_error(write_raw(tmp_path / "tail.safetensors", f32("a", 1, 0), b"\0" * 7), "3 trailing bytes")


def test_unknown_dtype_names_file_tensor_and_dtype(tmp_path):
    entry = {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    expect_error(
        write_raw(tmp_path / "dt.safetensors", entry, b"\0" * 4), "tensor 'w'", "unknown dtype 'F8_E4M3'"
    )


@pytest.mark.parametrize("metadata", [{"a": 1}, ["format", "pt"], "pt", {"a": None}])
def test_metadata_not_a_string_map(tmp_path, metadata):
    expect_error(write_raw(tmp_path / "md.safetensors", {"__metadata__": metadata}), "__metadata__")


def test_absurd_sizes_fail_fast_without_allocating(tmp_path):
    # A header claiming a 10**15-element tensor (4 PB) must be refused from its numbers alone.
    lying = {"w": {"dtype": "F32", "shape": [10**15], "data_offsets": [0, 4 * 10**15]}}
    mismatch = {"w": {"dtype": "F32", "shape": [10**8, 10**8], "data_offsets": [0, 4]}}
    tracemalloc.start()
    try:
        start = time.perf_counter()
        expect_error(write_raw(tmp_path / "big.safetensors", lying, b"\0" * 4), "file truncated")
        expect_error(
            write_raw(tmp_path / "mis.safetensors", mismatch, b"\0" * 4), "needs 40000000000000000 bytes"
        )
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file({"model.norm.weight": np.ones(2, np.float32)}, path)
    with SafetensorsFile(path) as f:
        with pytest.raises(SafetensorsError, match=r"'model.norm.weights'.*k.safetensors.*did you mean"):
            f.get("model.norm.weights")
        with pytest.raises(SafetensorsError, match="no tensor 'x'"):
            f.info("x")
    with pytest.raises(SafetensorsError, match="closed"):
        f.get("model.norm.weight")


@pytest.mark.parametrize("method", ["get", "read"])  # through the mapping, or read into memory
def test_a_file_that_changes_after_opening_is_refused(tmp_path, method):
    path = tmp_path / "grow.safetensors"
    save_file({"w": np.ones(4, np.float32)}, path)
    f = SafetensorsFile(path)
    with open(path, "ab") as g:
        g.write(b"\0" * 8)
    with pytest.raises(SafetensorsError, match="changed size"):
        getattr(f, method)("w")


def test_read_copies_the_stored_bytes_into_memory(tmp_path):
    # `read` is `raw`'s bytes in a new array this process owns (the numba backend streams weights from it)
    path = tmp_path / "w.safetensors"
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    save_file({"w": w, "empty": np.zeros((0, 3), np.float32)}, path, bf16=True)
    with SafetensorsFile(path) as f:
        got, view = f.read("w"), f.raw("w")
        assert got.dtype == np.uint16 and got.shape == (5, 7)
        np.testing.assert_array_equal(got, view)
        assert got.flags.owndata and got.flags.writeable and not np.shares_memory(got, view)
        np.testing.assert_array_equal(bf16_to_float32(got), bf16_to_float32(float32_to_bf16(w)))
        assert f.read("empty").shape == (0, 3)
    with Checkpoint(path) as c:
        np.testing.assert_array_equal(c.read("w"), got)
    with pytest.raises(SafetensorsError, match="closed"):
        f.read("w")


def test_read_into_a_slot_of_a_stacked_array(tmp_path):
    # how the numba backend stacks a layer's experts: each read straight into its slot, no second copy
    path = tmp_path / "e.safetensors"
    experts = {f"e{i}": np.full((2, 3), i, np.float32) for i in range(3)}
    save_file(experts, path, bf16=True)
    stacked = np.zeros((3, 2, 3), np.uint16)
    with SafetensorsFile(path) as f:
        for i in range(3):
            f.read(f"e{i}", stacked[i])
        np.testing.assert_array_equal(bf16_to_float32(stacked), np.stack(list(experts.values())))
        with pytest.raises(
            SafetensorsError, match=r"'e0' is BF16 \[2, 3\]; cannot read it into a uint16 \[3, 2\]"
        ):
            f.read("e0", np.zeros((3, 2), np.uint16))
        with pytest.raises(SafetensorsError, match="float32"):
            f.read("e0", np.zeros((2, 3), np.float32))
        with pytest.raises(SafetensorsError, match="not contiguous"):
            f.read("e0", np.zeros((2, 6), np.uint16)[:, ::2])


def test_save_file_rejects_what_it_cannot_write(tmp_path):
    path = tmp_path / "bad.safetensors"
    with pytest.raises(SafetensorsError, match="'o'.*object"):
        save_file({"o": np.array([None])}, path)
    with pytest.raises(SafetensorsError, match="metadata"):
        save_file({}, path, metadata={"a": 1})
    with pytest.raises(SafetensorsError, match="__metadata__"):
        save_file({"__metadata__": np.ones(1)}, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []  # nothing half-written, no temporary left


# --- memory mapping ---------------------------------------------------------------------------------------------


def test_large_tensor_is_memory_mapped_not_read(tmp_path):
    # A 1 GiB tensor of zeros, made sparse with truncate(): opening it and taking the array must touch no data.
    n = 1 << 28  # float32 elements
    header = json.dumps({"big": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        f = SafetensorsFile(path)
        big = f.get("big")
        assert big[-1] == 0.0 and big[123_456_789] == 0.0
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert big.shape == (n,) and big.dtype == np.float32
    assert elapsed < 0.5 and peak < 1 << 20  # 1 GiB was not read into memory
    assert not big.flags.writeable and not big.flags.owndata
    base = big
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(
        base.obj if isinstance(base, memoryview) else base, mmap.mmap
    )  # a view of the mapping itself
    f.close()
    assert big[7] == 0.0  # the array keeps its mapping alive after close()


def test_overwriting_a_file_leaves_arrays_from_the_old_one_intact(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": np.full(1024, 7.0, np.float32)}, path)
    old = load_file(path)["w"]
    save_file({"w": np.zeros(1, np.float32)}, path)  # a rename, not an in-place rewrite (that could SIGBUS)
    assert old.sum() == 7.0 * 1024
    assert load_file(path)["w"].tolist() == [0.0]


# --- checkpoint directories -------------------------------------------------------------------------------------


def make_sharded(directory, shards, weight_map=None, metadata=None):
    """Write `{shard file: {name: array}}` and an index (by default the true weight map)."""
    directory.mkdir(exist_ok=True)
    for file, tensors in shards.items():
        save_file(tensors, directory / file, metadata={"format": "pt"})
    if weight_map is None:
        weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    index = {"metadata": metadata or {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


SHARDS = {
    "model-00001-of-00002.safetensors": {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.int64([5]),
    },
    "model-00002-of-00002.safetensors": {"c": np.array([1.0, -2.0], np.float32)},
}


def test_sharded_checkpoint(tmp_path):
    directory = make_sharded(tmp_path / "ckpt", SHARDS, metadata={"total_size": 40})
    with Checkpoint(directory) as ckpt:
        assert ckpt.keys() == {"a", "b", "c"}
        assert ckpt.files == [directory / name for name in sorted(SHARDS)]
        assert ckpt.metadata == {"total_size": 40}
        assert ckpt.shape("a") == (2, 3) and ckpt.dtype("a") == "F32" and ckpt.dtype("b") == "I64"
        np.testing.assert_array_equal(ckpt.get("a"), SHARDS["model-00001-of-00002.safetensors"]["a"])
        assert ckpt.get("c").tolist() == [1.0, -2.0]
        assert "c" in ckpt and "d" not in ckpt
        with pytest.raises(CheckpointError, match="'d'.*ckpt"):
            ckpt.get("d")


def test_shards_are_mapped_lazily_and_once(tmp_path):
    with Checkpoint(make_sharded(tmp_path / "ckpt", SHARDS)) as ckpt:
        shards = ckpt._shards
        assert all(shard._map is None for shard in shards.values())  # headers read, no data mapped
        ckpt.get("a")
        first = shards[ckpt.files[0]]._map
        ckpt.get("b")
        assert first is not None and shards[ckpt.files[0]]._map is first
        assert shards[ckpt.files[1]]._map is None


def test_single_file_checkpoint_and_bf16(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"w": np.array([1.0, 1 + 2**-8], np.float32)}, tmp_path / "m" / "model.safetensors", bf16=True)
    with Checkpoint(tmp_path / "m") as ckpt:
        assert ckpt.files == [tmp_path / "m" / "model.safetensors"] and ckpt.dtype("w") == "BF16"
        assert ckpt.get("w").tolist() == [1.0, 1.0]  # the tie rounded to even when written
    with Checkpoint(tmp_path / "m" / "model.safetensors") as ckpt:  # a file path works too
        assert ckpt.keys() == {"w"}


def test_directory_of_shards_without_an_index(tmp_path):
    directory = tmp_path / "noindex"
    directory.mkdir()
    for file, tensors in SHARDS.items():
        save_file(tensors, directory / file)
    with Checkpoint(directory) as ckpt:
        assert ckpt.keys() == {"a", "b", "c"} and len(ckpt.files) == 2
    save_file({"c": np.ones(1, np.float32)}, directory / "extra.safetensors")
    with pytest.raises(CheckpointError, match="'c' is in two files"):
        Checkpoint(directory)


def test_checkpoint_directory_missing_or_empty(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*nowhere"):
        Checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model.safetensors, no model.safetensors.index.json"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not a readable JSON"),
        ("[1]", "weight_map"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": []}', "weight_map"),
        ('{"weight_map": {}}', "weight_map is empty"),
        ('{"weight_map": {"a": 3}}', r"weight_map\['a'\] must be a file name"),
        ('{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}', "duplicate key 'a'"),
        ('{"weight_map": {"a": "../outside.safetensors"}}', "outside the directory"),
        (
            '{"weight_map": {"a": "model-00009.safetensors"}}',
            "'model-00009.safetensors'.*'a'.*does not exist",
        ),
    ],
)
def test_bad_index(tmp_path, text, message):
    directory = make_sharded(tmp_path / "ckpt", SHARDS)
    save_file({"a": np.ones(1, np.float32)}, tmp_path / "outside.safetensors")
    (directory / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(directory)
    assert "model.safetensors.index.json" in str(info.value)


def test_index_lists_a_tensor_its_shard_lacks(tmp_path):
    weight_map = {"a": SHARDS_1, "b": SHARDS_1, "c": SHARDS_2, "ghost": SHARDS_2}
    directory = make_sharded(tmp_path / "ckpt", SHARDS, weight_map)
    with pytest.raises(CheckpointError, match="'ghost' in model-00002-of-00002.safetensors, which lacks it"):
        Checkpoint(directory)


def test_index_points_to_the_wrong_shard(tmp_path):
    directory = make_sharded(tmp_path / "ckpt", SHARDS, {"a": SHARDS_2, "b": SHARDS_1, "c": SHARDS_2})
    with pytest.raises(CheckpointError, match="'a' is in shard model-00001.*index says model-00002"):
        Checkpoint(directory)


def test_same_tensor_in_two_shards(tmp_path):
    shards = {
        SHARDS_1: SHARDS[SHARDS_1],
        SHARDS_2: {"a": np.ones(1, np.float32), "c": np.ones(1, np.float32)},
    }
    directory = make_sharded(tmp_path / "ckpt", shards, {"a": SHARDS_1, "b": SHARDS_1, "c": SHARDS_2})
    with pytest.raises(CheckpointError, match="'a' is in two files"):
        Checkpoint(directory)


def test_a_broken_shard_is_named(tmp_path):
    directory = make_sharded(tmp_path / "ckpt", SHARDS)
    (directory / SHARDS_2).write_bytes(b"\x05\0")
    with pytest.raises(SafetensorsError, match=f"{SHARDS_2}.*too short"):
        Checkpoint(directory)


SHARDS_1, SHARDS_2 = sorted(SHARDS)


# --- live cross-checks with torch (bf16) ---------------------------------------------------------------------


@pytest.mark.crosscheck
def test_float32_to_bf16_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    n = 100_000
    x = np.concatenate(
        [
            (rng.standard_normal(n) * 10.0 ** rng.integers(-44, 38, n)).astype(
                np.float32
            ),  # subnormal to huge
            from_bits(rng.integers(0, 2**32, n, dtype=np.uint64)),  # any bit pattern: NaNs, infs, ties
            from_bits([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00008000, 0x80000000, 0x7F800000]),
        ]
    )
    assert x.dtype == np.float32
    ours = float32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(bf16_to_float32(ours[nan])).all() and np.isnan(bf16_to_float32(theirs[nan])).all()
    widened = torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16_to_float32(theirs)[~nan], widened[~nan])


@pytest.mark.crosscheck
def test_bf16_files_agree_with_safetensors_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    values = torch.randn(3, 5).to(torch.bfloat16)
    safetensors.torch.save_file({"w": values, "v": torch.ones(2)}, str(tmp_path / "torch.safetensors"))
    with SafetensorsFile(tmp_path / "torch.safetensors") as f:
        np.testing.assert_array_equal(f.get("w"), values.float().numpy())

    x = np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32)
    save_file({"x": x, "i": np.arange(3)}, tmp_path / "ours.safetensors", bf16=True)
    back = safetensors.torch.load_file(str(tmp_path / "ours.safetensors"))
    assert back["x"].dtype == torch.bfloat16 and back["i"].dtype == torch.int64
    assert torch.equal(back["x"], torch.from_numpy(x).to(torch.bfloat16))
