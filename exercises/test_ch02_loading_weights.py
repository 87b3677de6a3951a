"""Chapter 2 checkpoints: reading an official checkpoint byte by byte.

Expected values come from the official `safetensors` library, torch and transformers
(exercises/references/make_ch02_loading_weights.py → ch02_loading_weights.{safetensors,npz,json}) and from
transformers' logits stored with the fixtures (tests/fixtures/*/reference.npz). The classic wrong answers
(Mistake) are derived by hand in this file from the same bytes.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from exercises.grading import (
    FIXTURES,
    REFERENCES,
    GradeError,
    Mistake,
    config_json,
    expect,
    expect_close,
    expect_equal,
    expect_logits,
    notebook,
    reference_file,
)

FILE = REFERENCES / "ch02_loading_weights.safetensors"
FACTS = reference_file("ch02_loading_weights.json")
ARRAYS = reference_file("ch02_loading_weights.npz")
TIED = FIXTURES / "dense-tied"
SHARDED = FIXTURES / "dense-untied-bf16-sharded"
NUMPY_DTYPE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8"}


# reread("...") -> 'notebooks/02-loading-weights.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 2)


# ------------------------------------------------------------------------------------------ hand-derived helpers


def _raw_entry(path: Path, name: str) -> tuple[dict, int, bytes]:
    """(header entry, data start, the whole file's bytes), parsed by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])[name], 8 + n, raw


def _decode(data: bytes, dtype: str, shape) -> np.ndarray:
    array = np.frombuffer(data, dtype=NUMPY_DTYPE[dtype]).reshape(shape)
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32) if dtype == "F16" else array


def _from_file_start(path: Path, name: str) -> np.ndarray:
    """The classic bug: data_offsets taken as positions in the file instead of in the data area."""
    t, _, raw = _raw_entry(path, name)
    start, end = t["data_offsets"]
    return _decode(raw[start:end], t["dtype"], t["shape"])


def _bf16_as_f16(path: Path, name: str) -> np.ndarray:
    t, data_start, raw = _raw_entry(path, name)
    start, end = t["data_offsets"]
    return (
        np.frombuffer(raw[data_start + start : data_start + end], "<f2")
        .astype(np.float32)
        .reshape(t["shape"])
    )


def _inf_as_number(a):
    """float64 copy with ±inf as ±1e300: grading.expect_close counts inf == inf as a difference (inf - inf = NaN)."""
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return a
    with np.errstate(invalid="ignore"):  # float32 NaN payloads
        a = a.astype(np.float64)
    a[np.isposinf(a)], a[np.isneginf(a)] = 1e300, -1e300
    return a


def _fingerprint(values) -> np.ndarray:
    flat = np.asarray(values).reshape(-1).astype(np.float64)
    at = [i for i in FACTS["fingerprint_at"] if -flat.size <= i < flat.size]
    return np.array([flat.sum(), np.abs(flat).sum(), *flat[at]])


def _want_fingerprint(facts: dict) -> np.ndarray:
    return np.array([facts["sum"], facts["abs_sum"], *facts["samples"]])


def _expect_tensor(got, facts: dict, what: str, mistakes=(), reread=None) -> None:
    """Shape, then a fingerprint (sum, sum of |x|, a few values) of torch's float32 reading of the tensor."""
    if got is None:
        expect(
            False, what=what, problem="your function returned None — is a `return` missing?", reread=reread
        )
    got = np.asarray(got)
    expect_equal(list(got.shape), facts["shape"], what=f"{what}: shape", reread=reread)
    expect(
        got.dtype == np.float32,
        what=what,
        problem=f"expected float32 values (BF16 widened), got dtype {got.dtype}",
        reread=reread,
    )
    # float64 sums of float32 values: only the order of the additions differs (~1e-13 relative)
    expect_close(
        _fingerprint(got),
        _want_fingerprint(facts),
        atol=1e-6,
        rtol=1e-6,
        what=f"{what}: [sum, sum of |x|, values at flat positions {FACTS['fingerprint_at']}]",
        mistakes=[Mistake(m.cause, lambda m=m: _fingerprint(m.output()), m.hint) for m in mistakes],
        reread=reread,
    )


def _shape_items(shapes) -> list:
    return sorted([name, [int(d) for d in shape]] for name, shape in dict(shapes).items())


def _shape_mistakes(want: dict, config: dict) -> list[Mistake]:
    """Wrong shape tables that classic bugs produce, derived by hand from the right one."""
    H, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    D = config["head_dim"]

    def replaced(rule) -> list:
        return _shape_items({n: rule(n, s) for n, s in want.items()})

    d = H // heads  # the wrong head_dim

    def derived_head_dim(n, s):
        if n.endswith(("q_proj.weight",)):
            return (heads * d, H)
        if n.endswith(("k_proj.weight", "v_proj.weight")):
            return (kv * d, H)
        if n.endswith("o_proj.weight"):
            return (H, heads * d)
        if n.endswith(("q_norm.weight", "k_norm.weight")):
            return (d,)
        return s

    mistakes = []
    if d != D:
        mistakes.append(
            Mistake(
                "head_dim computed as hidden_size // num_attention_heads",
                lambda: replaced(derived_head_dim),
                f"Qwen3 gives head_dim as its own key ({D} here, not {H} // {heads} = {d}): read config['head_dim'].",
            )
        )
    mistakes.append(
        Mistake(
            "k_proj/v_proj sized with num_attention_heads",
            lambda: replaced(
                lambda n, s: (heads * D, H) if n.endswith(("k_proj.weight", "v_proj.weight")) else s
            ),
            "Keys and values have num_key_value_heads heads (grouped-query attention), not num_attention_heads.",
        )
    )
    mistakes.append(
        Mistake(
            "projections stored [in, out]",
            lambda: replaced(lambda n, s: tuple(reversed(s)) if len(s) == 2 and "proj" in n else s),
            "A projection from width a to width b is stored [b, a] (output rows, input columns).",
        )
    )
    if config["tie_word_embeddings"]:
        mistakes.append(
            Mistake(
                "lm_head.weight listed although tie_word_embeddings is true",
                lambda: _shape_items({**want, "lm_head.weight": (config["vocab_size"], H)}),
                "A tied checkpoint has no lm_head.weight: the output head is the embedding matrix itself.",
            )
        )
    else:
        mistakes.append(
            Mistake(
                "lm_head.weight missing although tie_word_embeddings is false",
                lambda: _shape_items({n: s for n, s in want.items() if n != "lm_head.weight"}),
                "An untied model has its own output head: lm_head.weight (vocab_size, hidden_size).",
            )
        )
    return mistakes


def _with_moe_layers(want: dict, config: dict, layers: set[int]) -> list:
    """`want` with exactly `layers` sparse (a bug in the which-layer rule), derived by hand."""
    H, E, M, F = (
        config[k] for k in ("hidden_size", "num_experts", "moe_intermediate_size", "intermediate_size")
    )
    out = {n: s for n, s in want.items() if ".mlp." not in n}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        if i in layers:
            out[p + "gate.weight"] = (E, H)
            for e in range(E):
                out |= {p + f"experts.{e}.gate_proj.weight": (M, H), p + f"experts.{e}.up_proj.weight": (M, H),
                        p + f"experts.{e}.down_proj.weight": (H, M)}  # fmt: skip
        else:
            out |= {
                p + "gate_proj.weight": (F, H),
                p + "up_proj.weight": (F, H),
                p + "down_proj.weight": (H, F),
            }
    return _shape_items(out)


class _Loaded:
    """What tinyqwen's load_weights asks of a checkpoint: keys(), shape(name), get(name)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return np.shape(self.tensors[name])

    def get(self, name):
        return np.asarray(self.tensors[name])


# ------------------------------------------------------------------------------------------ checkpoints


def test_read_header(course):
    """The header of a safetensors file"""
    ch = course.ch02
    section = reread("3. The first 8 bytes: the header length")
    got = ch.read_header(FILE)
    expect(
        isinstance(got, tuple) and len(got) == 2,
        what="read_header(file)",
        problem=f"expected a pair (header dict, data_start), got {type(got).__name__}",
        reread=section,
    )
    header, data_start = got
    facts = FACTS["file"]
    n = facts["header_length"]
    expect_equal(
        data_start,
        facts["data_start"],
        what="where the data area starts (the second value)",
        inputs=f"{FILE.name}, whose first 8 bytes say N = {n}",
        mistakes=[
            Mistake(
                "you returned N, the header's length",
                n,
                "The data starts after the 8 length bytes too: 8 + N.",
            ),
            Mistake(
                "the 8 length bytes were read big-endian",
                8 + int.from_bytes(FILE.read_bytes()[:8], "big"),
                'safetensors stores N little-endian: struct.unpack("<Q", first_8_bytes).',
            ),
        ],
        reread=section,
    )
    want = facts["header"]
    expect_equal(
        sorted(header),
        sorted(want),
        what="the header's entries",
        mistakes=[
            Mistake(
                '"__metadata__" was dropped',
                sorted(k for k in want if k != "__metadata__"),
                "Return the JSON object exactly as parsed, its __metadata__ entry included.",
            )
        ],
        reread=reread("4. The header: a JSON object"),
    )
    for name, entry in want.items():
        expect_equal(
            header[name], entry, what=f"header entry {name!r}", reread=reread("4. The header: a JSON object")
        )
    # a real checkpoint file: every entry's dtype and shape as the official reader reports them
    header, _ = ch.read_header(TIED / "model.safetensors")
    for name, t in FACTS["checkpoints"]["dense-tied"].items():
        expect_equal(
            [header.get(name, {}).get("dtype"), header.get(name, {}).get("shape")],
            [t["dtype"], t["shape"]],
            what=f"dense-tied/model.safetensors: dtype and shape of {name!r}",
        )


def test_bf16_to_float32(course):
    """bfloat16 bit patterns to float32"""
    ch = course.ch02
    bits, want = ARRAYS["bf16_bits"], ARRAYS["bf16_as_f32"]
    given = bits.reshape(256, 256).copy()
    got = ch.bf16_to_float32(given)
    section = reread("7. bfloat16: the top half of a float32")
    if got is None or np.asarray(got).dtype.kind not in "fiub":
        expect_close(got, want, atol=0.0, what="bf16_to_float32", reread=section)  # explains what came back
    expect_close(
        _inf_as_number(got),
        _inf_as_number(want.reshape(256, 256)),
        atol=0.0,  # widening is exact: every bf16 value is a float32 value
        what="all 65,536 bf16 patterns (as a [256, 256] array) widened to float32, vs torch (±inf shown as ±1e300)",
        inputs="np.arange(65536).astype(np.uint16).reshape(256, 256)",
        mistakes=[
            Mistake(
                "the integer was converted to a float instead of its bits being reinterpreted",
                lambda: _inf_as_number(bits.astype(np.float32).reshape(256, 256)),
                "u16.astype(np.float32) turns 16256 into 16256.0; shift, then reinterpret with .view(np.float32).",
            ),
            Mistake(
                "the 16 bits went into the LOW half of the float32",
                lambda: _inf_as_number(bits.astype(np.uint32).view(np.float32).reshape(256, 256)),
                "Shift them into the top half first: (u16.astype(np.uint32) << 16).view(np.float32).",
            ),
            Mistake(
                "the patterns were read as float16",
                lambda: _inf_as_number(bits.view(np.float16).astype(np.float32).reshape(256, 256)),
                "BF16 and F16 are both 2 bytes but not the same format: bf16 has float32's 8 exponent bits.",
            ),
            Mistake(
                "the two bytes of each pattern were swapped",
                lambda: _inf_as_number(
                    (bits.byteswap().astype(np.uint32) << 16).view(np.float32).reshape(256, 256)
                ),
                "The uint16 already holds the pattern; no byte swapping is needed.",
            ),
        ],
        reread=section,
    )
    expect(
        np.asarray(got).dtype == np.float32,
        what="bf16_to_float32",
        problem=f"expected float32, got {np.asarray(got).dtype}",
        reread=section,
    )
    expect(
        np.array_equal(given, bits.reshape(256, 256)),
        what="bf16_to_float32",
        problem="your function changed its input array in place",
        reread=section,
    )


def test_read_tensor(course):
    """One tensor of each dtype"""
    ch = course.ch02
    section = reread("8. Reading one tensor")
    for name, t in FACTS["file"]["safe_open"].items():
        want = ARRAYS[f"tensor.{name}"]
        got = ch.read_tensor(FILE, name)
        mistakes = [
            Mistake(
                "data_offsets were counted from the start of the file",
                lambda name=name: _from_file_start(FILE, name),
                "They count from the data area: read at data_start + start, where data_start = 8 + N.",
            )
        ]
        if t["dtype"] == "BF16":
            mistakes.append(
                Mistake(
                    "BF16 bytes were read as float16",
                    lambda name=name: _bf16_as_f16(FILE, name),
                    "Read them as uint16 and widen with bf16_to_float32.",
                )  # fmt: skip
            )
        if got is None or np.asarray(got).dtype.kind not in "fiub":
            expect_close(got, want, atol=0.0, what=f"read_tensor(..., {name!r})", reread=section)
        expect_close(
            _inf_as_number(got), _inf_as_number(want), atol=0.0,
            what=f"read_tensor({FILE.name!r}, {name!r}), a {t['dtype']} {t['shape']} tensor (±inf shown as ±1e300)",
            mistakes=[Mistake(m.cause, lambda m=m: _inf_as_number(m.output()), m.hint) for m in mistakes],
            reread=section,
        )  # fmt: skip
        kind = "i" if t["dtype"].startswith("I") else "f"
        expect(
            np.asarray(got).dtype == (np.int64 if kind == "i" else np.float32),
            what=f"read_tensor(..., {name!r})",
            problem=f"a {t['dtype']} tensor should come back as {'int64' if kind == 'i' else 'float32'}, "
            f"got {np.asarray(got).dtype}",
            reread=section,
        )


def test_read_tensor_in_checkpoint_files(course):
    """Tensors of real checkpoint files, F32 and BF16"""
    ch = course.ch02
    section = reread("8. Reading one tensor")
    for folder, name in (
        (TIED, "model.embed_tokens.weight"),
        (TIED, "model.layers.1.self_attn.k_norm.weight"),
        (SHARDED, "model.embed_tokens.weight"),
        (SHARDED, "lm_head.weight"),
    ):
        facts = FACTS["checkpoints"][folder.name][name]
        path = folder / facts["file"]
        _expect_tensor(
            ch.read_tensor(path, name),
            facts,
            what=f"read_tensor({folder.name}/{facts['file']}, {name!r}) ({facts['dtype']})",
            mistakes=[
                Mistake(
                    "data_offsets were counted from the start of the file",
                    lambda p=path, n=name: _from_file_start(p, n),
                    "Add data_start = 8 + N.",
                ),  # fmt: skip
            ],
            reread=section,
        )


def test_map_tensor(course):
    """Memory-mapped, not copied"""
    ch = course.ch02
    section = reread("9. Memory mapping: loading lazily")
    name = "embed.weight"
    old = ARRAYS[f"tensor.{name}"]
    t, data_start, _ = _raw_entry(FILE, name)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        copy = Path(tmp) / FILE.name
        shutil.copyfile(FILE, copy)
        mapped = ch.map_tensor(copy, name)
        expect_close(mapped, old, atol=0.0, what=f"map_tensor(file, {name!r}) (F32)", reread=section)
        bits = ch.map_tensor(copy, "proj.weight")
        expect_close(
            bits,
            ARRAYS["bits.proj.weight"],
            atol=0.0,
            what="map_tensor(file, 'proj.weight'): a BF16 tensor, as stored (uint16 bit patterns)",
            mistakes=[
                Mistake(
                    "the BF16 tensor was widened to float32",
                    ARRAYS["tensor.proj.weight"],
                    "map_tensor returns the bytes as stored; widening would copy them out of the file.",
                ),  # fmt: skip
            ],
            reread=section,
        )
        writeable = np.asarray(mapped).flags.writeable
        new = (np.arange(old.size, dtype=np.float32).reshape(old.shape) / 4 - 3).astype("<f4")
        with open(copy, "r+b") as f:  # change the tensor's bytes in the file
            f.seek(data_start + t["data_offsets"][0])
            f.write(new.tobytes())
        seen = np.array(mapped)
        del mapped, bits
    expect_close(
        seen,
        new,
        atol=0.0,
        what="the mapped array after the tensor's bytes in the file were overwritten",
        mistakes=[
            Mistake(
                "the array is a copy of the bytes, not a view of the file",
                old,
                "Reading (f.read, np.fromfile) copies the data; np.memmap(path, dtype, mode='r', offset=..., "
                "shape=...) maps it, so nothing is read until it is used.",
            ),  # fmt: skip
        ],
        reread=section,
    )
    expect(
        not writeable,
        what="map_tensor",
        problem="the array is writeable: map the file read-only (np.memmap(..., mode='r')) so that a model can "
        "never change its own checkpoint",
        reread=section,
    )


def test_load_single_file(course):
    """A single-file F32 checkpoint"""
    _check_checkpoint(course.ch02, TIED)


def test_load_sharded(course):
    """A sharded BF16 checkpoint with an index"""
    _check_checkpoint(course.ch02, SHARDED)


def _check_checkpoint(ch, folder: Path) -> None:
    section = reread("10. Shards and the index")
    facts = FACTS["checkpoints"][folder.name]
    got = ch.load_checkpoint(folder)
    expect(isinstance(got, dict), what=f"load_checkpoint({folder.name})",
           problem=f"expected a dict {{name: array}}, got {type(got).__name__}", reread=section)  # fmt: skip
    files = sorted({t["file"] for t in facts.values()})
    expect_equal(
        sorted(got),
        sorted(facts),
        what=f"load_checkpoint({folder.name}): the tensor names",
        mistakes=[
            *(
                Mistake(
                    f"only one shard was read ({file})",
                    sorted(n for n, t in facts.items() if t["file"] == file),
                    "Read every file that the index's weight_map names.",
                )
                for file in files
                if len(files) > 1
            ),
            Mistake(
                '"__metadata__" was taken for a tensor',
                sorted([*facts, "__metadata__"]),
                "Skip the header's __metadata__ entry: it is not a tensor.",
            ),
        ],
        reread=section,
    )
    for name, t in facts.items():
        _expect_tensor(got[name], t, what=f"load_checkpoint({folder.name})[{name!r}]", reread=section)


def test_expected_shapes_dense(course):
    """Tensor shapes from config.json (dense)"""
    ch = course.ch02
    section = reread("11. config.json, field by field")
    for name in ("fixture-dense-tied", "fixture-dense-untied-bf16-sharded", "Qwen3-0.6B", "Qwen3-8B"):
        config = config_json(name)
        want = {n: tuple(s) for n, s in FACTS["shapes"][name].items()}
        expect_equal(
            _shape_items(ch.expected_shapes(config)),
            _shape_items(want),
            what=f"expected_shapes({name}.json), as sorted [name, shape] pairs",
            mistakes=_shape_mistakes(want, config),
            reread=section,
        )


def test_expected_shapes_moe(course):
    """Tensor shapes from config.json (mixture of experts)"""
    ch = course.ch02
    section = reread("11. config.json, field by field")
    for name in ("fixture-moe-norm-topk", "fixture-moe-sparse-step"):
        config = config_json(name)
        want = {n: tuple(s) for n, s in FACTS["shapes"][name].items()}
        L, step, only = config["num_hidden_layers"], config["decoder_sparse_step"], config["mlp_only_layers"]
        expect_equal(
            _shape_items(ch.expected_shapes(config)),
            _shape_items(want),
            what=f"expected_shapes({name}.json), as sorted [name, shape] pairs",
            inputs=f"{L} layers, decoder_sparse_step {step}, mlp_only_layers {only}",
            mistakes=[
                Mistake(
                    "every layer was made sparse",
                    _with_moe_layers(want, config, set(range(L))),
                    "A layer is sparse only if it is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.",
                ),
                Mistake(
                    "mlp_only_layers was ignored",
                    _with_moe_layers(want, config, {i for i in range(L) if (i + 1) % step == 0}),
                    "Layers listed in mlp_only_layers keep a dense MLP.",
                ),
                Mistake(
                    "the sparse-step rule is off by one",
                    _with_moe_layers(want, config, {i for i in range(L) if i % step == 0 and i not in only}),
                    "The rule (transformers') is (i + 1) % decoder_sparse_step == 0: with step 2, layers 1, 3, 5, ...",
                ),
            ],
            reread=section,
        )
    facts = FACTS["moe"]["Qwen3-30B-A3B"]
    got = ch.expected_shapes(config_json("Qwen3-30B-A3B"))
    expect_equal(
        [len(got), int(sum(int(np.prod(s)) for s in got.values()))],
        [facts["num_tensors"], facts["num_parameters"]],
        what="expected_shapes(Qwen3-30B-A3B.json): [number of tensors, number of parameters]",
        reread=section,
    )
    for n, s in facts["samples"].items():
        expect_equal(
            list(got.get(n, ())), s, what=f"expected_shapes(Qwen3-30B-A3B.json)[{n!r}]", reread=section
        )


def test_loader_in_real_model(course):
    """Your loader in the real model"""
    from tinyqwen.backends import get_backend
    from tinyqwen.config import config_from_dict
    from tinyqwen.errors import TinyQwenError
    from tinyqwen.model import Qwen3, load_weights

    ch = course.ch02
    section = reread("13. Checkpoint: your loader runs the real model")
    for folder in (TIED, SHARDED):
        config = config_from_dict(json.loads((folder / "config.json").read_text()))
        tensors = ch.load_checkpoint(folder)
        try:
            weights = load_weights(_Loaded(tensors), config)
        except TinyQwenError as error:
            raise GradeError(
                f"the model could not be built from load_checkpoint({folder.name}): {error}\n  re-read: {section}"
            ) from None
        model = Qwen3(config=config, weights=weights, backend=get_backend("numpy"))
        expect_logits(
            model, folder.name, what=f"logits of {folder.name} loaded by your load_checkpoint", reread=section
        )
