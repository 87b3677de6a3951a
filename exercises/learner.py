"""Your code inside the real model: which of your functions the model runs, the model built from them, and what ran.

One mechanism, used by every chapter's model checkpoints and by `tinyqwen chat/generate --kernels exercises`:

    code = YourCode(course, upto=5)          # your functions of chapters 1..5 (a Course: yours or the solutions)
    model = code.model("tests/fixtures/dense-tied")   # a tinyqwen Qwen3 running them
    model(ids)                               # the model code is tinyqwen's, unchanged; the functions are yours
    code.ran                                 # {name: chapter} of your functions that actually ran, in order

`PARTS` says, chapter by chapter, which function fills which place. The model code stays identical for every
backend (see tinyqwen/backends/contract.py): your functions enter as a `Backend` whose kernels are yours —
`embed`, `rms_norm`, `apply_rope`, `attention`, `swiglu`, `linear`, `moe_block`, plus the host functions the model
builds each forward's inputs with (`causal_mask`, `rope_cos_sin`) — and as the model's rotary frequencies
(`rope_inv_freq`, or `yarn_inv_freq` and `yarn_attention_factor` for a YaRN checkpoint), its weights (read by your
`load_checkpoint`) and its KV cache (your `kv_cache_update`). Functions your functions call themselves (`softmax`
inside your attention, `rotate_half` inside your apply_rope, `route` inside your moe_block) are recorded when they
run: the report says what really ran, not what was plugged in.

Chapters after `upto` are tinyqwen's. With `fallback=True` (the CLI), a function of chapters <= upto that is still
the untouched stub (its body only raises NotImplementedError) is also tinyqwen's, and the report says so. The
grader passes `fallback_before=upto`: a stub of an EARLIER chapter is tinyqwen's (a learner who starts at chapter 3
can complete it; once they write chapter 2's loader, it runs in chapter 3's model too), while a stub of the chapter
being graded runs, raises, and the checkpoint says "not written yet".
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tinyqwen.errors import TinyQwenError

# chapter -> (function, where it runs). The first group fills the model; GENERATION and TEXT are called beside it.
PARTS: dict[int, tuple[tuple[str, str], ...]] = {
    2: (("load_checkpoint", "reads every weight of the checkpoint"),),
    3: (
        ("embed", "the embedding lookup"),
        ("rms_norm", "every RMSNorm (input, post-attention, QK-Norm, final)"),
    ),
    4: (
        ("rope_inv_freq", "the rotary frequencies"),
        ("yarn_inv_freq", "the rotary frequencies of a YaRN checkpoint"),
        ("yarn_attention_factor", "YaRN's attention factor"),
        ("rope_cos_sin", "the angles of every position"),
        ("rotate_half", "inside apply_rope"),
        ("apply_rope", "the rotation of every query and key"),
    ),
    5: (
        ("causal_mask", "the causal mask of every forward (with the cache offset)"),
        ("softmax", "inside attention and the router"),
        ("attention", "every attention layer"),
    ),
    6: (
        ("silu", "inside swiglu"),
        ("linear", "every projection and the output head"),
        ("swiglu", "every dense MLP"),
    ),
    7: (("route", "inside moe_block"), ("moe_block", "every MoE layer")),
    8: (
        ("kv_cache_update", "the KV cache of every layer"),
        ("left_pad", "the generation loop"),
        ("positions_from_mask", "the generation loop"),
        ("greedy_generate", "the generation loop"),
        ("sampling_distribution", "sampling (with apply_temperature and the filters)"),
        ("apply_temperature", "sampling"),
        ("repetition_penalty", "sampling"),
        ("top_k_filter", "sampling"),
        ("top_p_filter", "sampling"),
        ("min_p_filter", "sampling"),
    ),
    9: (("render_chat", "the chat template"), ("split_thinking", "the reply's thinking and answer")),
}
# chapter 1's tokenizer runs beside the model (encode the prompt, decode the reply): only the CLI and chapter 9 use it
TOKENIZER = (1, ("encode", "decode"))


def is_stub(fn: Callable) -> bool:
    """Whether `fn` is still the shipped stub: a body (after the docstring) that only raises NotImplementedError."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        body = ast.parse(source).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return False
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


class LearnerFunctionError(TinyQwenError):
    """One of the learner's functions raised inside the model (the CLI prints this in one line)."""


class YourCode:
    """The learner's functions of chapters <= upto, as the model will run them, and the record of what ran.

    `course` has `course.chNN` modules (exercises.grading.Course: the learner's files or the solutions).
    """

    def __init__(
        self,
        course: Any,
        upto: int,
        fallback: bool = False,
        strict_errors: bool = False,
        fallback_before: int = 0,
    ):
        self.course, self.upto, self.fallback = course, upto, fallback
        # strict (the CLI): a crash in a learner function becomes one LearnerFunctionError naming it
        self.strict_errors = strict_errors
        self.functions: dict[str, Callable] = {}  # name -> the learner's function that will run
        self.chapter: dict[str, int] = {}
        self.stubs: list[str] = []  # still stubs, replaced by tinyqwen's (fallback only)
        self.stub_chapter: dict[str, int] = {}
        for chapter, parts in sorted(PARTS.items()) + [(TOKENIZER[0], tuple((n, "") for n in TOKENIZER[1]))]:
            if chapter > upto:
                continue
            module = getattr(course, f"ch{chapter:02d}")
            for name, _ in parts:
                fn = getattr(module, name, None)
                if fn is None:
                    raise LearnerFunctionError(
                        f"chapter {chapter}: the exercises file has no function {name!r} (was it renamed?)"
                    )
                if (fallback or chapter < fallback_before) and is_stub(fn):
                    self.stubs.append(name)
                    self.stub_chapter[name] = chapter
                    continue
                self.functions[name], self.chapter[name] = fn, chapter
        self.ran: dict[str, int] = {}  # name -> chapter, first-run order
        self._codes = {getattr(fn, "__code__", None): n for n, fn in self.functions.items()}
        self._codes.pop(None, None)
        # a stub left in the graded chapter is called and raises "not written yet": it never counts as having run
        self._unwritten = {name for name, fn in self.functions.items() if is_stub(fn)}
        self._depth = 0

    # ------------------------------------------------------------------------------ what ran

    def has(self, name: str) -> bool:
        return name in self.functions

    def _profile(self, frame, event, arg) -> None:
        if event == "call":
            name = self._codes.get(frame.f_code)
            if name is not None and name not in self.ran and name not in self._unwritten:
                self.ran[name] = self.chapter[name]

    def traced(self, name: str, fn: Callable | None = None) -> Callable:
        """`fn` (default: the learner's `name`), recording every learner function that runs inside it — itself and
        the ones it calls (softmax inside attention) — and turning a crash into a LearnerFunctionError when strict.
        """
        fn = fn or self.functions[name]

        def run(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            previous = sys.getprofile()
            sys.setprofile(self._profile)
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                if not self.strict_errors or isinstance(error, TinyQwenError):
                    raise
                raise self._crash(error, name) from None
            finally:
                sys.setprofile(previous)
                self._depth -= 1
                if name in self.functions and name not in self.ran and name not in self._unwritten:
                    self.ran[name] = self.chapter[name]

        run.__name__ = name
        return run

    def _crash(self, error: Exception, outer: str) -> LearnerFunctionError:
        """One line naming the learner's function that raised: the innermost one in the traceback."""
        name, tb = outer, error.__traceback__
        while tb is not None:
            name = self._codes.get(tb.tb_frame.f_code, name)
            tb = tb.tb_next
        first = (str(error).strip().splitlines() or [""])[0]
        return LearnerFunctionError(
            f"your {name}() (exercises, chapter {self.chapter.get(name, '?')}) raised {type(error).__name__}"
            + (f": {first}" if first else "")
        )

    def report(self) -> str:
        """One line: which of the learner's functions ran (chapter order), and (fallback) the stubs replaced."""
        order = {name: i for i, name in enumerate(self.functions)}
        ran = ", ".join(sorted(self.ran, key=lambda n: (self.ran[n], order.get(n, 0)))) or "none"
        line = f"your functions that ran: {ran}"
        if self.stubs:
            line += f"; still stubs, so tinyqwen's ran instead: {', '.join(self.stubs)}"
        return line

    # ------------------------------------------------------------------------------ the model

    def backend(self, base=None, **replace: Callable):
        """A Backend whose kernels are the learner's where they have written them (tinyqwen's NumPy elsewhere).

        `replace` sets further kernels by name (the planted-mistake and classic-mistake runs use it)."""
        from tinyqwen.backends import get_backend

        base = base or get_backend("numpy")
        have, kernels = self.has, {}
        if have("embed"):
            embed = self.traced("embed")
            kernels["embed"] = lambda table, ids: np.asarray(embed(ids, table), dtype=np.float32)
        for name in ("rms_norm", "apply_rope", "swiglu", "linear", "moe_block", "rope_cos_sin"):
            if have(name):
                kernels[name] = self.traced(name)
        if have("causal_mask"):
            kernels["causal_mask"] = self.traced("causal_mask")
        if have("attention"):
            attention, causal = self.traced("attention"), kernels.get("causal_mask", base.causal_mask)
            kernels["attention"] = attention
            # a long prompt's mask arrives as a CausalMask (tile by tile): expand it with the learner's mask
            kernels["blockwise_attention"] = lambda q, k, v, m: attention(
                q, k, v, np.asarray(causal(*m.shape[1:]), dtype=bool)[None] & m.key_mask[:, None, :]
            )
        kernels |= replace
        if kernels:  # a base's one-call decode layer (numba) would run its own kernels in place of these
            kernels.setdefault("decode_layer", None)
        name = f"your exercises (chapters <= {self.upto})"
        return dataclasses.replace(base, name=name, **kernels)

    def model(self, path: str | Path, **replace: Callable):
        """The checkpoint at `path` running the learner's functions (see the module docstring)."""
        from tinyqwen.config import load_config
        from tinyqwen.model import load_generation_config, load_weights
        from tinyqwen.rope import rope_parameters

        path = Path(path)
        config = load_config(path)
        if self.has("load_checkpoint"):
            tensors = self.traced("load_checkpoint")(path)
            weights = load_weights(_DictCheckpoint(tensors, path), config, progress=False)
        else:
            from tinyqwen.checkpoint import Checkpoint

            with Checkpoint(path) as checkpoint:
                weights = load_weights(checkpoint, config, progress=False)
        model = your_qwen3_class()(
            config=config,
            weights=weights,
            backend=self.backend(**replace),
            generation_config=load_generation_config(path),
            path=path,
        )
        model.your_code = self
        inv_freq, factor = rope_parameters(config)
        s = config.rope_scaling
        if s is None and self.has("rope_inv_freq"):
            inv_freq = self.traced("rope_inv_freq")(config.head_dim, config.rope_theta)
        elif s is not None and self.has("yarn_inv_freq"):
            inv_freq = self.traced("yarn_inv_freq")(
                config.head_dim, config.rope_theta, s.factor, s.original_max_position_embeddings,
                s.beta_fast, s.beta_slow,
            )  # fmt: skip
        if s is not None and self.has("yarn_attention_factor"):
            factor = self.traced("yarn_attention_factor")(s.factor)
        model.inv_freq, model.attention_factor = np.asarray(inv_freq, dtype=np.float32), float(factor)
        return model

    def cache_class(self):
        """tinyqwen's KVCache whose per-layer update is the learner's kv_cache_update (or tinyqwen's KVCache)."""
        from tinyqwen.kv_cache import KVCache

        if not self.has("kv_cache_update"):
            return KVCache
        update = self.traced("kv_cache_update")

        class YourCache(KVCache):
            def update(self, layer, k, v):
                keys, values = update(self.keys[layer], self.values[layer], k, v, self.length)
                want = (*k.shape[:2], self.length + k.shape[2], k.shape[3])
                for what, got in (("keys", keys), ("values", values)):
                    shape = tuple(np.shape(got))
                    if shape != want:
                        raise CacheShapeError(what, shape, want, self.length, k.shape[2], self.max_len)
                return np.asarray(keys), np.asarray(values)

        return YourCache


class CacheShapeError(RuntimeError):
    """The learner's kv_cache_update returned keys or values of the wrong shape (the grader explains it)."""

    def __init__(self, what: str, shape: tuple, want: tuple, length: int, new: int, max_len: int):
        self.shape, self.want, self.length, self.new, self.max_len = shape, want, length, new, max_len
        problem = (
            f"kv_cache_update returned {what} of shape {list(shape)}; attention needs every position so far, "
            f"{list(want)} (length {length} + {new} new)"
        )
        if length > 0 and shape[2:3] == (new,):
            problem += ". Likely cause: only the new keys and values are returned, so the cache is written but never read"
        elif shape[2:3] == (max_len,):
            problem += ". Likely cause: the whole preallocated buffer is returned, empty slots included"
        super().__init__(problem)


@functools.cache
def your_qwen3_class():
    from tinyqwen.model import Qwen3

    class YourQwen3(Qwen3):
        """tinyqwen's Qwen3, unchanged, whose KV cache runs the learner's kv_cache_update."""

        your_code: YourCode

        def new_cache(self, batch_size: int, max_len: int, dtype: str = "float32"):
            if dtype != "float32" or not self.your_code.has("kv_cache_update"):
                return super().new_cache(batch_size, max_len, dtype)
            c = self.config
            return self.your_code.cache_class().allocate(
                c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim
            )

    return YourQwen3


class _DictCheckpoint:
    """What tinyqwen.model.load_weights reads of a checkpoint, over the learner's {name: array} (chapter 2)."""

    def __init__(self, tensors: dict[str, np.ndarray], path: Path):
        if not isinstance(tensors, dict):
            raise LearnerFunctionError(
                f"your load_checkpoint() returned {type(tensors).__name__}, expected a dict {{name: array}}"
            )
        self.tensors, self.path = tensors, path

    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self.tensors[name]))

    def dtype(self, name: str) -> str:
        return "F32"

    def get(self, name: str) -> np.ndarray:
        return np.asarray(self.tensors[name], dtype=np.float32)
