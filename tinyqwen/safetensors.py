"""Safetensors: reading (and writing) the weights of a Hugging Face checkpoint, byte by byte.

A `.safetensors` file is the simplest possible container for named arrays. It has exactly three parts:

    [ 8 bytes: N, the header length, unsigned little-endian ]
    [ N bytes: the header, a UTF-8 JSON object               ]
    [ the data area: every tensor's raw bytes, back to back  ]

The header maps each tensor name to its dtype, its shape and the byte range of its data, plus an optional
`"__metadata__"` object of string -> string (Hugging Face writes `{"format": "pt"}` there):

    {"__metadata__": {"format": "pt"},
     "model.norm.weight": {"dtype": "BF16", "shape": [1024], "data_offsets": [0, 2048]}, ...}

`data_offsets` are `[start, end)` byte positions *relative to the start of the data area*, i.e. the tensor's bytes
live at file positions `8 + N + start` up to (not including) `8 + N + end`. The bytes are the array in C order
(row-major), little-endian, with no padding between elements.

A worked example: one F32 tensor "x" holding [1.0, 2.0]. Its header is the 54-byte JSON text

    {"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}

which the official writer pads with two spaces to 56 bytes, so that the data area starts at a multiple of 8. The
whole file is 72 bytes:

    38 00 00 00 00 00 00 00        N = 0x38 = 56, as a little-endian uint64
    7b 22 78 22 ... 7d 20 20       the 56 header bytes: '{"x":{...}}' + two spaces
    00 00 80 3f                    1.0 as a little-endian float32 (bits 0x3F800000)
    00 00 00 40                    2.0 as a little-endian float32 (bits 0x40000000)

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "x.safetensors")
>>> save_file({"x": np.array([1.0, 2.0], dtype=np.float32)}, path)
>>> raw = open(path, "rb").read()
>>> len(raw), raw[:8].hex(" "), raw[64:].hex(" ")
(72, '38 00 00 00 00 00 00 00', '00 00 80 3f 00 00 00 40')
>>> with SafetensorsFile(path) as f:
...     f.info("x"), f.get("x")
(TensorInfo(name='x', dtype='F32', shape=(2,), start=64, end=72), array([1., 2.], dtype=float32))

Why this format and not pickle (PyTorch's `.bin`)? Reading it runs no code, and because every tensor is a plain
byte range we never have to *read* the file at all: we memory-map it (`mmap`) and hand out NumPy arrays that are
views of the mapping. The operating system pages bytes in only when they are touched, so opening a 60 GB checkpoint
is instant, and a tensor we never use costs nothing.

The reader trusts nothing in the file. Every number in the header is checked against the file's real size before
it is used, so a hostile or truncated file gives a `SafetensorsError` that names the file and the problem — never a
huge allocation, a crash deep inside NumPy, or garbage weights. The rules are those of the official `safetensors`
library (0.8), which we checked one by one:

* the header length is at most 100,000,000 bytes (the official cap) and fits in the file;
* the header is UTF-8 JSON, an object, without duplicate names;
* each entry has a known dtype, a shape of non-negative ints and `data_offsets` of two ints `0 <= start <= end`,
  with `end - start == prod(shape) * itemsize`; unknown extra fields in an entry are ignored, as officially;
* the tensors tile the data area exactly: sorted by offset, each starts where the previous one ended, the first at
  0 and the last at the end of the file. So no overlaps, no holes, no trailing bytes (the official library rejects
  all three; a hole could hide data, an overlap would make two "different" weights share memory);
* `__metadata__` is absent, null, or an object of string -> string.

NumPy has no bfloat16, and most Qwen3 checkpoints are BF16. We keep BF16 as raw `uint16` bit patterns and widen
them to float32 exactly (`tinyqwen.bf16.bf16_to_float32`); `get` does that for you, so BF16 and F16 tensors come back as
float32 while every other dtype comes back as stored.
"""

from __future__ import annotations

import difflib
import json
import math
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyqwen.bf16 import bf16_to_float32, float32_to_bf16
from tinyqwen.errors import SafetensorsError

# The official library refuses headers above 100 MB (decimal); a real 30B-parameter MoE header is about 2 MB.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype name -> how its bytes are stored, as an explicit little-endian NumPy dtype. BF16 is stored as
# uint16 bit patterns because NumPy has no bfloat16 (`get` widens it to float32).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "C64": np.dtype("<c8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# The official writer orders tensors by dtype (this rank, largest first), then by name. Largest items first means
# every tensor starts at a multiple of its own item size (the data area starts at a multiple of 8), so a reader
# can map each one as an aligned array. The rank is the order of the official `Dtype` enum.
_WRITE_RANK = {
    name: rank
    for rank, name in enumerate(
        ["BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
    )
}

# numpy dtype -> safetensors name, for the writer (BF16 is chosen by `save_file(..., bf16=True)`, not by dtype).
_NAME_OF = {dtype.newbyteorder("<"): name for name, dtype in DTYPES.items() if name != "BF16"}


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One header entry. `start`/`end` are ABSOLUTE byte positions in the file (8 + N + data_offsets)."""

    name: str
    dtype: str  # the safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a 1


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    # Python's json keeps the last of two equal keys; a safetensors header with two entries of the same name is
    # ambiguous (the official library rejects it), so we refuse it by name.
    result = {}
    for key, value in pairs:
        if key in result:
            raise SafetensorsError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_entry(path: Path, name: str, entry, data_size: int, data_start: int) -> TensorInfo:
    """Validate one header entry against the data area (`data_size` bytes at file position `data_start`)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: header entry must be a JSON object, got {type(entry).__name__}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise SafetensorsError(f"{where}: header entry has no {field!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SafetensorsError(f"{where}: data_offsets must be two ints [start, end], got {offsets!r}")
    start, end = offsets
    if not 0 <= start <= end:
        raise SafetensorsError(f"{where}: data_offsets {offsets} must satisfy 0 <= start <= end")
    # Python ints: a header claiming 10**15 elements is just a big number here, never an allocation.
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - start != expected:
        raise SafetensorsError(
            f"{where}: {dtype} {shape} needs {expected} bytes but data_offsets {offsets} span {end - start}"
        )
    if end > data_size:
        raise SafetensorsError(
            f"{where}: data_offsets {offsets} end beyond the {data_size}-byte data area — file truncated? "
            f"expected at least {data_start + end} bytes, the file has {data_start + data_size}"
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + start, data_start + end)


def _check_tiling(path: Path, tensors: list[TensorInfo], data_start: int, data_size: int) -> None:
    """The tensors must cover the data area exactly once: no overlap, no hole, no trailing bytes."""
    position, previous = data_start, None  # absolute file positions
    for t in sorted(tensors, key=lambda t: (t.start, t.end)):
        if t.start < position:
            raise SafetensorsError(
                f"{path}: tensors {previous.name!r} and {t.name!r} overlap (data_offsets "
                f"[{previous.start - data_start}, {previous.end - data_start}] and "
                f"[{t.start - data_start}, {t.end - data_start}])"
            )
        if t.start > position:
            after = f"after tensor {previous.name!r}" if previous else "at the start of the data area"
            raise SafetensorsError(
                f"{path}: data bytes [{position - data_start}, {t.start - data_start}) {after} belong to no tensor "
                f"(a hole before {t.name!r}); the official safetensors library rejects such files"
            )
        # an empty tensor is a point, not a neighbour that a later tensor can overlap
        if previous is None or t.end > t.start:
            previous = t
        position = t.end
    if position != data_start + data_size:
        raise SafetensorsError(
            f"{path}: the tensors cover {position - data_start} bytes of the {data_size}-byte data area "
            f"({data_start + data_size - position} trailing bytes belong to no tensor)"
        )


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors header: `({name: TensorInfo}, metadata)`. Reads only the header bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise SafetensorsError(
                    f"{path}: file is {file_size} bytes, too short for the 8-byte header length (truncated?)"
                )
            (header_size,) = struct.unpack("<Q", f.read(8))
            # Both checks come before the read, so a lying length never allocates anything.
            if header_size > MAX_HEADER_BYTES:
                raise SafetensorsError(
                    f"{path}: header length {header_size:,} bytes exceeds the cap of {MAX_HEADER_BYTES:,} bytes "
                    f"(not a safetensors file?)"
                )
            if header_size > file_size - 8:
                raise SafetensorsError(
                    f"{path}: header length {header_size:,} bytes but only {file_size - 8:,} bytes follow "
                    f"the length prefix (file truncated?)"
                )
            raw = f.read(header_size)
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read: {e.strerror or e}") from None

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(
            f"{path}: header is not valid UTF-8 ({e.reason} at header byte {e.start})"
        ) from None
    try:
        header = json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    except RecursionError:
        raise SafetensorsError(f"{path}: header JSON is nested too deeply") from None
    except SafetensorsError as e:  # from unique_keys
        raise SafetensorsError(f"{path}: header has a {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None)
    if metadata is None:  # the official library accepts `null` too
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(
            f"{path}: __metadata__ must be an object of string -> string, got {metadata!r:.200}"
        )

    data_start = 8 + header_size
    data_size = file_size - data_start
    tensors = {name: _parse_entry(path, name, entry, data_size, data_start) for name, entry in header.items()}
    _check_tiling(path, list(tensors.values()), data_start, data_size)
    return tensors, metadata


def not_found_message(name: str, known, where: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"no tensor {name!r} in {where} ({len(known)} tensors){hint}"


class SafetensorsFile:
    """An open safetensors file: the header is read and validated now, the data is memory-mapped on first `get`.

    Arrays from `get` are read-only views of the mapping (except BF16/F16, widened into new float32 arrays). They
    stay valid after `close()`: each keeps the mapping alive until it is garbage-collected.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors, self.metadata = read_header(self.path)
        self._file_size = self.path.stat().st_size  # the size the header was validated against
        self._map: mmap.mmap | None = None
        self._closed = False

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise SafetensorsError(not_found_message(name, self.tensors, str(self.path))) from None

    def _open(
        self,
    ):  # the file, unbuffered, refused if it is no longer the size its header was checked against
        if self._closed:
            raise SafetensorsError(f"{self.path}: file is closed")
        f = open(self.path, "rb", buffering=0)
        size = os.fstat(f.fileno()).st_size
        if size != self._file_size:
            f.close()
            raise SafetensorsError(
                f"{self.path}: file changed size ({self._file_size} -> {size} bytes) since it was opened"
            )
        return f

    def _mapping(self) -> mmap.mmap:
        if self._map is None:  # (also after close(): _open then says the file is closed)
            with self._open() as f:  # the mapping outlives the file descriptor
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bit patterns): a read-only view of the file, nothing copied."""
        t = self.info(name)
        dtype = DTYPES[t.dtype]
        if t.nbytes == 0:  # np.frombuffer refuses an empty range at the very end of the buffer
            return np.empty(t.shape, dtype)
        flat = np.frombuffer(self._mapping(), dtype=dtype, count=t.nbytes // dtype.itemsize, offset=t.start)
        return flat.reshape(t.shape)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bit patterns), read into a new array of this process's memory
        (or into `out`, a C-contiguous array of its dtype and shape: e.g. one expert's slot of a stacked array).

        `raw` is free but leaves the data in the file's mapping; a kernel that streams a weight on every token is
        faster from process memory, which NumPy asks the OS to back with 2 MiB pages (a file mapping has 4 KiB
        pages: 512 times the address translations for the same bytes). The bytes are read with one positioned
        read, never through the mapping, so the process holds one copy of them, not two.
        """
        t = self.info(name)
        if out is None:
            out = np.empty(t.shape, DTYPES[t.dtype])
        elif out.dtype != DTYPES[t.dtype] or out.shape != tuple(t.shape) or not out.flags.c_contiguous:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} is {t.dtype} {list(t.shape)}; cannot read it into a "
                f"{out.dtype} {list(out.shape)} array{'' if out.flags.c_contiguous else ' (not contiguous)'}"
            )
        if t.nbytes == 0:
            return out
        with self._open() as f:
            f.seek(t.start)
            view, done = memoryview(out.reshape(-1)).cast("B"), 0
            while done < t.nbytes:  # a large read may return less than asked for
                n = f.readinto(view[done:])
                if not n:
                    raise SafetensorsError(
                        f"{self.path}: tensor {name!r} is cut short ({done} of {t.nbytes} bytes)"
                    )
                done += n
        return out

    def get(self, name: str) -> np.ndarray:
        """The tensor with its header shape; BF16 and F16 widened (exactly) to float32, other dtypes as stored."""
        t = self.info(name)
        array = self.raw(name)
        if t.dtype == "BF16":
            return bf16_to_float32(array)
        if t.dtype == "F16":
            return array.astype(np.float32)
        return array

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # arrays still view the mapping; it is unmapped when the last of them is collected
            self._map = None
        self._closed = True

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a file, by name, as `SafetensorsFile.get` returns it (read-only views where possible)."""
    with SafetensorsFile(path) as f:
        return {name: f.get(name) for name in f.keys()}


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 20  # convert/write 1 Mi elements at a time: temporaries stay in cache, few write calls


def _stored(name: str, array, bf16: bool) -> tuple[str, np.ndarray]:
    """The safetensors dtype name for `array` and the C-contiguous array to write (not yet converted)."""
    array = np.asarray(array)
    if not array.flags.c_contiguous:  # (not np.ascontiguousarray: it turns a 0-d array into shape (1,))
        array = array.copy(order="C")
    if bf16 and array.dtype.kind == "f":
        return "BF16", array
    dtype_name = _NAME_OF.get(array.dtype.newbyteorder("<"))
    if dtype_name is None:
        raise SafetensorsError(
            f"cannot save tensor {name!r}: dtype {array.dtype} has no safetensors equivalent"
        )
    return dtype_name, array


def _write_array(f, dtype_name: str, array: np.ndarray) -> None:
    """Write `array`'s elements as little-endian `dtype_name`, a chunk at a time (no whole-tensor copy)."""
    flat = array.reshape(-1)  # a view: `array` is C-contiguous
    target = DTYPES[dtype_name]
    for i in range(0, flat.size, _CHUNK_ELEMENTS):
        chunk = flat[i : i + _CHUNK_ELEMENTS]
        if dtype_name == "BF16":
            chunk = float32_to_bf16(chunk)
        elif chunk.dtype != target:  # only a big-endian input needs a byte swap
            chunk = chunk.astype(target)
        f.write(chunk.view(np.uint8))  # the raw bytes, through the buffer protocol: no copy


def save_file(
    tensors: dict[str, np.ndarray],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
    bf16: bool = False,
) -> None:
    """Write `tensors` as a safetensors file, byte for byte as the official writer does.

    With `bf16=True` every floating-point tensor is rounded to BF16 (`float32_to_bf16`). The header is compact
    JSON with `__metadata__` first (keys sorted; the official writer's order for two or more keys is a hash
    map's, i.e. arbitrary), padded with spaces to a multiple of 8 bytes; tensors follow in
    the official order (by dtype, widest first, then by name; see `_WRITE_RANK`).

    The file is written under a temporary name and renamed into place at the end. Besides never leaving half a
    file behind, this matters with memory mapping: overwriting a file in place would pull the bytes out from under
    arrays still mapped from the old file (a crash, SIGBUS, on their next access); after a rename they keep the
    old, now nameless, file.
    """
    path = Path(path)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise SafetensorsError(f"cannot save {path}: metadata must be a dict of str -> str")
    stored = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"cannot save {path}: invalid tensor name {name!r}")
        stored[name] = _stored(name, array, bf16)
    order = sorted(stored, key=lambda n: (-_WRITE_RANK[stored[n][0]], n))

    header: dict[str, object] = {}
    if metadata is not None:  # the official writer writes an empty {} too
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name in order:
        dtype_name, array = stored[name]
        nbytes = array.size * DTYPES[dtype_name].itemsize
        header[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the data area starts 8-byte aligned

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in order:
                _write_array(f, *stored[name])
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
