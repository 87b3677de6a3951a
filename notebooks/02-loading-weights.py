# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2 · Loading weights
#
# A trained language model is a few hundred named arrays of numbers. Qwen3-0.6B has 596 million of them, Qwen3-30B-A3B
# has 30.5 billion. Before we can compute anything we must get those numbers off the disk and into NumPy arrays with
# the right names, shapes and values. Every later chapter builds on this one. If a single tensor is read at the
# wrong offset, or widened from bfloat16 the wrong way, the model still runs but its output is noise.
#
# An official Qwen3 checkpoint on the Hugging Face Hub is a folder:
#
# | file | what it holds |
# |---|---|
# | `config.json` | the architecture: how many layers, heads, dimensions (section 11) |
# | `model.safetensors` | every weight, in the *safetensors* format (sections 2–9) |
# | or `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` | the weights split into shards, and a table of contents (section 10) |
# | `generation_config.json`, `tokenizer.json`, … | sampling defaults and the tokenizer ([chapter 1](01-tokenization.ipynb)) |
#
# We will read this folder byte by byte, with nothing but `struct`, `json` and NumPy, and build six functions:
# `read_header`, `bf16_to_float32`, `read_tensor`, `map_tensor`, `load_checkpoint` and `expected_shapes`.
# At the end, the weights *our* loader reads go into the real model. Its logits must equal the ones
# Hugging Face `transformers` computed from the same files.

# %%
import json
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

# %% [markdown]
# Like every chapter, this one starts by importing `course_setup.py` (beside the notebooks), which puts the
# `tinyqwen` of this repository first on the import path. We use the two fixture checkpoints in `tests/fixtures/`:

# %%
from course_setup import FIXTURES, REPO  # this checkout's tinyqwen first on sys.path (course_setup.py)
TIED = FIXTURES / "dense-tied"  # F32, one model.safetensors
SHARDED = FIXTURES / "dense-untied-bf16-sharded"  # BF16, two shards + an index

# %% [markdown]
# ## 1. A checkpoint is a folder
#
# The repository ships tiny random checkpoints in exactly the official layout (see `tests/fixtures/README.md`). They
# have the real structure (Qwen3's tensor names, config keys and file formats) but a vocabulary of 512 and a width
# of 64, so they load in milliseconds. We use two of them: `dense-tied` stores float32 in one file, and
# `dense-untied-bf16-sharded` stores bfloat16 in two shards, as the big official models do.

# %%
for folder in (TIED, SHARDED):
    print(folder.name)
    for file in sorted(folder.iterdir()):
        print(f"  {file.name:<36} {file.stat().st_size:>9,} bytes")

# %% [markdown]
# `reference.npz` and `generate.json` are not part of a Hub checkpoint. They hold what `transformers` computed from
# these files, and they are our official answer key.
#
# ## 2. The safetensors format at a glance
#
# A `.safetensors` file has exactly three parts:
#
# ```
#  byte 0      8                          8 + N                                              end of file
#      ┌──────┬──────────────────────────┬──────────────────┬─────────────┬─────┬──────────────┐
#      │  N   │ header: N bytes of JSON  │ tensor A's bytes │ tensor B's  │ ... │ last tensor  │
#      └──────┴──────────────────────────┴──────────────────┴─────────────┴─────┴──────────────┘
#       uint64  {"A": {"dtype": "F32",    ↑
#       little   "shape": [512, 64],      data area: every "data_offsets" counts from this byte
#       endian   "data_offsets": [0, 131072]}, ...}
# ```
#
# The JSON header maps each tensor name to its `dtype`, its `shape` and the `[start, end)` byte range of its data
# *inside the data area*. After the header come the raw bytes, tensor after tensor, with no gaps. That is the whole
# format.
#
# Why not Python's `pickle`, which PyTorch's older `.bin` checkpoints use? Unpickling a file can run arbitrary code.
# Reading a safetensors file only parses JSON and copies bytes. And because each tensor is a plain byte range, we
# never need to read the whole file. We can map it into memory and touch only what we use (section 9).
#
# ## 3. The first 8 bytes: the header length
#
# Let us look at the raw bytes of the float32 fixture. (Reading a 0.5 MB file whole is fine. Section 9 shows how to
# avoid reading a 60 GB one.)

# %%
path = TIED / "model.safetensors"
raw = path.read_bytes()
raw[:8].hex(" ")

# %% [markdown]
# These 8 bytes are one unsigned 64-bit integer $N$, stored **little-endian**: the least significant byte comes
# first. Read right to left they are `00 00 00 00 00 00 09 a8`, so $N = \mathtt{0x09a8} = 9 \cdot 256 + 168 = 2472$.
# `struct`'s format `"<Q"` means little-endian (`<`) unsigned 64-bit (`Q`).

# %%
N = struct.unpack("<Q", raw[:8])[0]
N, int.from_bytes(raw[:8], "little"), int.from_bytes(raw[:8], "big")

# %% [markdown]
# Read big-endian, the same bytes give about $1.2 \times 10^{19}$, a "header" larger than any disk. This is the first
# classic mistake. Real readers refuse such a number before allocating anything. The official library caps the
# header at 100 MB, and the header of a real 30B model is about 2 MB.
#
# ## 4. The header: a JSON object
#
# The next $N$ bytes are UTF-8 JSON:

# %%
header = json.loads(raw[8 : 8 + N])
print(raw[8:160].decode())
print("...", len(header), "entries; metadata:", header["__metadata__"])

# %% [markdown]
# One entry, `"__metadata__"`, is not a tensor. It holds free-form strings, and transformers writes
# `{"format": "pt"}` there. Every other entry describes one tensor. The data area starts right after the header,
# at byte $8 + N$. The official writer pads the header with spaces so that this position is a multiple of 8, which
# keeps every tensor aligned for fast access:

# %%
data_start = 8 + N
raw[data_start - 8 : data_start], data_start % 8

# %% [markdown]
# That is our first function. It reads only the first $8 + N$ bytes of the file, however large the file is:

# %%
def read_header(path) -> tuple[dict, int]:
    """The parsed JSON header (with "__metadata__") and the file position where the data area starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


header, data_start = read_header(path)
header["model.embed_tokens.weight"], data_start

# %% [markdown]
# tinyqwen's reader (`tinyqwen/safetensors.py`) does the same and also checks every number against the real file
# size, so a truncated or hostile file gets a clear error instead of a crash. It stores *absolute* positions
# ($8 + N + $ `start`). Ours agree:

# %%
from tinyqwen import safetensors as st

infos, metadata = st.read_header(path)
assert metadata == header["__metadata__"]
assert all(infos[name].start == data_start + header[name]["data_offsets"][0] for name in infos)
infos["model.embed_tokens.weight"]

# %% [markdown]
# ## 5. Offsets: where each tensor lives
#
# A tensor's `data_offsets` must span exactly $\prod(\text{shape}) \times \text{bytes per element}$ bytes:

# %%
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
tensors = {name: t for name, t in header.items() if name != "__metadata__"}
for name, t in list(tensors.items())[:5]:
    start, end = t["data_offsets"]
    print(f"{name:<44} {t['dtype']:<4} {str(t['shape']):<10} [{start:>6}, {end:>6})  {end - start:>6} bytes")

# %%
assert all(np.prod(t["shape"]) * ITEMSIZE[t["dtype"]] == t["data_offsets"][1] - t["data_offsets"][0]
           for t in tensors.values())

# %% [markdown]
# The tensors also *tile* the data area: sorted by offset, each starts where the previous one ends, the first at 0 and
# the last at the end of the file. So there is no hole in which data could hide, and no overlap that would make two
# "different" weights share bytes. The official reader rejects files that break this rule, and so does tinyqwen's.

# %%
spans = sorted(tuple(t["data_offsets"]) for t in tensors.values())
assert spans[0][0] == 0 and spans[-1][1] == len(raw) - data_start
assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))

# %% [markdown]
# To draw the whole file to scale, we colour each tensor by the part of the network it belongs to, which we read
# from its name:

# %%
COLOURS = {"embed": "tab:blue", "lm_head": "tab:purple", "norm": "tab:red", "self_attn": "tab:orange", "mlp": "tab:green"}


def kind(name: str) -> str:
    return next(k for k in COLOURS if k in name)  # "norm" before "self_attn": q_norm/k_norm count as norms


[kind(n) for n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_norm.weight", "model.layers.0.mlp.up_proj.weight")]

# %% [markdown]
# Now the picture: the length prefix and header in gray, then one coloured span per tensor, at its real position
# and length.

# %%
fig, ax = plt.subplots(figsize=(11, 1.8))
ax.broken_barh([(0, data_start)], (0, 1), color="lightgray")
for name, t in tensors.items():
    start, end = t["data_offsets"]
    ax.broken_barh([(data_start + start, end - start)], (0, 1), color=COLOURS[kind(name)], edgecolor="white", lw=0.3)
present = [k for k in COLOURS if any(kind(n) == k for n in tensors)]  # no lm_head: this fixture is tied
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ["lightgray", *(COLOURS[k] for k in present)]]
ax.legend(handles, ["length + header", *present], ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.45))
ax.set(yticks=[], xlabel="byte position in model.safetensors", title=f"{path.parent.name}/{path.name}: {len(raw):,} bytes")
plt.show()

# %% [markdown]
# Almost every byte belongs to a matrix. The embedding is the big blue block, and attention and MLP projections
# fill the rest. The RMSNorm weights (red) are 256 bytes each, too thin to see. In real models this is even
# more extreme.
#
# ## 6. From bytes to numbers: float32
#
# The data is the array in C order (row-major), little-endian, with no padding between elements. The first 4 bytes
# of the data area are element `[0, 0]` of the embedding:

# %%
first = raw[data_start : data_start + 4]
first.hex(" "), struct.unpack("<f", first)[0]

# %% [markdown]
# A float32 packs three fields into 32 bits: a **sign** bit $s$, 8 **exponent** bits $e$ and 23 **mantissa** bits $m$.
# A normal value equals
#
# $$x = (-1)^s \cdot 2^{\,e - 127} \cdot \left(1 + \frac{m}{2^{23}}\right).$$
#
# We can take the bits apart by hand and rebuild the value:

# %%
bits = int.from_bytes(first, "little")
s, e, m = bits >> 31, (bits >> 23) & 0xFF, bits & 0x7FFFFF
print(f"{bits:032b}  s={s} e={e} m={m}")
(-1) ** s * 2.0 ** (e - 127) * (1 + m / 2**23)

# %% [markdown]
# To see the three fields, we draw a bit pattern as a row of boxes, coloured by field, with the 1 bits darker:

# %%
def draw_bits(ax, value_bits: int, n: int, y: float, label: str) -> None:
    """Draw the n-bit pattern as boxes: sign red, exponent blue, mantissa green (float32 and bf16 share the layout)."""
    for i in range(n):
        bit = (value_bits >> (n - 1 - i)) & 1
        colour = "tab:red" if i == 0 else "tab:blue" if i <= 8 else "tab:green"
        ax.add_patch(plt.Rectangle((i, y), 0.95, 0.9, color=colour, alpha=0.35 + 0.5 * bit))
        ax.text(i + 0.47, y + 0.45, str(bit), ha="center", va="center", fontsize=9)
    ax.text(-0.5, y + 0.45, label, ha="right", va="center")


# %% [markdown]
# We draw $\pi$ twice: as a float32, and as its top 16 bits. `.view(np.uint32)` gives the raw bit pattern of a
# float32 without changing any bit, the same trick the next section uses in reverse.

# %%
pi32 = int(np.array(np.pi, dtype=np.float32).view(np.uint32))
pi16 = pi32 >> 16  # bfloat16 by truncation, for the picture (section 7 rounds properly)
fig, ax = plt.subplots(figsize=(11, 2.2))
draw_bits(ax, pi32, 32, 1.2, f"float32 {np.float32(np.pi):.7f}")
draw_bits(ax, pi16, 16, 0, f"bfloat16 {np.array(pi16 << 16, dtype=np.uint32).view(np.float32):.7f}")
ax.set(xlim=(-9, 32.5), ylim=(-0.2, 2.3), xticks=[0.5, 4.5, 20], xticklabels=["sign", "exponent (8 bits)", "mantissa"])
ax.set_yticks([])
ax.set_title("π in float32, and the same top 16 bits as bfloat16")
plt.show()

# %% [markdown]
# ## 7. bfloat16: the top half of a float32
#
# Most official Qwen3 checkpoints store **bfloat16** ("brain float", `BF16`). It keeps float32's sign and its 8
# exponent bits and only the first 7 of the 23 mantissa bits. So a bf16 number *is* the top 16 bits of a float32.
# It has float32's enormous range, about $10^{-38}$ to $3 \times 10^{38}$, with only 2 to 3 significant decimal digits.
# The weights take half the bytes.
#
# NumPy has no bfloat16 type. We read the bytes as `uint16` **bit patterns** and widen them ourselves. Here are the
# first four values of the BF16 fixture's embedding:

# %%
shard1 = SHARDED / "model-00001-of-00002.safetensors"
h1, start1 = read_header(shard1)
offset = start1 + h1["model.embed_tokens.weight"]["data_offsets"][0]
u16 = np.frombuffer(shard1.read_bytes()[offset : offset + 8], dtype="<u2")
u16, [f"{u:016b}" for u in u16]

# %% [markdown]
# To widen one value, we put its 16 bits on top of 16 zero bits and read the 32 bits as a float32. Here is a loop
# version first, one value at a time:

# %%
def bf16_to_float32_loop(patterns) -> np.ndarray:
    out = []
    for u in patterns:
        four_bytes = struct.pack("<I", int(u) << 16)  # the bf16 bits on top, 16 zero bits below
        out.append(struct.unpack("<f", four_bytes)[0])
    return np.array(out, dtype=np.float32)


bf16_to_float32_loop(u16)

# %% [markdown]
# The vectorised version does the same to a whole array: widen to `uint32`, shift left by 16, and **reinterpret** the
# bits as float32 with `.view`. `.view` does not convert numbers. `u16.astype(np.float32)` would turn the *integer*
# 16256 into 16256.0, another classic mistake.

# %%
def bf16_to_float32(u16: np.ndarray) -> np.ndarray:  # [...] uint16 -> [...] float32
    return (u16.astype(np.uint32) << 16).view(np.float32)


assert np.array_equal(bf16_to_float32(u16), bf16_to_float32_loop(u16))
bf16_to_float32(np.array([0x3F80, 0xC000, 0x4049, 0x7F80], dtype=np.uint16))  # 1, -2, π in bf16, +inf

# %% [markdown]
# No rounding happens here, because every bf16 value is exactly a float32 value. So the check against the official
# implementation can be exact. `exercises/references/ch02_loading_weights.npz` holds torch's float32 value for all
# 65,536 bf16 bit patterns (its generator is `exercises/references/make_ch02_loading_weights.py`). That covers zeros,
# subnormals, infinities and every NaN, and ours must agree bit for bit:

# %%
from tinyqwen import bf16  # tinyqwen/bf16.py: the two conversions, used by everything that reads bf16

ref2 = np.load(REPO / "exercises" / "references" / "ch02_loading_weights.npz")
ours = bf16_to_float32(ref2["bf16_bits"])
assert np.array_equal(ours.view(np.uint32), ref2["bf16_as_f32"].view(np.uint32))
assert np.array_equal(ours.view(np.uint32), bf16.bf16_to_float32(ref2["bf16_bits"]).view(np.uint32))
print("all 65,536 bf16 patterns widen exactly as torch does (and as tinyqwen does)")

# %% [markdown]
# Going the other way, from float32 to bf16, drops 16 mantissa bits, so it must round. torch rounds to nearest, ties to
# even, and tinyqwen's `float32_to_bf16` does the same. bf16 keeps 8 significant bits (7 stored plus the implicit
# leading 1), so the relative error is at most $2^{-8} \approx 0.4\%$: half a step, for a value just above a power
# of two. Let us round the float32 fixture's weights to bf16 and look at the error:

# %%
weights = np.concatenate([st.load_file(path)[n].ravel() for n in tensors])
rounded = bf16.bf16_to_float32(bf16.float32_to_bf16(weights))
rel = np.abs(rounded - weights) / np.abs(weights)
plt.figure(figsize=(7, 3))
plt.hist(rel, bins=100, color="tab:blue")
plt.axvline(2**-8, color="tab:red", ls="--", label="$2^{-8}$: the largest possible error")
plt.gca().set(xlabel="relative error |bf16(w) - w| / |w|", ylabel="weights",
              title=f"Rounding {weights.size:,} float32 weights to bfloat16")
plt.legend()
plt.show()

# %% [markdown]
# Why did the ML world choose bf16 over the older float16 (`F16`), which has 10 mantissa bits and is more precise?
# Range. float16 has only 5 exponent bits and overflows at 65,504. Activations, and even more so their squares,
# exceed that easily ([chapter 3](03-embeddings-rmsnorm.ipynb) shows it happen in RMSNorm). bf16 gives up precision
# to keep float32's range:

# %%
formats = {  # smallest normal, largest finite, stored mantissa bits
    "float32": (2.0**-126, 3.4028235e38, 23),
    "bfloat16": (2.0**-126, 3.3895314e38, 7),
    "float16": (2.0**-14, 65504.0, 10),
}
fig, ax = plt.subplots(figsize=(9, 3.2))
for y, (label, (smallest, largest, bits)) in enumerate(formats.items()):
    ax.hlines(y, smallest, largest, lw=14, color=f"C{y}")
    digits = (bits + 1) * np.log10(2)  # significant bits: the stored ones plus the implicit leading 1
    ax.text(1e-39, y + 0.3, f"{label}: ~{digits:.1f} significant digits, from {smallest:.2g} to {largest:.4g}")
ax.axvspan(1e-3, 1e4, color="gray", alpha=0.2)
ax.text(2e4, -0.45, "← typical weights and activations", fontsize=8)
ax.set(xscale="log", xlim=(1e-40, 1e40), ylim=(-0.6, 2.75), yticks=[], xlabel="magnitude |x| (normal numbers)",
       title="Range of the three float formats (bars) and their precision (labels)")
plt.show()

# %% [markdown]
# ## 8. Reading one tensor
#
# Now we can read any tensor: look up its entry, seek to `data_start + start`, read `end - start` bytes, interpret
# them with the right little-endian NumPy dtype and reshape them. Along the way, BF16 and F16 are widened to float32,
# the type the rest of this course computes in.

# %%
# safetensors dtype name -> NumPy dtype, little-endian ("<") whatever this machine's byte order; BF16 as raw bits
NUMPY_DTYPE = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
               "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


# %% [markdown]
# The function has three steps: find the bytes, read exactly those bytes, and give them a type and a shape.

# %%
def read_tensor(path, name: str) -> np.ndarray:
    header, data_start = read_header(path)
    t = header[name]
    start, end = t["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + start)  # offsets count from the data area, not from the file's first byte
        data = f.read(end - start)
    array = np.frombuffer(data, dtype=NUMPY_DTYPE[t["dtype"]]).reshape(t["shape"])
    if t["dtype"] == "BF16":
        return bf16_to_float32(array)
    return array.astype(np.float32) if t["dtype"] == "F16" else array


E = read_tensor(path, "model.embed_tokens.weight")
E.shape, E.dtype

# %% [markdown]
# Row-major means that row $i$ of the embedding, the vector of token $i$, is one contiguous run of
# $64 \times 4 = 256$ bytes starting at $i \times 256$:

# %%
i = 5
at = data_start + header["model.embed_tokens.weight"]["data_offsets"][0] + i * 64 * 4
assert np.array_equal(E[i], np.frombuffer(raw[at : at + 256], dtype="<f4"))

# %% [markdown]
# Our reader agrees with tinyqwen's on every tensor of both fixtures, the F32 file and the two BF16 shards:

# %%
for file in (path, shard1, SHARDED / "model-00002-of-00002.safetensors"):
    with st.SafetensorsFile(file) as f:
        assert all(np.array_equal(read_tensor(file, n), f.get(n)) for n in f.keys())
print("read_tensor == tinyqwen's SafetensorsFile.get on all tensors of 3 files")

# %% [markdown]
# The official reference: `exercises/references/ch02_loading_weights.safetensors` was written by the official
# `safetensors` library from torch tensors in four dtypes (F32, BF16, F16, I64). Among them are a 0-d scalar (shape `[]`, one value) and
# the bf16 special values $\pi$, $2^{-20}$, the largest finite bf16 and $\infty$. torch's reading of each is in the
# `.npz`:

# %%
small = REPO / "exercises" / "references" / "ch02_loading_weights.safetensors"
for name, t in read_header(small)[0].items():
    if name != "__metadata__":
        got, want = read_tensor(small, name), ref2[f"tensor.{name}"]
        assert got.shape == want.shape and np.array_equal(got, want), name
        print(f"{name:<13} {t['dtype']:<4} {str(t['shape']):<7} {got.ravel()[:4]}")

# %% [markdown]
# ## 9. Memory mapping: loading lazily
#
# `read_tensor` *copies* bytes into memory. For a 16 GB checkpoint that means 16 GB of reading before the first token,
# and 16 GB of RAM, even for tensors we might never use. Operating systems offer something better. `mmap` maps a file
# into the process's address space, and the bytes appear to be in memory but are only read from disk, one 4 KB *page*
# at a time, when something first touches them. NumPy wraps this as `np.memmap`. It takes the same three facts from the
# header (dtype, shape, offset) and returns an array that is a window onto the file:

# %%
def map_tensor(path, name: str) -> np.ndarray:
    """The tensor as stored (BF16 as uint16 bit patterns), memory-mapped read-only: nothing is read yet."""
    header, data_start = read_header(path)
    t = header[name]
    return np.memmap(path, dtype=NUMPY_DTYPE[t["dtype"]], mode="r",
                     offset=data_start + t["data_offsets"][0], shape=tuple(t["shape"]))


M = map_tensor(path, "model.embed_tokens.weight")
type(M).__name__, M.shape, np.array_equal(M, E)

# %% [markdown]
# To *see* the laziness we need a big file. We write a safetensors file holding one 2 GiB float32 matrix without
# writing 2 GiB. We write the header, then extend the file to its full length with `truncate`. The file system
# records the rest as a hole of zeros that takes no disk space (a "sparse" file).

# %%
tmp = Path(tempfile.mkdtemp())
big = tmp / "big.safetensors"
rows, cols = 32768, 16384  # 2 GiB of float32
head = json.dumps({"big": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}}).encode()
head += b" " * (-len(head) % 8)
with open(big, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head)
    f.truncate(8 + len(head) + rows * cols * 4)
print(f"{big.stat().st_size / 2**30:.2f} GiB long, {getattr(big.stat(), 'st_blocks', 0) * 512 / 2**20:.2f} MiB on disk")

# %% [markdown]
# Mapping it takes a fraction of a millisecond (mostly reading the header), however big the tensor is, because
# none of its bytes are read:

# %%
t0 = time.perf_counter()
A = map_tensor(big, "big")
t1 = time.perf_counter()
row = np.array(A[12345])  # touch one row: 64 KiB
t2 = time.perf_counter()
print(f"mapping {A.nbytes / 2**30:.0f} GiB: {(t1 - t0) * 1e3:.2f} ms; reading one {row.nbytes // 1024} KiB row: {(t2 - t1) * 1e3:.2f} ms")

# %% [markdown]
# Memory is paid only for what is touched. On Linux, `/proc/self/statm` reports the process's *resident* memory,
# the pages that are really in RAM. We touch more and more rows and watch it grow:

# %%
def resident_mib() -> float | None:
    """This process's resident memory in MiB (Linux; None where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        return None


# %% [markdown]
# Now we touch the matrix 256 rows (16 MiB) at a time, up to 128 MiB, and record how much the resident memory has
# grown after each step:

# %%
if resident_mib() is None:
    print("resident memory is not measurable on this system (no /proc); the figure is skipped")
else:
    before, touched, grown = resident_mib(), [0], [0.0]
    for stop in range(256, 2049, 256):  # up to 2048 rows = 128 MiB, 1/16 of the matrix
        float(A[stop - 256 : stop].sum())  # read 256 more rows (16 MiB)
        touched.append(stop * cols * 4 / 2**20)
        grown.append(resident_mib() - before)
    plt.figure(figsize=(6, 3.2))
    plt.plot(touched, grown, "o-", label="resident memory growth")
    plt.plot([0, touched[-1]], [0, touched[-1]], "k:", label="1 MiB per MiB touched")
    plt.gca().set(xlabel="MiB of the 2 GiB tensor touched", ylabel="MiB resident",
                  title="A memory-mapped tensor costs only the pages you touch")
    plt.legend()
    plt.show()

# %% [markdown]
# A mapped array is a view of the file, not a copy of it. If the file changes, the array changes. We can show this on
# a copy of the fixture by overwriting one float in the file:

# %%
del A, row
shutil.rmtree(tmp)  # the 2 GiB hole, gone

# %%
tmp = Path(tempfile.mkdtemp())
copy = shutil.copy(path, tmp / "model.safetensors")
norm = map_tensor(copy, "model.norm.weight")
print("before:", norm[:3])
with open(copy, "r+b") as f:
    f.seek(data_start + header["model.norm.weight"]["data_offsets"][0])
    f.write(struct.pack("<f", 42.0))
print("after: ", norm[:3], "  <- the array saw the file change")

# %% [markdown]
# This is why the mapping is opened read-only (`mode="r"`): writing to `norm` raises an error, so the model can never
# overwrite its own checkpoint by accident. For the same reason, tinyqwen's `save_file` never overwrites a file in
# place. It writes a new file and renames it over the old one, so arrays still mapped from the old file keep their bytes.
#
# One catch: mapping gives the bytes *as stored*. A BF16 tensor arrives as `uint16` patterns, and widening it to float32
# creates a new array, twice the file size, in RAM. tinyqwen's loader therefore keeps F32 tensors as read-only views
# of the mapping at no cost, while BF16 checkpoints are widened once, when they are loaded.

# %%
del norm
shutil.rmtree(tmp)
with st.SafetensorsFile(path) as f:
    view = f.get("model.embed_tokens.weight")
print("tinyqwen's F32 tensor: writeable =", view.flags.writeable, "| owns its data =", view.flags.owndata)

# %% [markdown]
# ## 10. Shards and the index
#
# A single file for a 60 GB model is awkward to download and to resume, so the Hub splits big checkpoints into
# **shards** of a few GB each: `model-00001-of-00002.safetensors`, … Each shard is an ordinary safetensors file. A
# table of contents, `model.safetensors.index.json`, says which shard holds which tensor:

# %%
index = json.loads((SHARDED / "model.safetensors.index.json").read_text())
print(index["metadata"])
list(index["weight_map"].items())[:4]

# %% [markdown]
# `metadata.total_size` is the number of tensor bytes in all shards together. Headers and length prefixes are not
# counted. Let us check it:

# %%
shards = sorted(set(index["weight_map"].values()))
headers = {s: read_header(SHARDED / s)[0] for s in shards}
tensor_bytes = sum(t["data_offsets"][1] - t["data_offsets"][0]
                   for h in headers.values() for n, t in h.items() if n != "__metadata__")
tensor_bytes, index["metadata"]["total_size"]

# %% [markdown]
# The writer fills each shard up to a size limit in name order, so shard boundaries fall wherever the bytes run out,
# even in the middle of a layer:

# %%
groups = ["embed", "layer 0", "layer 1", "layer 2", "norm + head"]


def group(name: str) -> str:
    return "embed" if "embed" in name else f"layer {name.split('.')[2]}" if ".layers." in name else "norm + head"


# %% [markdown]
# We add up the bytes of each group of tensors (the embedding, each layer, the final norm and head), shard by
# shard:

# %%
fig, ax = plt.subplots(figsize=(7, 3))
bottom = np.zeros(len(groups))
for s, colour in zip(shards, ["tab:blue", "tab:orange"]):
    size = np.zeros(len(groups))
    for n, t in headers[s].items():
        if n != "__metadata__":
            size[groups.index(group(n))] += (t["data_offsets"][1] - t["data_offsets"][0]) / 1024
    ax.bar(groups, size, bottom=bottom, color=colour, label=s)
    bottom += size
ax.set(ylabel="KiB", ylim=(0, bottom.max() * 1.45), title="Which shard holds which layer's bytes (dense-untied-bf16-sharded)")
ax.legend(loc="upper left")
plt.show()

# %% [markdown]
# So a loader must not assume that a layer lives in one file. It asks the index for each tensor. When there is no
# index, the folder has a single `model.safetensors`. Reading each shard's header once, the loader is:

# %%
def load_checkpoint(directory) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint folder, by name, whether it is one file or an index plus shards."""
    directory = Path(directory)
    index_file = directory / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    else:
        weight_map = {n: "model.safetensors" for n in read_header(directory / "model.safetensors")[0]
                      if n != "__metadata__"}
    return {name: read_tensor(directory / file, name) for name, file in sorted(weight_map.items())}


weights_tied, weights_sharded = load_checkpoint(TIED), load_checkpoint(SHARDED)
len(weights_tied), len(weights_sharded)

# %% [markdown]
# (This `read_tensor` re-reads a shard's header for every tensor, which is fine here. tinyqwen's `Checkpoint`
# (`tinyqwen/checkpoint.py`) reads
# each header once and cross-checks the index against the headers. A tensor in the wrong shard, or in two shards, is
# an error.) Our loader and tinyqwen's agree:

# %%
from tinyqwen.checkpoint import Checkpoint  # noqa: E402

with Checkpoint(SHARDED) as ckpt:
    assert set(ckpt.keys()) == set(weights_sharded)
    assert all(np.array_equal(ckpt.get(n), a) for n, a in weights_sharded.items())
print(f"load_checkpoint == tinyqwen's Checkpoint on {len(weights_sharded)} tensors in {len(shards)} shards")

# %% [markdown]
# ## 11. config.json, field by field
#
# The weights are nameless numbers until `config.json` says what network they belong to. Here is the sharded
# fixture's config:

# %%
config = json.loads((SHARDED / "config.json").read_text())
config

# %% [markdown]
# | field | meaning | used in |
# |---|---|---|
# | `model_type`, `architectures` | `qwen3` (dense) or `qwen3_moe` (mixture of experts) | here |
# | `vocab_size` | rows of the embedding and of the output head, one per token | [ch. 3](03-embeddings-rmsnorm.ipynb) |
# | `hidden_size` | the width $H$ of the residual stream, the vector that flows through the layers | ch. 3, 6 |
# | `num_hidden_layers` | how many decoder layers | [ch. 6](06-dense-model.ipynb) |
# | `num_attention_heads` | query heads $H_q$ | [ch. 5](05-attention.ipynb) |
# | `num_key_value_heads` | key/value heads $H_{kv}$ (grouped-query attention: $H_q$ is a multiple) | ch. 5 |
# | `head_dim` | width of one head. **Not** `hidden_size / num_attention_heads` in Qwen3 | ch. 4, 5 |
# | `intermediate_size` | inner width of the SwiGLU MLP | ch. 6 |
# | `rms_norm_eps` | the $\varepsilon$ of every RMSNorm | ch. 3 |
# | `rope_theta`, `rope_scaling` | RoPE's base frequency, and YaRN for long context | [ch. 4](04-rope-yarn.ipynb) |
# | `max_position_embeddings` | the context length the model was trained for | ch. 4, 8 |
# | `tie_word_embeddings` | true: the output head *is* the embedding matrix, and there is no `lm_head.weight` | ch. 3, 6 |
# | `torch_dtype` | the dtype of the stored weights (`bfloat16`); we compute in float32 anyway | here |
# | `bos_token_id`, `eos_token_id` | special token ids (the stopping rule lives in `generation_config.json`) | [ch. 8](08-kv-cache-generation.ipynb) |
# | `attention_bias` | biases on q/k/v/o projections: false for Qwen3 | ch. 5 |
# | `use_sliding_window`, `sliding_window`, `max_window_layers` | sliding-window attention, switched off in Qwen3 | — |
# | `hidden_act`, `initializer_range`, `attention_dropout`, `use_cache` | `silu`; training-time and runtime settings | ch. 6 |
# | MoE only: `num_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `norm_topk_prob`, `decoder_sparse_step`, `mlp_only_layers`, `router_aux_loss_coef` | the experts, top-$k$, which layers are sparse | [ch. 7](07-mixture-of-experts.ipynb) |
#
# From the config we can predict the name and shape of every tensor in the checkpoint. A projection from width $a$
# to width $b$ is stored as a $[b, a]$ matrix (output rows, input columns; PyTorch's `nn.Linear` convention):

# %%
def expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of an official checkpoint with config.json `c` (dense or MoE)."""
    H, D, F = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    Q, KV = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H), "model.norm.weight": (H,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                   p + "self_attn.q_proj.weight": (Q, H), p + "self_attn.k_proj.weight": (KV, H),
                   p + "self_attn.v_proj.weight": (KV, H), p + "self_attn.o_proj.weight": (H, Q),
                   p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)}
        moe = (c.get("num_experts", 0) > 0 and i not in c.get("mlp_only_layers", [])
               and (i + 1) % c.get("decoder_sparse_step", 1) == 0)
        experts = [f"experts.{e}." for e in range(c["num_experts"])] if moe else [""]
        f = c["moe_intermediate_size"] if moe else F
        if moe:
            shapes[p + "mlp.gate.weight"] = (c["num_experts"], H)  # the router
        for x in experts:
            shapes |= {p + f"mlp.{x}gate_proj.weight": (f, H), p + f"mlp.{x}up_proj.weight": (f, H),
                       p + f"mlp.{x}down_proj.weight": (H, f)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], H)
    return shapes


# %% [markdown]
# Each layer contributes its 11 tensors (a dense layer) or its router plus three tensors per expert (a sparse
# one). Both fixtures must match exactly what our loader found in their files, name for name and shape for shape:

# %%
for folder, loaded in ((TIED, weights_tied), (SHARDED, weights_sharded)):
    want = expected_shapes(json.loads((folder / "config.json").read_text()))
    assert want == {n: a.shape for n, a in loaded.items()}, folder.name
print("every tensor of both fixtures is where config.json says, with the shape it says")

# %% [markdown]
# Two details of that function surprise newcomers:
# * `head_dim` is its own number. In Qwen3-0.6B, 16 heads × 128 = 2048 ≠ `hidden_size` 1024, so `q_proj` is
#   $[2048, 1024]$, not square. Computing `hidden_size // num_attention_heads` gives wrong shapes for every
#   official model.
# * With `tie_word_embeddings: true` there is no `lm_head.weight` at all. The model uses the embedding matrix for
#   the output too ([chapter 6](06-dense-model.ipynb)).
#
# The same function, applied to the official configs (`tinyqwen/data/configs/`), counts parameters. The official
# reference here is transformers: `make_ch02_loading_weights.py` built each model from its config on PyTorch's `meta`
# device (shapes only, no memory) and stored its tensor shapes.

# %%
ref_shapes = json.loads((REPO / "exercises" / "references" / "ch02_loading_weights.json").read_text())
CONFIGS = REPO / "tinyqwen" / "data" / "configs"  # the official config.json files, shipped with tinyqwen
models = {n: json.loads((CONFIGS / f"{n}.json").read_text()) for n in ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B")}
for n in ("Qwen3-0.6B", "Qwen3-8B"):
    assert {k: list(v) for k, v in expected_shapes(models[n]).items()} == ref_shapes["shapes"][n], n
moe30 = json.loads((CONFIGS / "Qwen3-30B-A3B.json").read_text())
s30 = expected_shapes(moe30)
assert (len(s30), sum(np.prod(v) for v in s30.values())) == (ref_shapes["moe"]["Qwen3-30B-A3B"]["num_tensors"],
                                                             ref_shapes["moe"]["Qwen3-30B-A3B"]["num_parameters"])
print(f"Qwen3-0.6B and Qwen3-8B shapes equal transformers'; Qwen3-30B-A3B: {len(s30):,} tensors, "
      f"{sum(np.prod(v) for v in s30.values()) / 1e9:.2f} B parameters, as transformers counts")

# %% [markdown]
# Where do the parameters of the dense models sit? We sort every tensor into four parts:

# %%
def part(name: str) -> str:
    if "embed" in name or "lm_head" in name:
        return "embedding + head"
    if name.endswith("norm.weight"):  # input/post-attention layernorms, q_norm, k_norm, the final norm
        return "norms"
    return "attention" if "self_attn" in name else "MLP"


parts = ["embedding + head", "attention", "MLP", "norms"]
counts = {m: {p: sum(np.prod(s) for n, s in expected_shapes(c).items() if part(n) == p) for p in parts}
          for m, c in models.items()}

# %% [markdown]
# Counting is then a sum of products of shapes, one per part. `counts` holds, for each model, the number of
# parameters in each part:

# %%
fig, (ax, share) = plt.subplots(1, 2, figsize=(11, 2.8), sharey=True, gridspec_kw={"width_ratios": [3, 2]})
total = np.array([sum(counts[m].values()) for m in models])
left = np.zeros(len(models))
for p in parts:
    v = np.array([counts[m][p] for m in models])
    ax.barh(list(models), v / 1e9, left=left / 1e9, label=p)
    share.barh(list(models), 100 * v / total, left=100 * left / total)
    left += v
for y, t in enumerate(total / 1e9):
    ax.text(t, y, f" {t:.2f} B: {2 * t:.1f} GB bf16, {4 * t:.1f} GB f32", va="center", fontsize=9)
ax.set(xlabel="parameters (billions)", xlim=(0, 14), title="Parameters, from config.json alone")
share.set(xlabel="% of the model", xlim=(0, 100), title="Shares")
ax.legend(loc="lower right", fontsize=8)
plt.show()

# %% [markdown]
# In Qwen3-0.6B the embedding alone, 151,936 × 1024 = 156 M numbers, is a quarter of the model. That is why the small
# models tie it to the output head. In the 8B model the MLPs dominate. (The norms are there, but at this scale
# their bar has zero width.) Note also the memory: we compute in float32, so a bf16 checkpoint needs **twice** its
# file size in RAM once it is widened.
#
# ## 12. A real checkpoint, if you have one
#
# Everything above works on an official checkpoint. If you have one (set `TINYQWEN_MODEL` to its folder, or have
# `Qwen/Qwen3-0.6B` in your Hugging Face cache), this cell reads its header and maps its embedding. That takes
# milliseconds, for a 1.5 GB file.

# %%
from tinyqwen.hub import official_checkpoint

real = official_checkpoint()
if real is None:
    print("No official checkpoint found (set TINYQWEN_MODEL or cache Qwen/Qwen3-0.6B); the fixtures above stand in.")
else:
    files = sorted(real.glob("*.safetensors"))
    t0 = time.perf_counter()
    entries = {n: t for file in files for n, t in read_header(file)[0].items() if n != "__metadata__"}
    emb_file = next(f for f in files if "model.embed_tokens.weight" in read_header(f)[0])
    emb = map_tensor(emb_file, "model.embed_tokens.weight")
    t1 = time.perf_counter()
    dtypes = sorted({t["dtype"] for t in entries.values()})
    print(f"{real.name}: {len(files)} file(s), {sum(f.stat().st_size for f in files) / 1e9:.2f} GB, "
          f"{len(entries)} tensors, dtypes {dtypes}")
    first_row = np.array(emb[0, :4])  # touching 4 values reads one page
    first_row = bf16_to_float32(first_row) if first_row.dtype == np.uint16 else first_row
    print(f"headers read and embedding {emb.shape} mapped in {(t1 - t0) * 1e3:.1f} ms; row 0 starts {first_row}")
    c = json.loads((real / "config.json").read_text())
    missing = set(expected_shapes(c)) - set(entries)
    print("every tensor config.json predicts is present" if not missing else f"missing: {sorted(missing)[:3]}")

# %% [markdown]
# ## 13. Checkpoint: your loader runs the real model
#
# The final test. tinyqwen's model (`tinyqwen/model.py`) asks a checkpoint for only three things: `keys()`,
# `shape(name)` and `get(name)`. We hand it the dictionaries *our* `load_checkpoint` built, run both fixtures on the
# inputs `transformers` used, and compare with transformers' logits from `reference.npz`. Both sides compute in
# float32 and differ only in the order of additions inside matrix products (about $10^{-6}$ relative), while a
# wrongly read weight moves logits of size ~1–20 by 0.1 or more. So the tolerance is $|\Delta| \le 10^{-4}$.

# %%
from tinyqwen.backends import get_backend
from tinyqwen.config import config_from_dict
from tinyqwen.model import Qwen3, load_weights


class Loaded:
    """What tinyqwen's load_weights needs from a checkpoint, on top of a plain dict of arrays."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return self.tensors[name].shape

    def get(self, name):
        return self.tensors[name]


# %% [markdown]
# The rest is tinyqwen's own code: `load_weights` checks every name and shape against `config.json` and arranges
# the arrays for the forward pass. `Qwen3` is the network with the plain NumPy kernels of the later chapters:

# %%
def model_from(folder: Path, tensors: dict) -> Qwen3:
    cfg = config_from_dict(json.loads((folder / "config.json").read_text()))
    return Qwen3(config=cfg, weights=load_weights(Loaded(tensors), cfg), backend=get_backend("numpy"))

# %%
for folder, tensors in ((TIED, weights_tied), (SHARDED, weights_sharded)):
    ref = np.load(folder / "reference.npz")
    delta = np.abs(model_from(folder, tensors)(ref["input_ids"]) - ref["logits"]).max()
    assert delta <= 1e-4, (folder.name, delta)
    print(f"{folder.name:<27} logits {list(ref['logits'].shape)}: max |Δ| = {delta:.1e} ≤ 1e-4 against transformers")

# %% [markdown]
# ## Summary
#
# * A safetensors file is an 8-byte little-endian length $N$, $N$ bytes of JSON (name → dtype, shape,
#   `[start, end)` within the data area), and the raw row-major little-endian bytes. The data area starts at $8 + N$.
# * bfloat16 is the top 16 bits of a float32. Widen it by shifting the bit pattern left by 16 and *reinterpreting* the
#   bits. It is exact. Narrowing to bf16 rounds, with a relative error of at most $2^{-8}$.
# * `np.memmap` turns a byte range into an array without reading it. You pay only for the pages you touch, which is
#   why opening a 60 GB checkpoint is instant.
# * Big checkpoints are shards plus `model.safetensors.index.json`, whose `weight_map` names each tensor's file. A
#   layer may span two shards.
# * `config.json` predicts every tensor name and shape. Watch `head_dim` (its own number) and
#   `tie_word_embeddings` (no `lm_head.weight`).
#
# Next, [chapter 3](03-embeddings-rmsnorm.ipynb) uses the first tensor we read, the embedding, and the smallest ones,
# the RMSNorm weights.
#
# ## Exercises
#
# Fill in `exercises/ch02_loading_weights.py` (`read_header`, `bf16_to_float32`, `read_tensor`, `map_tensor`,
# `load_checkpoint`, `expected_shapes`; each docstring has a worked example). Then run
#
# ```bash
# pytest exercises/test_ch02_loading_weights.py
# ```
#
# The last checkpoint loads both fixtures with *your* `load_checkpoint` and checks the model's logits against
# transformers'.
