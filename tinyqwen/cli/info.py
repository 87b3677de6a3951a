"""`tinyqwen info`: a checkpoint's config in a few lines, its parameter count, and the memory it needs (weights,
KV cache, activations), in human-sized units."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from tinyqwen.cli.flags import require_positive
from tinyqwen.errors import TinyQwenError
from tinyqwen.hub import resolve_model


def cmd_info(args) -> int:
    from tinyqwen.config import count_parameters, load_config, load_generation_config

    path = resolve_model(args.model)
    gguf_lines: list[str] = []
    if path.is_file():  # a .gguf file (resolve_model accepts no other file)
        c, gen, gguf_lines = gguf_summary(path)
    else:
        c, gen = load_config(path), load_generation_config(path)
    total = count_parameters(c)
    embed = c.vocab_size * c.hidden_size
    lines = [
        f"model        {path}",
        f"type         {c.model_type}{' (MoE)' if c.is_moe else ''}",
        f"layers       {c.num_hidden_layers}, hidden {c.hidden_size}, vocab {c.vocab_size:,}",
        f"attention    {c.num_attention_heads} query heads, {c.num_key_value_heads} kv heads, head_dim {c.head_dim}",
    ]
    if c.is_moe:
        lines.append(
            f"experts      {c.num_experts} ({c.num_experts_per_tok} per token), expert ffn {c.moe_intermediate_size}"
        )
    else:
        lines.append(f"ffn          {c.intermediate_size}")
    rope = f"theta {c.rope_theta:g}"
    if c.rope_scaling is not None:
        rope += f", YaRN x{c.rope_scaling.factor:g} from {c.rope_scaling.original_max_position_embeddings}"
    lines += [
        f"rope         {rope}; context {c.max_position_embeddings:,} tokens",
        f"parameters   {total:,} ({human(total, 1000, '')}), {total - embed:,} without the embedding"
        + ("" if c.tie_word_embeddings else " (lm_head untied)"),
    ]
    if c.is_moe:
        lines.append(f"active       {active_parameters(c):,} per token")
    kv_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # float32 K and V
    lines += [
        f"memory       {human(total * 4)} of float32 weights (tinyqwen computes in float32; bf16 on disk: "
        f"{human(total * 2)})",
        f"kv cache     {human(kv_token)} per token (float32); {human(kv_token * 4096)} for 4,096 tokens",
    ]
    lines += gguf_lines
    if path.is_file():
        lines += rss_lines(path, args)
    if gen:
        keys = ("temperature", "top_k", "top_p", "eos_token_id")
        lines.append("generation   " + ", ".join(f"{k} {gen[k]}" for k in keys if k in gen))
    if args.context is not None:
        lines += ["", *memory_table(c, require_positive("--context", args.context), args.batch, args.backend)]
    print("\n".join(lines))
    return 0


def gguf_summary(path) -> tuple:
    """(config, generation config, lines) for a .gguf file: its tensor types, bits per weight and the resident
    memory it will take. Weights stay memory-mapped in their blocks, so a run touching every weight holds the file's
    tensor bytes; the numpy reference also widens one matrix at a time to float32 (the largest one counts)."""
    from tinyqwen.gguf_checkpoint import GGUFCheckpoint, generation_config_from_gguf
    from tinyqwen.mlp import QUANTIZED_ROWS

    with GGUFCheckpoint(path) as ck:
        c, gen = ck.config, generation_config_from_gguf(ck.file)
        tensors = list(ck.file.tensors.values())
        types = ck.tensor_types()
    weight_bytes = sum(t.nbytes for t in tensors)
    values = sum(math.prod(t.shape) for t in tensors)
    quantized = [t for t in tensors if t.ggml_type not in ("F32", "F16", "BF16")]
    # the numpy reference widens a quantized matrix (one expert's, for a stack) in slabs of QUANTIZED_ROWS rows
    widened = max((min(t.shape[-2], QUANTIZED_ROWS) * t.shape[-1] * 4 for t in quantized), default=0)
    lines = [
        f"gguf         {', '.join(f'{n} {k}' for k, n in sorted(types.items()))}; "
        f"{8 * weight_bytes / max(values, 1):.2f} bits per weight",
        f"resident     {human(weight_bytes)} of weights, memory-mapped in their blocks; the numpy backend widens "
        f"one matrix at a time (+{human(widened)}): about {human(weight_bytes + widened)} before the KV cache",
    ]
    return c, gen, lines


# The numba backend's resident memory beyond the weights and the KV cache, measured on a 2-layer Qwen3-30B-A3B-shaped
# Q4_K_M file (benchmarks/bench_moe.py --quant) after a 128-token prefill and a few decode steps, kernels already
# compiled: 98 MB (RssAnon 40 + RssFile 59: the interpreter, NumPy, OpenBLAS, Numba, LLVM) before any weight, 164 MB
# after (RssAnon 100 + the libraries' 64 MB of file pages): the compiled kernels, scratch buffers and a small
# prefill's temporaries. A longer prefill's temporaries are added from the shapes (`predict_rss`).
NUMBA_RUNTIME_BYTES = 164 << 20


def predict_rss(path, context: int, layers: int | None = None, kv_dtype: str = "bfloat16") -> dict[str, int]:
    """The peak resident memory (bytes) of the numba backend running GGUF file `path` with a `context`-token KV
    cache (batch 1) — for the same model with `layers` layers when the file is a truncated one (default: its own).

    weights     every tensor's bytes but the embedding's: they stay memory-mapped in their blocks, and a prompt's
                prefill reaches every expert of every layer. A layer tensor found in two types (Q4_K_M gives
                attn_v / ffn_down Q6_K in some layers, `tinyqwen.quantize.use_more_bits`) takes the larger one in
                the layers that rule picks for `layers`, the smaller one elsewhere; otherwise its bytes × layers.
    embedding   only the rows a prompt reads are paged in: at most `context` rows (each a page or two).
    kv_cache    2 · layers · kv_heads · head_dim · context values of `kv_dtype`.
    activations one prefill chunk's temporaries (`kv_cache.memory_estimate`), plus for a MoE the grouped experts'
                hidden and output rows (chunk · top-k · (expert ffn + hidden) float32).
    runtime     NUMBA_RUNTIME_BYTES, measured (see the note above it).

    Measured against it (bench_moe.py --quant, 2 layers, 136-token context): predicted 1.21 GB, measured peak
    1.11 GB — the prediction counts every expert, and a 128-token random prompt left some unrouted (82 MB of the
    file never read); a long prompt on the full model reaches them all.
    """
    from tinyqwen.gguf_checkpoint import GGUFCheckpoint
    from tinyqwen.kv_cache import PREFILL_CHUNK, kv_bytes_per_token, memory_estimate
    from tinyqwen.quantize import use_more_bits

    with GGUFCheckpoint(path) as ck:
        c, tensors = ck.config, list(ck.file.tensors.values())
    layers = c.num_hidden_layers if layers is None else require_positive("--layers", layers)
    per_layer: dict[str, list[int]] = {}  # a layer tensor's name without "blk.N." -> its bytes in each layer
    weights = embedding = 0
    for t in tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            per_layer.setdefault(".".join(parts[2:]), []).append(t.nbytes)
        elif t.name == "token_embd.weight":
            row = t.nbytes // t.shape[0]
            embedding = min(t.nbytes, context * (row + 4096))
        else:
            weights += t.nbytes
    more = sum(use_more_bits(i, layers) for i in range(layers))
    for sizes in per_layer.values():
        kinds = sorted(set(sizes))
        if len(kinds) == 2:  # the _M mix: more bits in the layers use_more_bits picks
            weights += more * kinds[1] + (layers - more) * kinds[0]
        else:
            weights += round(sum(sizes) / len(sizes) * layers)
    kv = context * kv_bytes_per_token(layers, c.num_key_value_heads, c.head_dim, kv_dtype)
    act = memory_estimate(c, context, kv_dtype)["activations"]
    if c.is_moe:
        act += (
            4
            * min(context, PREFILL_CHUNK)
            * c.num_experts_per_tok
            * (c.moe_intermediate_size + c.hidden_size)
        )
    out = {"weights": weights, "embedding": embedding, "kv_cache": kv, "activations": act}
    out["runtime"] = NUMBA_RUNTIME_BYTES
    return {**out, "total": sum(out.values()), "layers": layers}


def full_layers(args) -> int | None:
    """The layer count `tinyqwen info` predicts for: --layers, or --as-config's num_hidden_layers (None: the file's)."""
    from tinyqwen.config import load_config, published_configs

    if getattr(args, "as_config", None) is None:
        return getattr(args, "layers", None)
    if args.layers is not None:
        raise TinyQwenError("--layers and --as-config: give one (both set the layer count)")
    name = args.as_config
    if name in published_configs():
        return published_configs()[name].num_hidden_layers
    if not Path(name).exists():
        names = ", ".join(published_configs())
        raise TinyQwenError(f"--as-config: {name} is neither a config.json nor a published model ({names})")
    return load_config(name).num_hidden_layers


def rss_lines(path, args) -> list[str]:
    """`tinyqwen info`'s lines predicting the numba backend's peak RSS on GGUF file `path` (see predict_rss)."""
    context = require_positive("--context", args.context) if args.context is not None else 4096
    p = predict_rss(path, context, full_layers(args))
    return [
        f"numba RSS    about {human(p['total'])} for {p['layers']} layers and a {context:,}-token context: "
        f"{human(p['weights'])} of weights + {human(p['embedding'])} of embedding rows read + "
        f"{human(p['kv_cache'])} of bf16 KV cache + {human(p['activations'])} of prefill temporaries + "
        f"{human(p['runtime'])} runtime (measured)"
    ]


def memory_table(c, context: int, batch: int, backend: str) -> list[str]:
    """Memory to prefill `context` tokens, per KV cache dtype (tinyqwen.kv_cache.memory_estimate), as lines."""
    from tinyqwen.config import count_parameters
    from tinyqwen.kv_cache import KV_DTYPES, PREFILL_CHUNK, memory_estimate

    require_positive("--batch", batch)
    if backend not in ("numpy", "numba"):
        raise TinyQwenError(f"--backend: info knows the memory of numpy and numba, not {backend!r}")
    # numpy widens every weight to float32; numba keeps a bf16 checkpoint's matrices as bf16 (2 bytes)
    weights = count_parameters(c) * (4 if backend == "numpy" else 2)
    where = "float32 weights" if backend == "numpy" else "bf16 weights (a bf16 checkpoint)"
    lines = [
        f"memory for a {context:,}-token context, batch {batch}, prefill in chunks of "
        f"{min(context, PREFILL_CHUNK):,} tokens ({backend} backend: {where})",
        f"  {'kv dtype':<10}{'weights':>12}{'kv cache':>12}{'activations':>13}{'runtime':>11}{'total':>12}",
    ]
    for dtype in KV_DTYPES:
        m = memory_estimate(c, context, dtype, batch=batch, weight_bytes=weights)
        parts = [m["weights"], m["kv_cache"], m["activations"], m["runtime"], sum(m.values())]
        widths = (12, 12, 13, 11, 12)
        lines.append(
            f"  {dtype:<10}" + "".join(f"{human(v):>{w}}" for v, w in zip(parts, widths, strict=True))
        )
    if context > c.max_position_embeddings:
        lines.append(
            f"  (beyond this model's context of {c.max_position_embeddings:,} tokens: generation would refuse)"
        )
    return lines


def active_parameters(c) -> int:
    """Parameters one token touches in a MoE model: the shared parts plus top-k of the experts."""
    from tinyqwen.config import count_parameters

    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    return count_parameters(c) - moe_layers * (c.num_experts - c.num_experts_per_tok) * per_expert


def human(n: float, base: int = 1024, unit: str = "B") -> str:
    """1536 -> '1.5 KiB'; human(6e8, 1000, '') -> '600.0M'.

    >>> human(1536), human(6e8, 1000, '')
    ('1.5 KiB', '600.0M')
    """
    names = ["", "K", "M", "G", "T"]
    i = 0
    while n >= base and i < len(names) - 1:
        n, i = n / base, i + 1
    suffix = names[i] + ("i" if base == 1024 and i and unit else "") + unit
    return f"{n:.1f} {suffix}" if unit else f"{n:.1f}{suffix}"


def cmd_quantize(args) -> int:
    from tinyqwen.quantize import quantize_checkpoint

    counts = quantize_checkpoint(resolve_model(args.model), args.to, args.out)
    size = Path(args.out).stat().st_size
    mix = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    print(f"wrote {args.out}: {human(size)}, tensors {mix}", file=sys.stderr)
    return 0
