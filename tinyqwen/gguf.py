"""GGUF: llama.cpp's single-file model format, read (and written) byte by byte.

One `.gguf` file holds everything llama.cpp needs to run a model: the hyperparameters, the tokenizer and the weights,
quantized or not. Everything is little-endian:

    [ "GGUF" magic, uint32 version (3), uint64 tensor_count, uint64 metadata_count           ]
    [ metadata_count key/value pairs: string key, uint32 value type, the value               ]
    [ tensor_count tensor infos: string name, uint32 n_dims, uint64 dims[n_dims],            ]
    [                            uint32 ggml type, uint64 offset (into the data section)     ]
    [ zero padding up to a multiple of `general.alignment` (default 32)                      ]
    [ the data section: each tensor's bytes at its offset, every offset a multiple of the    ]
    [ alignment                                                                              ]

A string is a uint64 byte length and that many UTF-8 bytes (no terminator). A value's type is one of the 13 below;
an ARRAY is a uint32 element type, a uint64 count and the elements (arrays of arrays are allowed).

Dims are listed innermost first, as ggml's `ne`: a Hugging Face weight of shape [out, in] = [rows, cols] is written
with dims (cols, rows), so the bytes are the same row-major matrix and `shape = dims[::-1]`. A quantized tensor's
rows are runs of blocks (`tinyqwen.quantization`), so its byte size is rows * cols / block_values * block_bytes.

A worked example: an F32 tensor "x" = [1.0, 2.0] and one key "a" = uint32 7 (`write_gguf(path, {"a": (7,
"UINT32")}, {"x": np.array([1., 2.], np.float32)})`):

    47 47 55 46   03 00 00 00              "GGUF", version 3
    01 00.. (8)   01 00.. (8)              1 tensor, 1 key/value
    01 00.. (8)   61   04 00 00 00   07 00 00 00     key "a" (length 1), type 4 = UINT32, value 7
    01 00.. (8)   78   01 00 00 00   02 00.. (8)   00 00 00 00   00 00.. (8)
                                           tensor "x": 1 dim of 2, type 0 = F32, offset 0
    00 .. 00                               padding to 32 bytes... then 00 00 80 3f 00 00 00 40

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "x.gguf")
>>> write_gguf(path, {"a": (7, "UINT32")}, {"x": np.array([1.0, 2.0], np.float32)})
>>> with GGUFFile(path) as f:
...     f.metadata["a"], f.tensors["x"], f.get("x")
(7, GGUFTensorInfo(name='x', ggml_type='F32', shape=(2,), offset=96, nbytes=8), array([1., 2.], dtype=float32))

The reader trusts nothing in the file, like the safetensors reader: every count and length is checked against the
bytes that are really left before anything is allocated, every offset and size against the data section, so a
truncated or hostile file gives a `GGUFError` naming the file and the field — never a huge allocation or a crash.
The data section is memory-mapped: `raw(name)` is a view of the file, and a quantized weight stays in its blocks
(`QuantizedTensor`) until a kernel reads it. The big string arrays of the header (a vocabulary, its merges) are
checked at open and made into Python strings only when used (`StringArray`): running a model needs none of them.

One concept: the GGUF byte layout, read and written. The reader (and its lazily read string arrays) and the writer
follow the same fields in the same order, so they are read side by side.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyqwen.bf16 import bf16_to_float32
from tinyqwen.errors import GGUFError
from tinyqwen.quantization import BLOCK_BYTES, BLOCK_VALUES, QuantizedTensor

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (2023, 32-bit counts) is long gone from the files people have
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_STRING_BYTES = 1 << 30  # no real key, token or chat template comes near 1 GiB

# The metadata value types, by their number in the file: (name, struct format of one element or None)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<?"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
VALUE_TYPE_IDS = {name: number for number, (name, _) in VALUE_TYPES.items()}

# ggml tensor types this reader understands: number -> (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    8: ("Q8_0", BLOCK_VALUES["q8_0"], BLOCK_BYTES["q8_0"]),
    12: ("Q4_K", BLOCK_VALUES["q4_k"], BLOCK_BYTES["q4_k"]),
    14: ("Q6_K", BLOCK_VALUES["q6_k"], BLOCK_BYTES["q6_k"]),
    30: ("BF16", 1, 2),
}
GGML_TYPE_IDS = {name: number for number, (name, _, _) in GGML_TYPES.items()}
# names of the ggml types we cannot run, so the error says what the file holds
_OTHER_GGML_TYPES = {
    2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 13: "Q5_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
_FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry. `shape` is in NumPy order (dims reversed); `offset` is ABSOLUTE in the file."""

    name: str
    ggml_type: str  # "F32", "F16", "BF16", "Q8_0", "Q4_K", "Q6_K"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def tensor_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor: (number of blocks) x (bytes per block); the innermost dim must fill whole blocks."""
    _, per_block, block_bytes = GGML_TYPES[GGML_TYPE_IDS[ggml_type]]
    return math.prod(shape) // per_block * block_bytes


class _Cursor:
    """Reads the header front to back, checking every length against the bytes that are left."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"{what} needs {n} bytes at offset {self.pos}, but the file ends at {self.size} — truncated?"
            )
        view = memoryview(self.buf)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        if n > MAX_STRING_BYTES or n > self.size - self.pos:
            raise self.fail(f"{what} claims {n} bytes, but only {self.size - self.pos} are left in the file")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, type_id: int, what: str, depth: int = 0):
        if type_id not in VALUE_TYPES:
            raise self.fail(f"{what} has unknown value type {type_id} (known: 0..12)")
        name, fmt = VALUE_TYPES[type_id]
        if name == "STRING":
            return self.string(what)
        if name == "ARRAY":
            if depth > 4:
                raise self.fail(f"{what}: arrays nested more than 4 deep")
            item_type = self.unpack("<I", f"the element type of {what}")
            count = self.unpack("<Q", f"the length of {what}")
            if item_type not in VALUE_TYPES:
                raise self.fail(f"{what} is an array of unknown value type {item_type} (known: 0..12)")
            item_name, item_fmt = VALUE_TYPES[item_type]
            # every element takes at least 1 byte (8 for a string or an array's header): a count the rest of the
            # file cannot hold is a lie, refused before any list is built
            least = struct.calcsize(item_fmt) if item_fmt else (8 if item_name == "STRING" else 12)
            if count * least > self.size - self.pos:
                raise self.fail(
                    f"{what} claims {count} {item_name} elements, more than the {self.size - self.pos} bytes left hold"
                )
            if item_fmt:  # numbers: one read, as a NumPy array (151,936 token types in a Qwen3 file)
                raw = self.take(count * struct.calcsize(item_fmt), what)
                arr = np.frombuffer(raw, dtype=np.dtype(item_fmt)).copy()
                return arr.astype(bool) if item_name == "BOOL" else arr
            if item_name == "STRING" and depth == 0:  # checked now, made into strings when used
                start = self.pos
                for i in range(count):
                    self.string(f"{what}[{i}]")  # (each string is dropped at once: nothing piles up)
                return StringArray(self.path, what, start, self.pos - start, count)
            return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(count)]
        value = self.unpack(fmt, what)
        if name == "BOOL" and self.buf[self.pos - 1] > 1:
            raise self.fail(f"{what} is a BOOL with byte {self.buf[self.pos - 1]} (must be 0 or 1)")
        return value


class StringArray(Sequence):
    """A metadata array of strings, checked when the file was opened and read into Python strings only when used.

    A Qwen3 file's header holds 151,936 token strings and 151,387 merges: ~300,000 small Python objects (~25 MiB
    while they live) that running the model never needs — only the tokenizer does. Built eagerly and dropped after
    loading, they still leave ~9 MiB behind: the interpreter's small-object arenas cannot be returned while a few
    long-lived objects sit among the freed ones. So the reader checks every length and every string's UTF-8 at
    open (each decoded string dropped at once), remembers where the array lies, and reads it again from the file
    (not the mapping, whose header pages are handed back) when someone asks: `len` is free, iterating decodes one
    string at a time, `index` compares bytes, indexing or slicing makes the list once and keeps it. The file is
    checked again as it is read, so one that changed since it was opened gives a `GGUFError`, never wrong strings.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "t.gguf")
    >>> write_gguf(path, {"tokens": ["a", "bc", "d"]}, {"x": np.zeros(2, np.float32)})
    >>> with GGUFFile(path) as f:
    ...     t = f.metadata["tokens"]
    ...     len(t), t.index("bc"), list(t), t[2], t == ["a", "bc", "d"]
    (3, 1, ['a', 'bc', 'd'], 'd', True)
    """

    def __init__(self, path: Path, what: str, offset: int, nbytes: int, count: int):
        self.path, self.what, self.offset, self.nbytes, self.count = path, what, offset, nbytes, count
        self._items: list[str] | None = None

    def _bytes(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.nbytes)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read {self.what} again: {e.strerror}") from None
        if len(data) != self.nbytes:
            raise GGUFError(f"{self.path}: {self.what} is cut short (the file changed since it was opened?)")
        return data

    def _encoded(self):
        """Each string's UTF-8 bytes (memoryview slices), checked against the array's extent."""
        data = memoryview(self._bytes())
        pos = 0
        for i in range(self.count):
            n = struct.unpack_from("<Q", data, pos)[0] if pos + 8 <= self.nbytes else None
            if n is None or pos + 8 + n > self.nbytes:
                raise GGUFError(f"{self.path}: {self.what}[{i}] runs past the array (the file changed?)")
            yield data[pos + 8 : pos + 8 + n]
            pos += 8 + n

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        if self._items is not None:
            yield from self._items
            return
        for i, raw in enumerate(self._encoded()):
            try:
                yield str(raw, "utf-8")
            except UnicodeDecodeError as e:
                raise GGUFError(f"{self.path}: {self.what}[{i}] is not valid UTF-8 ({e.reason})") from None

    def __getitem__(self, i):
        if self._items is None:
            self._items = list(self)
        return self._items[i]

    def index(self, value, start: int = 0, stop: int | None = None) -> int:
        """The first position of `value`, found by comparing bytes (no string is made)."""
        if self._items is not None or not isinstance(value, str):
            return list(self).index(value, start, *(() if stop is None else (stop,)))
        want = value.encode("utf-8")
        stop = self.count if stop is None else stop
        for i, raw in enumerate(self._encoded()):
            if start <= i < stop and len(raw) == len(want) and raw == want:
                return i
        raise ValueError(f"{value!r} is not in {self.what}")

    def __contains__(self, value) -> bool:
        try:
            self.index(value)
        except ValueError:
            return False
        return True

    def __eq__(self, other) -> bool:
        if isinstance(other, (StringArray, list, tuple)):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # (a sequence that compares by value, like a list)

    def __repr__(self) -> str:
        return f"StringArray({self.what}: {self.count} strings, read from the file when used)"


class GGUFFile:
    """An open GGUF file: `metadata` (key -> value), `types` (key -> value type name), `tensors` (name -> info).

    Use as a context manager, or call `close()`. `raw(name)` views a tensor's stored bytes/elements in the mapping;
    `get(name)` gives floats (F16/BF16 widened exactly) or a `QuantizedTensor` for block types.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise GGUFError(f"cannot open GGUF file {self.path}: {e.strerror}") from None
        try:
            size = os.fstat(self._file.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{self.path}: {size} bytes is too short for a GGUF header (24 bytes)")
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse(size)
            self._release_header()
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(self._mmap, self.path)
        magic = bytes(c.take(4, "the magic"))
        if magic != MAGIC:
            raise c.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self.version = c.unpack("<I", "the version")
        if self.version not in VERSIONS:
            raise c.fail(f"GGUF version {self.version} is not supported (supported: {VERSIONS})")
        n_tensors = c.unpack("<Q", "the tensor count")
        n_kv = c.unpack("<Q", "the metadata count")
        # a key/value takes at least 8 + 1 + 4 + 1 bytes and a tensor info 8 + 1 + 4 + 8 + 4 + 8
        if n_kv * 14 > size or n_tensors * 33 > size:
            raise c.fail(
                f"header claims {n_tensors} tensors and {n_kv} metadata keys: more than {size} bytes can hold"
            )
        self.metadata: dict[str, object] = {}
        self.types: dict[str, str] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            if key in self.metadata:
                raise c.fail(f"metadata key {key!r} appears twice")
            type_id = c.unpack("<I", f"the value type of metadata {key!r}")
            self.metadata[key] = c.value(type_id, f"metadata {key!r}")
            self.types[key] = VALUE_TYPES[type_id][0]
            if type_id == 9:  # ARRAY: remember the element type too, for writing the file back
                self.types[key] = "ARRAY[" + _array_item_type(self.metadata[key]) + "]"

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.types.get("general.alignment", "UINT32") != "UINT32" or not (
            isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0
        ):
            raise c.fail(f"general.alignment must be a UINT32 power of two, got {alignment!r}")
        self.alignment = alignment

        infos = []
        for i in range(n_tensors):
            name = c.string(f"the name of tensor #{i}")
            where = f"tensor {name!r}"
            n_dims = c.unpack("<I", f"the dimension count of {where}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise c.fail(f"{where} has {n_dims} dimensions (ggml allows 1..{MAX_DIMS})")
            dims = [c.unpack("<Q", f"dimension {d} of {where}") for d in range(n_dims)]
            type_id = c.unpack("<I", f"the type of {where}")
            offset = c.unpack("<Q", f"the data offset of {where}")
            infos.append((name, dims, type_id, offset))
        data_start = -(-c.pos // self.alignment) * self.alignment
        if data_start > size:
            raise c.fail(
                f"the data section would start at {data_start}, beyond the file's {size} bytes — truncated?"
            )
        self.data_start = data_start

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, type_id, offset in infos:
            where = f"{self.path}: tensor {name!r}"
            if name in self.tensors:
                raise GGUFError(f"{where} appears twice")
            if type_id not in GGML_TYPES:
                known = _OTHER_GGML_TYPES.get(type_id)
                what = (
                    f"type {known} ({type_id}) is not supported" if known else f"unknown ggml type {type_id}"
                )
                raise GGUFError(
                    f"{where}: {what} (supported: {', '.join(n for n, _, _ in GGML_TYPES.values())})"
                )
            ggml_type, per_block, block_bytes = GGML_TYPES[type_id]
            if any(d <= 0 for d in dims):
                raise GGUFError(f"{where}: dims {dims} must all be positive")
            if dims[0] % per_block:
                raise GGUFError(
                    f"{where}: {ggml_type} rows of {dims[0]} are not whole {per_block}-value blocks"
                )
            nbytes = (
                math.prod(dims) // per_block * block_bytes
            )  # a Python int: 10**30 is a number, not a crash
            if offset % self.alignment:
                raise GGUFError(
                    f"{where}: data offset {offset} is not a multiple of the alignment {self.alignment}"
                )
            if offset + nbytes > size - data_start:
                raise GGUFError(
                    f"{where}: {ggml_type} {dims[::-1]} needs bytes [{offset}, {offset + nbytes}) of the data section, "
                    f"which has {size - data_start} — truncated or lying offset?"
                )
            self.tensors[name] = GGUFTensorInfo(
                name, ggml_type, tuple(dims[::-1]), data_start + offset, nbytes
            )
        previous = None
        for t in sorted(self.tensors.values(), key=lambda t: t.offset):
            if previous is not None and t.offset < previous.offset + previous.nbytes:
                raise GGUFError(
                    f"{self.path}: tensors {previous.name!r} and {t.name!r} overlap in the data section"
                )
            previous = t

    def _release_header(self) -> None:
        """Hand the header's pages of the mapping back to the kernel, now that it is parsed into Python objects.

        The header was read through the mapping, and a touched page of a mapping counts in the process's resident
        memory for as long as the mapping lives (here: as long as a weight views it). A Qwen3 file's header is
        mostly the tokenizer (151,936 token strings and 151,387 merges): 5.7 MiB of a 373 MiB Q4_K_M file that no
        one reads again. MADV_DONTNEED on a read-only file mapping only unmaps those pages (the page cache keeps
        them; a later read faults them back in), so this changes no byte anyone sees. Whole pages before the data
        section only: the first tensor's bytes stay where they are.
        """
        end = self.data_start // mmap.PAGESIZE * mmap.PAGESIZE
        if end and hasattr(mmap, "MADV_DONTNEED"):  # (Linux, macOS; elsewhere the pages simply stay)
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, 0, end)
            except OSError:  # advice only: a system that refuses it loses nothing but the saving
                pass

    # ----------------------------------------------------------------------------------------- access

    def info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        return self.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only view of the file: F32/F16 floats, BF16 as uint16 bits, or for a block
        type uint8 [*shape[:-1], bytes per row]."""
        t = self.info(name)
        if t.ggml_type in _FLOAT_DTYPES:
            dtype = _FLOAT_DTYPES[t.ggml_type]
            return np.frombuffer(self._mmap, dtype, math.prod(t.shape), t.offset).reshape(t.shape)
        flat = np.frombuffer(self._mmap, np.uint8, t.nbytes, t.offset)
        return flat.reshape(*t.shape[:-1], -1)

    def read_into(self, name: str, out: np.ndarray, first: int = 0) -> np.ndarray:
        """Copy a tensor's stored values into `out` (C-contiguous, the raw dtype) by a positioned read of the file,
        never through the mapping: the process then holds one copy of those bytes, not the copy plus the mapping's
        pages (which count in its resident memory once touched). `first`: skip that many rows of the outermost
        dimension (one expert of a stacked tensor)."""
        t = self.info(name)
        row = t.nbytes // t.shape[0] if t.shape and t.shape[0] else 0
        start, size = t.offset + first * row, out.nbytes
        if not out.flags.c_contiguous or start + size > t.offset + t.nbytes:
            raise GGUFError(f"{self.path}: cannot read {size} bytes of tensor {name!r} from row {first}")
        view, done = memoryview(out.reshape(-1)).cast("B"), 0
        self._file.seek(start)
        while done < size:  # a large read may return less than asked for
            n = self._file.readinto(view[done:])
            if not n:
                raise GGUFError(f"{self.path}: tensor {name!r} is cut short ({done} of {size} bytes)")
            done += n
        return out

    def get(self, name: str):
        """F32 as a view; F16 and BF16 widened exactly to float32; Q8_0/Q4_K/Q6_K as a QuantizedTensor (a view)."""
        t = self.info(name)
        raw = self.raw(name)
        if t.ggml_type == "F32":
            return raw
        if t.ggml_type == "F16":
            return raw.astype(np.float32)
        if t.ggml_type == "BF16":
            return bf16_to_float32(raw)
        return QuantizedTensor(t.ggml_type.lower(), t.shape, raw)

    def close(self) -> None:
        for attr in ("_mmap", "_file"):
            obj = getattr(self, attr, None)
            if obj is not None:
                try:
                    obj.close()
                except (
                    BufferError
                ):  # a NumPy view still points into the mapping; it closes when they are gone
                    pass
                setattr(self, attr, None)

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def _array_item_type(value) -> str:
    if isinstance(value, np.ndarray):
        return "BOOL" if value.dtype == bool else _NUMPY_VALUE_TYPES[value.dtype.newbyteorder("<").str]
    if isinstance(value, StringArray):
        return "STRING"
    if len(value) and isinstance(value[0], list):
        return "ARRAY"
    return "STRING"


_NUMPY_VALUE_TYPES = {
    "|u1": "UINT8", "|i1": "INT8", "<u2": "UINT16", "<i2": "INT16", "<u4": "UINT32", "<i4": "INT32",
    "<f4": "FLOAT32", "<u8": "UINT64", "<i8": "INT64", "<f8": "FLOAT64",
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(value, type_name: str) -> bytes:
    if type_name.startswith("ARRAY"):
        item = type_name[6:-1] if type_name.startswith("ARRAY[") else None
        if item is None:
            item = (
                _array_item_type(value)
                if isinstance(value, (np.ndarray, StringArray))
                else _infer_type(value[0])
            )
        head = struct.pack("<IQ", VALUE_TYPE_IDS[item], len(value))
        fmt = VALUE_TYPES[VALUE_TYPE_IDS[item]][1]
        if fmt is not None:
            return head + np.asarray(value, dtype=np.dtype(fmt)).tobytes()
        return head + b"".join(_pack_value(v, item) for v in value)
    if type_name == "STRING":
        return _pack_string(value)
    return struct.pack(VALUE_TYPES[VALUE_TYPE_IDS[type_name]][1], value)


def _infer_type(value) -> str:
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "UINT32" if 0 <= value < 2**32 else "INT64"
    if isinstance(value, float):
        return "FLOAT32"
    if isinstance(value, str):
        return "STRING"
    if isinstance(value, np.ndarray):
        return f"ARRAY[{_array_item_type(value)}]"
    if isinstance(value, StringArray):
        return "ARRAY[STRING]"
    if isinstance(value, (list, tuple)):
        return "ARRAY[" + (_infer_type(value[0]) if value else "INT32") + "]"
    raise TypeError(f"cannot store {type(value).__name__} in GGUF metadata")


@dataclass(frozen=True)
class LazyTensor:
    """A tensor for `write_gguf` whose data is made only when it is written: `make()` returns what `tensors` may
    hold (an array or a QuantizedTensor) of exactly `ggml_type` and `shape`."""

    ggml_type: str
    shape: tuple[int, ...]
    make: object  # () -> array | QuantizedTensor


def _tensor_entry(name: str, value) -> tuple[str, tuple[int, ...], object]:
    """(ggml type, numpy-order shape, the bytes' source) for one tensor to write."""
    if isinstance(value, QuantizedTensor):
        return value.qtype.upper(), tuple(value.shape), value.data
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "BF16":  # ("BF16", uint16 bits)
        return "BF16", value[1].shape, np.ascontiguousarray(value[1], dtype="<u2")
    arr = np.asarray(value)
    if arr.dtype == np.float16:
        return "F16", arr.shape, np.ascontiguousarray(arr, dtype="<f2")
    if arr.dtype.kind != "f":
        raise TypeError(f"tensor {name!r}: cannot write dtype {arr.dtype} (floats or a QuantizedTensor)")
    return "F32", arr.shape, np.ascontiguousarray(arr, dtype="<f4")


def write_gguf(
    path: str | os.PathLike, metadata: dict[str, object], tensors: dict, alignment: int = DEFAULT_ALIGNMENT
) -> None:
    """Write a GGUF v3 file. `metadata`: key -> value, or key -> (value, type name) to choose the type ("UINT32",
    "ARRAY[INT32]", ...; inferred otherwise: int -> UINT32, float -> FLOAT32, str, bool, lists). `tensors`: name ->
    float32/float16 array, ("BF16", uint16 bits), a QuantizedTensor — or a `LazyTensor` (its type and shape now, its
    data made only when written), so a quantizer streams a model without holding it all in memory.

    Tensors are written in the given order, each at the next multiple of `alignment`.
    """
    if alignment != DEFAULT_ALIGNMENT:
        metadata = {**metadata, "general.alignment": (alignment, "UINT32")}
    header = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    for key, value in metadata.items():
        value, type_name = (
            value
            if isinstance(value, tuple)
            and len(value) == 2
            and isinstance(value[1], str)
            and (value[1] in VALUE_TYPE_IDS or value[1].startswith("ARRAY"))
            else (value, _infer_type(value))
        )
        base = "ARRAY" if type_name.startswith("ARRAY") else type_name
        header += [_pack_string(key), struct.pack("<I", VALUE_TYPE_IDS[base]), _pack_value(value, type_name)]
    # the tensor infos need every tensor's type, shape and size before any data; a LazyTensor says them up front
    entries = []
    offset = 0
    for name, value in tensors.items():
        if isinstance(value, LazyTensor):
            ggml_type, shape, data = value.ggml_type, tuple(value.shape), value
        else:
            ggml_type, shape, data = _tensor_entry(name, value)
        nbytes = tensor_nbytes(ggml_type, shape)
        header += [
            _pack_string(name),
            struct.pack("<I", len(shape)),
            struct.pack(f"<{len(shape)}Q", *shape[::-1]),
            struct.pack("<IQ", GGML_TYPE_IDS[ggml_type], offset),
        ]
        entries.append((data, nbytes))
        offset += -(-nbytes // alignment) * alignment
    blob = b"".join(header)
    tmp = Path(str(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.write(b"\0" * (-len(blob) % alignment))
        for name, (data, nbytes) in zip(tensors, entries, strict=True):
            if isinstance(data, LazyTensor):
                lazy = data
                made_type, made_shape, data = _tensor_entry(name, lazy.make())
                if (made_type, tuple(made_shape)) != (lazy.ggml_type, tuple(lazy.shape)):
                    raise ValueError(
                        f"tensor {name!r}: made {made_type} {made_shape}, announced {lazy.ggml_type} {lazy.shape}"
                    )
            raw = memoryview(np.ascontiguousarray(data)).cast("B")
            if len(raw) != nbytes:
                raise ValueError(
                    f"tensor {name!r}: {len(raw)} bytes written, {nbytes} announced in the header"
                )
            f.write(raw)
            f.write(b"\0" * (-nbytes % alignment))
    os.replace(tmp, path)
