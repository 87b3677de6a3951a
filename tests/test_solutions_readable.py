"""The solutions a stuck learner reads (`exercises/solutions/`) are the chapter's plain version, and equal the library's.

Two checks:

1. **Written out, not delegated.** No solution function calls the tinyqwen function it stands for: an AST walk of
   every `exercises/solutions/chNN_*.py` rejects a call to a name imported from `tinyqwen` (or `backends`) that is
   the function's own name or that name with a leading underscore (`_rms_norm`), and a call `module.name(...)` on
   an imported tinyqwen module. The only things a solution may import from tinyqwen are the config types the
   exercises hand in (`ALLOWED_IMPORTS`; the ablation also runs chapter 13's trainer pieces: `ALLOWED_PER_FILE`).
2. **Equal to the library.** Each solution function against the tinyqwen function it stands for, on random inputs
   (fixed seeds). Tolerances, float32 on both sides: exact where both do the same operations in the same order
   (lookups, masks, bit patterns, the RoPE tables, ids); 1e-6 (absolute + relative) for one elementwise layer or
   norm, where only a different but equivalent expression order differs (`/ sqrt(d)` against `* d**-0.5`);
   1e-5 for attention and the MLP (sums of 64-128 products in another order); whole-model logits with the
   project's one definition, `tinyqwen.verify.tolerance` (1e-5 × max(1, max |logit|)). A real bug moves these
   values by 1e-2 or more.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((REPO / "exercises" / "solutions").glob("ch[0-9][0-9]_*.py"))
ALLOWED_IMPORTS = {("tinyqwen.config", "Qwen3Config")}
# the ablation is an experiment run WITH chapter 13's trainer pieces (its exercise hands them to the learner): what
# it writes is the loop and the experiment, not the pieces
ALLOWED_PER_FILE = {
    "ch17_ablation_qk_norm.py": {
        ("tinyqwen.config", "config_from_dict"), ("tinyqwen.grad", "loss_and_grads"),
        ("tinyqwen.grad", "named_parameters"), ("tinyqwen.train", "AdamW"), ("tinyqwen.train", "clip_gradients"),
        ("tinyqwen.train", "init_weights"), ("tinyqwen.train", "limit_blas_threads"),
    },
}  # fmt: skip
FIXTURES = REPO / "tests" / "fixtures"


def sol(chapter: int):
    path = next(p for p in SOLUTIONS if p.name.startswith(f"ch{chapter:02d}_"))
    return importlib.import_module(f"exercises.solutions.{path.stem}")


# ------------------------------------------------------------------------------------------ 1. written out


def _library_imports(tree: ast.Module, allowed: set) -> tuple[dict[str, str], set[str], list[str]]:
    """(local name -> imported name for names from tinyqwen, local names of tinyqwen modules, disallowed imports)."""
    names, modules, disallowed = {}, set(), []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in ("tinyqwen", "backends")
        ):
            for alias in node.names:
                names[alias.asname or alias.name] = alias.name
                if (node.module, alias.name) not in allowed:
                    disallowed.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("tinyqwen", "backends"):
                    modules.add(alias.asname or alias.name.split(".")[0])
                    disallowed.append(f"import {alias.name}")
    return names, modules, disallowed


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.stem)
def test_solution_does_not_call_the_library_function_it_stands_for(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names, modules, disallowed = _library_imports(
        tree, ALLOWED_IMPORTS | ALLOWED_PER_FILE.get(path.name, set())
    )
    found = []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in names and names[f.id].lstrip("_") == fn.name.lstrip("_"):
                found.append(f"{fn.name}() calls the library's {names[f.id]} (imported as {f.id})")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if f.value.id in modules or (
                    f.value.id in names and f.attr.lstrip("_") == fn.name.lstrip("_")
                ):
                    found.append(f"{fn.name}() calls {f.value.id}.{f.attr}: a call into tinyqwen")
    assert not found, f"{path.name}: a solution must be written out, not delegated:\n" + "\n".join(found)
    assert not disallowed, (
        f"{path.name} imports from tinyqwen beyond the config types the exercises hand in: {disallowed}"
    )


def test_every_chapter_has_a_solution_file():
    chapters = {int(p.name[7:9]) for p in (REPO / "exercises").glob("test_ch[0-9][0-9]_*.py")}
    have = {int(p.name[2:4]) for p in SOLUTIONS}
    assert chapters <= have, f"chapters without a solution file: {sorted(chapters - have)}"


# ------------------------------------------------------------------------------------------ 2. equal to the library

rng = np.random.default_rng(0)


def f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(got, want, atol, rtol=0.0):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), atol=atol, rtol=rtol)


def test_ch03_embeddings_rmsnorm():
    from tinyqwen.norm import rms_norm

    s = sol(3)
    table, ids = f32(50, 8), rng.integers(0, 50, (2, 7))
    close(s.embed(ids, table), table[ids], 0)
    x, w = f32(3, 5, 64, scale=3.0), f32(64)
    close(s.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6), 1e-6, 1e-6)
    with pytest.raises(IndexError, match="outside"):
        s.embed(np.array([[50]]), table)


def test_ch04_rope_yarn():
    from tinyqwen import rope
    from tinyqwen.config import RopeScaling

    s = sol(4)
    for head_dim, theta in ((128, 1e6), (64, 1e4), (16, 5e5)):
        close(s.rope_inv_freq(head_dim, theta), rope.default_inv_freq(head_dim, theta), 0)
        for factor, window, fast, slow in ((4.0, 32768, 32.0, 1.0), (2.0, 4096, 16.0, 2.0)):
            want = rope.yarn_inv_freq(head_dim, theta, RopeScaling(factor, window, fast, slow))
            close(s.yarn_inv_freq(head_dim, theta, factor, window, fast, slow), want, 0)
    for factor in (1.0, 2.0, 4.0):
        assert s.yarn_attention_factor(factor) == pytest.approx(
            rope.yarn_attention_factor(RopeScaling(factor, 1))
        )
    positions, inv = rng.integers(0, 40960, (2, 9)), rope.default_inv_freq(128, 1e6)
    for a, b in zip(s.rope_cos_sin(positions, inv, 1.1), rope.rope_cos_sin(positions, inv, 1.1), strict=True):
        close(a, b, 0)
    x = f32(2, 4, 9, 128)
    close(s.rotate_half(x), rope.rotate_half(x), 0)
    cos, sin = rope.rope_cos_sin(positions, inv)
    close(s.apply_rope(x, cos, sin), rope.apply_rope(x, cos, sin), 1e-6, 1e-6)


def test_ch05_attention():
    from tinyqwen import attention as lib

    s = sol(5)
    x = f32(3, 4, 11, scale=5.0)
    for axis in (-1, 0, 1):
        close(s.softmax(x, axis=axis), lib.softmax(x, axis=axis), 1e-6, 1e-6)
    for n_q, n_k in ((1, 1), (3, 3), (2, 7), (1, 9)):
        close(s.causal_mask(n_q, n_k), lib.causal_mask(n_q, n_k), 0)
    q, k, v = f32(2, 8, 5, 32), f32(2, 2, 9, 32), f32(2, 2, 9, 32)
    mask = np.broadcast_to(lib.causal_mask(5, 9), (2, 5, 9)).copy()
    mask[1, :, :3] = False  # a padded row
    close(s.attention(q, k, v, mask), lib.attention(q, k, v, mask), 1e-5, 1e-5)


def _fixture_weights(name: str) -> dict[str, np.ndarray]:
    from tinyqwen.checkpoint import Checkpoint

    with Checkpoint(FIXTURES / name) as ckpt:
        return {n: np.array(ckpt.get(n), dtype=np.float32) for n in sorted(ckpt.keys())}


def test_ch06_dense_model():
    from tinyqwen import mlp
    from tinyqwen.config import count_parameters, published_configs
    from tinyqwen.model import load_model
    from tinyqwen.verify import tolerance

    s = sol(6)
    z = f32(4, 33, scale=6.0)
    close(s.silu(z), mlp.silu(z), 1e-6, 1e-6)
    x, w = f32(3, 16), f32(24, 16)
    close(s.linear(x, w), mlp.linear(x, w), 1e-5, 1e-5)
    wg, wu, wd = f32(40, 16), f32(40, 16), f32(16, 40)
    close(s.swiglu(x, wg, wu, wd), mlp.swiglu(x, wg, wu, wd), 1e-5, 1e-5)
    for fixture in ("dense-tied", "dense-untied-bf16-sharded", "dense-yarn"):
        model = load_model(FIXTURES / fixture)
        ids = rng.integers(0, model.config.vocab_size, (2, 10))
        want = model(ids)
        close(s.forward(ids, _fixture_weights(fixture), model.config), want, tolerance(want))
    for name, config in published_configs().items():
        if not config.is_moe:
            assert s.count_parameters(config) == count_parameters(config), name


def test_ch07_mixture_of_experts():
    from tinyqwen import moe
    from tinyqwen.config import load_config

    s = sol(7)
    logits = f32(20, 8, scale=2.0)
    for k, renorm in ((1, False), (2, True), (3, False)):
        for a, b in zip(s.route(logits, k, renorm), moe.route(logits, k, renorm), strict=True):
            close(a, b, 1e-7, 1e-6)
    x, wr = f32(12, 16), f32(8, 16)
    wg, wu, wd = f32(8, 24, 16), f32(8, 24, 16), f32(8, 16, 24)
    for a, b in zip(
        s.moe_block(x, wr, wg, wu, wd, 2, True), moe.moe_block(x, wr, wg, wu, wd, 2, True), strict=True
    ):
        close(a, b, 1e-5, 1e-5)
    layers = [f32(10, 8), f32(10, 8, scale=3.0)]
    assert s.load_balancing_loss(layers, 8, 2) == pytest.approx(
        moe.load_balancing_loss(layers, 8, 2), rel=1e-6
    )
    config = load_config(FIXTURES / "moe-sparse-step")
    for i in range(config.num_hidden_layers):
        got = s.is_moe_layer(i, config.num_experts, config.decoder_sparse_step, list(config.mlp_only_layers))
        assert got == config.is_moe_layer(i), i


def test_ch08_kv_cache_generation():
    from tinyqwen import generation, sampling
    from tinyqwen.attention import positions_from_mask
    from tinyqwen.kv_cache import KVCache, kv_bytes_per_token
    from tinyqwen.model import load_model

    s = sol(8)
    ck, cv = np.zeros((2, 2, 8, 4), np.float32), np.zeros((2, 2, 8, 4), np.float32)
    cache = KVCache(keys=[ck.copy()], values=[cv.copy()], length=0)
    for length, t in ((0, 3), (3, 1), (4, 2)):
        k, v = f32(2, 2, t, 4), f32(2, 2, t, 4)
        cache.length = length
        for a, b in zip(s.kv_cache_update(ck, cv, k, v, length), cache.update(0, k, v), strict=True):
            close(a, b, 0)
    config = {"num_hidden_layers": 28, "num_key_value_heads": 8, "head_dim": 128}
    assert s.kv_cache_bytes(config, 1000, 2) == 1000 * kv_bytes_per_token(28, 8, 128, "bfloat16")
    logits = rng.standard_normal(50) * 3
    seen = [3, 3, 7, 11]
    close(s.top_k_filter(logits, 5), sampling.top_k_filter(logits, 5), 0)
    for p in (0.1, 0.5, 0.9):
        close(s.top_p_filter(logits, p), sampling.top_p_filter(logits, p), 0)
    for m in (0.05, 0.3):
        close(s.min_p_filter(logits, m), sampling.min_p_filter(logits, m), 0)
    close(s.repetition_penalty(logits, seen, 1.3), sampling.apply_repetition_penalty(logits, seen, 1.3), 0)
    params = sampling.SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    want = sampling.softmax(sampling.process_logits(logits, params, prompt_ids=seen))
    close(s.sampling_distribution(logits, seen, 0.7, 20, 0.8, 0.05, 1.2), want, 1e-12)
    prompts = [[5, 6, 7], [8], [9, 10]]
    for a, b in zip(s.left_pad(prompts, 0), generation.left_pad(prompts, 0), strict=True):
        close(a, b, 0)
    mask = generation.left_pad(prompts, 0)[1]
    close(s.positions_from_mask(mask), positions_from_mask(mask), 0)
    model = load_model(FIXTURES / "dense-tied")
    prompts = [[178, 244, 202], [248, 431], [17]]
    want = generation.generate_batch(model, prompts, 5, eos_token_ids=(), pad_token_id=0)
    assert s.greedy_generate(model, prompts, 5) == want


def test_ch09_chat_template_thinking():
    from tinyqwen import chat_parsing
    from tinyqwen.chat_template import apply_chat_template

    s = sol(9)
    chats = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"}, {"role": "user", "content": "Thanks"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "\nr\n"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nplain"}],
    ]  # fmt: skip
    for chat in chats:
        for gen in (False, True):
            for think in (False, True):
                want = apply_chat_template(chat, add_generation_prompt=gen, enable_thinking=think)
                assert s.render_chat(chat, gen, think) == want, (chat, gen, think)
    ids = [151667, 198, 11, 151668, 271, 21, 151645]
    thinking, content = s.split_thinking(ids)
    assert content == chat_parsing.split_thinking(ids)[1] and thinking + content == ids
    text = 'Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "arguments": "{\\"y\\": [2]}"}\n</tool_call>'  # noqa: E501
    rest, calls = chat_parsing.parse_tool_calls(text)
    assert s.parse_tool_calls(text) == (rest, [{"name": c.name, "arguments": c.arguments} for c in calls])


def test_ch10_numba():
    from tinyqwen import bf16

    s = sol(10)
    x = np.concatenate(
        [f32(1000, scale=1e3), np.float32([1 + 2**-8, 1 + 3 * 2**-8, 3.4e38, -3.4e38, 0.0, -0.0])]
    )
    close(s.float32_to_bf16(x), bf16.float32_to_bf16(x), 0)
    bits = rng.integers(0, 2**16, 4096, dtype=np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80]  # not NaN or inf: NaN payloads compare unequal
    close(s.bf16_to_float32(bits), bf16.bf16_to_float32(bits), 0)
    w, v = bf16.float32_to_bf16(f32(70, 96)), f32(96)
    close(s.gemv_bf16(w, v), bf16.bf16_to_float32(w) @ v, 1e-5, 1e-5)


def test_ch11_cupy():
    from tinyqwen.backends.cupy import NumpyTwins, key_value, order_keys, radix_select_kth
    from tinyqwen.rope import apply_rope, default_inv_freq, rope_cos_sin

    s, twins = sol(11), NumpyTwins()
    for d in (7, 64, 300):
        x, w = f32(5, d, scale=2.0), f32(d)
        close(s.rms_norm_blocked(x, w, 1e-6), twins.rms_norm(x, w, 1e-6), 1e-6, 1e-5)
    x = f32(2, 3, 6, 16)
    cos, sin = rope_cos_sin(rng.integers(0, 500, (2, 6)), default_inv_freq(16, 1e4))
    close(s.rope_by_thread(x, cos, sin), apply_rope(x, cos, sin), 1e-6, 1e-6)
    values = np.concatenate([rng.standard_normal(200), [0.0, -0.0, 3.0, 3.0]])
    close(s.order_key(values), order_keys(values), 0)
    for k in (1, 2, 50, 204):
        got, _ = s.top_k_cut(values, k)
        assert got == key_value(radix_select_kth(order_keys(values), k)), k
    logits, u = f32(4, 1000, scale=3.0), rng.random(4, dtype=np.float32)
    close(s.sample_inverse_cdf(logits, 0.8, u), twins.sample(logits, 0.8, u), 0)


def test_ch12_serving():
    from tinyqwen.chat_parsing import parse_tool_calls
    from tinyqwen.serve import parse_sse

    s = sol(12)
    body = 'data: {"a": 1}\r\n\r\n: ping\n\nevent: x\ndata:{"b":\ndata: 2}\n\ndata: [DONE]\n\ndata: {"cut'
    assert s.parse_sse(body) == parse_sse(body)
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1, "é": "ü"}}\n</tool_call>'
    rest, calls = parse_tool_calls(text)
    got_rest, got = s.parse_tool_calls(text)
    assert got_rest == rest and [(c["function"]["name"], c["function"]["arguments"]) for c in got] == [
        (c.name, __import__("json").dumps(c.arguments, ensure_ascii=False)) for c in calls
    ]


def test_ch13_training():
    from tinyqwen import train
    from tinyqwen.attention import softmax, softmax_backward
    from tinyqwen.grad import cross_entropy_backward
    from tinyqwen.moe import load_balancing_loss_backward, route, route_backward
    from tinyqwen.norm import rms_norm_backward

    s = sol(13)
    y, dy = softmax(f32(4, 9)), f32(4, 9)
    close(s.softmax_backward(dy, y), softmax_backward(dy, y), 1e-7, 1e-6)
    x, w, dy = f32(3, 4, 32), f32(32), f32(3, 4, 32)
    for a, b in zip(s.rms_norm_backward(dy, x, w, 1e-6), rms_norm_backward(dy, x, w, 1e-6), strict=True):
        close(a, b, 1e-6, 1e-5)
    logits, targets = f32(6, 20), np.array([1, 5, -100, 19, 0, -100])
    close(s.cross_entropy_backward(logits, targets), cross_entropy_backward(logits, targets), 1e-7, 1e-6)
    router = f32(10, 8)
    _, experts = route(router, 2, True)
    dweights = f32(10, 2)
    for renorm in (True, False):
        want = route_backward(dweights, router, experts, renorm)
        close(s.route_backward(dweights, router, experts, renorm), want, 1e-7, 1e-5)
    layers = [f32(10, 8), f32(10, 8, scale=3.0)]
    for scope in ("global", "layer"):
        for a, b in zip(s.load_balancing_loss_backward(layers, 8, 2, scope),
                        load_balancing_loss_backward(layers, 8, 2, scope), strict=True):  # fmt: skip
            close(a, b, 1e-7, 1e-5)
    p, g, m, v = f32(3, 5), f32(3, 5), f32(3, 5, scale=0.1), np.abs(f32(3, 5, scale=0.1))
    opt = train.AdamW((0.9, 0.95), 1e-8, 0.1, step=6)
    opt.m, opt.v = {"p": m.copy()}, {"p": v.copy()}
    params = {"p": p.copy()}
    opt.update(params, {"p": g}, 3e-3)
    got = s.adamw_step(p, g, m, v, 7, 3e-3, 0.9, 0.95, 1e-8, 0.1)
    for a, b in zip(got, (params["p"], opt.m["p"], opt.v["p"]), strict=True):
        close(a, b, 1e-6, 1e-5)


def test_ch02_loading_weights():
    from tinyqwen.checkpoint import Checkpoint
    from tinyqwen.config import CONFIG_DIR, config_from_dict, expected_tensors

    s = sol(2)
    folder = FIXTURES / "dense-untied-bf16-sharded"
    got = s.load_checkpoint(folder)
    with Checkpoint(folder) as ckpt:
        assert sorted(got) == sorted(ckpt.keys())
        for name in got:
            close(got[name], ckpt.get(name), 0)
    import json

    for path in sorted(CONFIG_DIR.glob("*.json")):
        config = json.loads(path.read_text(encoding="utf-8"))
        assert s.expected_shapes(config) == expected_tensors(config_from_dict(config)), path.name


def test_ch01_tokenization():
    from tinyqwen import tokenizer as T

    s = sol(1)
    tok = T.Tokenizer.qwen3()
    assert s.bytes_to_unicode() == dict(T.bytes_to_unicode())
    texts = [
        "Hello,  world 2025!\n",
        "café\u0301 naïve 中文 😁 ",
        "<|im_start|>user\nHi<|im_end|>\n",
        "  x\r\n\ty's",
    ]
    for text in texts:
        assert s.to_symbols(text) == T.text_to_symbols(text)
        assert s.pretokenize(text) == T.pre_tokenize(text)
    from exercises.test_ch01_tokenization import files

    vocab, ranks, added, id_to_token = (
        files()
    )  # the official files, parsed as the chapter's checkpoints hand them
    for text in texts:
        assert s.encode(text, vocab, ranks, added) == tok.encode(text), text
        ids = tok.encode(text)
        assert s.decode(ids, id_to_token) == tok.decode(ids)
        stream = tok.stream_decoder()
        assert s.stream_decode(ids, id_to_token) == [stream.push(i) for i in ids] + [stream.flush()]
