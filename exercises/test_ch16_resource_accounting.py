"""Part IV capstone checkpoints: parameters, FLOPs, KV-cache bytes and the decode ceiling of each official config.

Every expected value below is derived by hand from the config.json numbers, written out as the arithmetic (the
symbols: L layers, h hidden, Hq / Hkv heads of d, f MLP width, V vocabulary, E experts of width m, k per token).
The parameter totals are also checked against transformers' own count (exercises/references/ch06_dense_model.npz,
`params.*`, made by make_ch06_dense_model.py), so the hand derivation is itself tested. Integers are compared
exactly; tokens per second (a float division) to 1e-9 relative.
"""

from __future__ import annotations

import functools

from exercises.grading import Mistake, call, config_json, expect_close, expect_equal, notebook, reference_file

PARAMS = notebook(6, "4. How big is it? Parameters and memory")
EXPERTS = notebook(7, "1. Many experts, few at a time")
CACHE = notebook(8, "How much memory the cache takes")
ROOFLINE = notebook(10, "2. The roofline: bytes per token")
GPU_ROOFLINE = notebook(11, "2. Why decode is bandwidth-bound: the roofline")
NAMES = ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B", "Qwen3-30B-A3B")

# Per config: the numbers of its config.json, and the derivation of each quantity from them.
#   attention / layer  h·d·(2·Hq + 2·Hkv)        norms / layer  2·h + 2·d
#   dense MLP / layer  3·h·f                     sparse MLP / layer  E·h (router) + E·3·h·m
#   total  V·h + L·(attention + MLP + norms) + h (+ V·h if untied)
#   matrix weights a token reads  L·(attention + dense MLP | router + k·3·h·m) + V·h (the head)
HAND = {
    "Qwen3-0.6B": dict(  # L 28, h 1024, Hq 16, Hkv 8, d 128, f 3072, V 151936, tied
        total=151936 * 1024
        + 28 * (1024 * 128 * (2 * 16 + 2 * 8) + 3 * 1024 * 3072 + 2 * 1024 + 2 * 128)
        + 1024,
        idle_experts=0,
        matrix=28 * (1024 * 128 * (2 * 16 + 2 * 8) + 3 * 1024 * 3072) + 151936 * 1024,  # 595,984,384
        attention_per_key=4 * 28 * 16 * 128,  # 2 products · 2 flops · L · Hq · d
        kv_values_per_token=2 * 28 * 8 * 128,  # K and V · L · Hkv · d
    ),
    "Qwen3-4B": dict(  # L 36, h 2560, Hq 32, Hkv 8, d 128, f 9728, V 151936, tied
        total=151936 * 2560
        + 36 * (2560 * 128 * (2 * 32 + 2 * 8) + 3 * 2560 * 9728 + 2 * 2560 + 2 * 128)
        + 2560,
        idle_experts=0,
        matrix=36 * (2560 * 128 * (2 * 32 + 2 * 8) + 3 * 2560 * 9728) + 151936 * 2560,
        attention_per_key=4 * 36 * 32 * 128,
        kv_values_per_token=2 * 36 * 8 * 128,
    ),
    "Qwen3-8B": dict(  # L 36, h 4096, Hq 32, Hkv 8, d 128, f 12288, V 151936, untied
        total=2 * 151936 * 4096
        + 36 * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128)
        + 4096,
        idle_experts=0,
        matrix=36 * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 12288) + 151936 * 4096,
        attention_per_key=4 * 36 * 32 * 128,
        kv_values_per_token=2 * 36 * 8 * 128,
    ),
    "Qwen3-30B-A3B": dict(  # L 48, h 2048, Hq 32, Hkv 4, d 128, E 128, m 768, k 8, V 151936, untied, all sparse
        total=2 * 151936 * 2048
        + 48 * (2048 * 128 * (2 * 32 + 2 * 4) + 128 * 2048 + 128 * 3 * 2048 * 768 + 2 * 2048 + 2 * 128)
        + 2048,
        idle_experts=48 * (128 - 8) * 3 * 2048 * 768,
        matrix=48 * (2048 * 128 * (2 * 32 + 2 * 4) + 128 * 2048 + 8 * 3 * 2048 * 768) + 151936 * 2048,
        attention_per_key=4 * 48 * 32 * 128,
        kv_values_per_token=2 * 48 * 4 * 128,
    ),
}
# The machines of decode_tokens_per_second's docstring: GB/s (10⁹ bytes per second)
MACHINES = {"H100 SXM (3,350 GB/s)": 3350.0, "laptop DDR5-5600 dual channel (89.6 GB/s)": 89.6}
CONTEXTS = (1, 4096, 32768)


@functools.cache
def config(name: str) -> dict:
    return config_json(name)


def _ch(course):
    return course.ch16


def test_total_parameters(course):
    """Total parameters of each official config"""
    stored = reference_file("ch06_dense_model.npz")
    for name in NAMES:
        want = HAND[name]["total"]
        assert want == int(stored[f"params.{name}"]), (
            f"the hand derivation of {name} disagrees with transformers"
        )
        got = call(
            _ch(course).total_parameters, config(name), what=f"total_parameters({name})", reread=PARAMS
        )
        c = config(name)
        h, V = c["hidden_size"], c["vocab_size"]
        norms = c["num_hidden_layers"] * (2 * h + 2 * c["head_dim"]) + h
        expect_equal(got, want, what=f"total_parameters({name})", reread=PARAMS, inputs=f"configs/{name}.json",
                     mistakes=[Mistake("a tied head was counted a second time", want + V * h,
                                       "Tied (tie_word_embeddings true): the head IS the embedding table."),
                               Mistake("the norms were left out", want - norms,
                                       "Count the two layer norms [h], q_norm and k_norm [head_dim] per layer, and "
                                       "the final norm.")])  # fmt: skip


def test_active_parameters(course):
    """Active parameters: the same for dense models, the A3B of the mixture of experts"""
    for name in NAMES:
        want = HAND[name]["total"] - HAND[name]["idle_experts"]
        got = call(
            _ch(course).active_parameters, config(name), what=f"active_parameters({name})", reread=EXPERTS
        )
        c = config(name)
        mistakes = [
            Mistake(
                "every expert was counted as active",
                HAND[name]["total"],
                "A token runs num_experts_per_tok of num_experts experts per sparse layer.",
            )
        ]
        if c.get("num_experts"):
            mistakes.append(Mistake("the embedding table was left out", want - c["vocab_size"] * c["hidden_size"],
                                    "Active parameters count the whole embedding table, as Qwen's '3.3B "
                                    "activated' does."))  # fmt: skip
        expect_equal(got, want, what=f"active_parameters({name})", reread=EXPERTS, mistakes=mistakes,
                     inputs=f"configs/{name}.json")  # fmt: skip


def test_forward_flops_per_token(course):
    """FLOPs of one token's forward, at contexts 1, 4,096 and 32,768"""
    for name in NAMES:
        hand = HAND[name]
        c = config(name)
        for context in CONTEXTS:
            want = 2 * hand["matrix"] + hand["attention_per_key"] * context
            got = call(_ch(course).forward_flops_per_token, config(name), context, reread=ROOFLINE,
                       what=f"forward_flops_per_token({name}, context={context})")  # fmt: skip
            gqa_heads = hand["attention_per_key"] * c["num_key_value_heads"] // c["num_attention_heads"]
            expect_equal(got, want, what=f"forward_flops_per_token({name}, {context})", reread=ROOFLINE,
                         inputs=f"configs/{name}.json, context {context}", mistakes=[
                Mistake("one flop per multiply-add", want // 2, "A multiply-add is 2 floating-point operations."),
                Mistake("attention's products with the keys and values were left out", 2 * hand["matrix"],
                        "q·Kᵀ and p·V grow with the context: 2 products · 2 flops · layers · query heads · "
                        "head_dim · context."),
                Mistake("attention was counted per kv head, not per query head", 2 * hand["matrix"]
                        + gqa_heads * context, "Every query head does its own q·Kᵀ and p·V (GQA shares the "
                        "keys, not the work)."),
                Mistake("the embedding lookup was counted as a matrix product",
                        want + 2 * c["vocab_size"] * c["hidden_size"], "The embedding is a row lookup: no flops."),
            ])  # fmt: skip


def test_kv_cache(course):
    """KV-cache bytes per token and at 32,768 tokens (bf16), for each config"""
    for name in NAMES:
        hand, c = HAND[name], config(name)
        want = hand["kv_values_per_token"] * 2
        got = call(_ch(course).kv_cache_bytes_per_token, c, 2, reread=CACHE,
                   what=f"kv_cache_bytes_per_token({name}, 2)")  # fmt: skip
        expect_equal(got, want, what=f"kv_cache_bytes_per_token({name}, bf16)", reread=CACHE, mistakes=[
            Mistake("query heads instead of kv heads", want * c["num_attention_heads"] // c["num_key_value_heads"],
                    "Only the num_key_value_heads heads are cached: GQA's whole point."),
            Mistake("only the keys (or only the values) were counted", want // 2, "Both K and V are cached."),
            Mistake("bits, not bytes", want * 8, "A bf16 number is 2 bytes."),
        ])  # fmt: skip
        for batch in (1, 4):
            got = call(_ch(course).kv_cache_bytes, c, 32768, 2, batch, reread=CACHE,
                       what=f"kv_cache_bytes({name}, 32768, 2, batch={batch})")  # fmt: skip
            expect_equal(got, want * 32768 * batch, what=f"kv_cache_bytes({name}, 32768 tokens, bf16, batch {batch})",
                         reread=CACHE)  # fmt: skip


def test_decode_ceiling(course):
    """The bandwidth-bound decode speed on an H100 and on a laptop, bf16, at 1 and 32,768 tokens"""
    for name in NAMES:
        hand = HAND[name]
        for machine, gb_s in MACHINES.items():
            for context in (1, 32768):
                kv = hand["kv_values_per_token"] * 2 * context
                want = gb_s * 1e9 / (hand["matrix"] * 2 + kv)
                got = call(_ch(course).decode_tokens_per_second, config(name), context, gb_s, 2, 2,
                           reread=GPU_ROOFLINE, what=f"decode_tokens_per_second({name}, {context}, {gb_s} GB/s)")  # fmt: skip
                expect_close(got, want, rtol=1e-9, atol=0, reread=GPU_ROOFLINE,
                             what=f"decode ceiling of {name} on {machine}, {context} tokens of context, bf16",
                             mistakes=[
                    Mistake("GiB/s instead of GB/s", gb_s * 2**30 / (hand["matrix"] * 2 + kv),
                            "The bandwidth is in GB/s: 10⁹ bytes per second."),
                    Mistake("the KV cache was not read", gb_s * 1e9 / (hand["matrix"] * 2),
                            "Every step reads the whole cache: at 32K tokens it is gigabytes."),
                    Mistake("every parameter was read, the embedding table and idle experts included",
                            gb_s * 1e9 / (HAND[name]["total"] * 2 + kv),
                            "A step reads the matrices it multiplies by: the head, attention, the chosen experts."),
                ])  # fmt: skip
