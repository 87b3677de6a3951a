"""Resource accounting, solved: what a Qwen3 costs, counted from its config.json.

The derivation, worked for Qwen3-0.6B (L = 28 layers, h = 1024, Hq = 16 and Hkv = 8 heads of d = 128, MLP f = 3072,
V = 151,936, tied) and Qwen3-30B-A3B (L = 48, h = 2048, Hq = 32, Hkv = 4, d = 128, E = 128 experts of m = 768, k = 8
per token, V = 151,936, untied):

    per layer, attention   q, o: h·Hq·d each; k, v: h·Hkv·d each          0.6B: 1024·128·(2·16 + 2·8) = 6,291,456
    per layer, MLP         dense: 3·h·f; sparse: router E·h + E·3·h·m     0.6B: 3·1024·3072 = 9,437,184
    per layer, norms       two of h, q_norm and k_norm of d               0.6B: 2·1024 + 2·128 = 2,304
    whole model            V·h embedding + L·(layer) + h final norm + (V·h head if untied)
                           0.6B: 155,582,464 + 28 · 15,730,944 + 1,024 = 596,049,920 (transformers agrees)
    active (MoE)           total − L·(E − k)·3·h·m: 30,532,122,624 − 48·120·3·2048·768 = 3,353,032,704
    matrix weights / token attention + (dense MLP | router + k experts) per layer, + the head V·h
                           0.6B: 28·(6,291,456 + 9,437,184) + 155,582,464 = 595,984,384
    FLOPs / token          2 · matrix weights + 4·L·Hq·d·context (q·Kᵀ and p·V, a multiply-add each)
                           0.6B at 4,096: 1,191,968,768 + 939,524,096 = 2,131,492,864
    KV bytes / token       2 (K and V) · L · Hkv · d · bytes: 0.6B in bf16: 2·28·8·128·2 = 114,688 (3.5 GiB at 32K)
    decode ceiling         bandwidth / (matrix weights · bytes + context · KV bytes per token)
                           0.6B, bf16, 4,096 tokens on an H100 (3,350 GB/s): 3.35e12 / (1,191,968,768 + 469,762,048)
                           = 2,016 tokens/s; on a 89.6 GB/s laptop, 53.9 tokens/s

30B-A3B holds 30.5B parameters but a token reads only 3.04B matrix weights (3.35B active minus the 311M-row
embedding table, of which it reads one row): it decodes about as fast as a 3B dense model while needing the
memory of a 30B one. Its KV cache per token (98,304 bytes in bf16) is smaller than 0.6B's: 4 kv heads, not 8.
"""

from __future__ import annotations


def _sparse(config: dict, layer: int) -> bool:
    E = config.get("num_experts", 0)
    return (E > 0 and layer not in config.get("mlp_only_layers", [])
            and (layer + 1) % config.get("decoder_sparse_step", 1) == 0)  # fmt: skip


def _attention_weights(c: dict) -> int:  # q, k, v, o of one layer
    return c["hidden_size"] * c["head_dim"] * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])


def _expert(c: dict) -> int:  # gate, up, down of one expert
    return 3 * c["hidden_size"] * c["moe_intermediate_size"]


def total_parameters(config: dict) -> int:
    c = config
    h, V = c["hidden_size"], c["vocab_size"]
    total = V * h + h  # embedding, final norm
    for i in range(c["num_hidden_layers"]):
        mlp = c["num_experts"] * (h + _expert(c)) if _sparse(c, i) else 3 * h * c["intermediate_size"]
        total += _attention_weights(c) + mlp + 2 * h + 2 * c["head_dim"]  # + two layer norms, q_norm, k_norm
    return total + (0 if c.get("tie_word_embeddings", False) else V * h)  # a tied head is the embedding


def active_parameters(config: dict) -> int:
    c = config
    idle = sum(
        (c["num_experts"] - c["num_experts_per_tok"]) * _expert(c)
        for i in range(c["num_hidden_layers"])
        if _sparse(c, i)
    )  # the experts a token's router did not pick, in every sparse layer
    return total_parameters(c) - idle


def _matrix_weights_per_token(c: dict) -> int:  # every weight a token is multiplied by
    h = c["hidden_size"]
    total = c["vocab_size"] * h  # the output head (tied or not, it is read)
    for i in range(c["num_hidden_layers"]):
        if _sparse(c, i):
            mlp = c["num_experts"] * h + c["num_experts_per_tok"] * _expert(c)  # router + chosen experts
        else:
            mlp = 3 * h * c["intermediate_size"]
        total += _attention_weights(c) + mlp
    return total


def forward_flops_per_token(config: dict, context: int) -> int:
    c = config
    # q·Kᵀ and p·V: per query head, context keys of head_dim, one multiply-add each
    attention = 2 * 2 * c["num_hidden_layers"] * c["num_attention_heads"] * c["head_dim"] * context
    return 2 * _matrix_weights_per_token(c) + attention


def kv_cache_bytes_per_token(config: dict, bytes_per_value: int) -> int:
    c = config  # K and V, every layer, every KV head (GQA: fewer than query heads)
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * c["head_dim"] * bytes_per_value


def kv_cache_bytes(config: dict, context: int, bytes_per_value: int, batch: int = 1) -> int:
    return batch * context * kv_cache_bytes_per_token(config, bytes_per_value)


def decode_tokens_per_second(
    config: dict, context: int, bandwidth_gb_s: float, bytes_per_weight: float, bytes_per_kv_value: int
) -> float:
    step_bytes = _matrix_weights_per_token(config) * bytes_per_weight + kv_cache_bytes(
        config, context, bytes_per_kv_value
    )
    return bandwidth_gb_s * 1e9 / step_bytes  # one step = one token at batch 1
