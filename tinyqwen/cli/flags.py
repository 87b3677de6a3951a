"""What the generation flags mean: Qwen's sampling preset for the mode with the flags on top, the keyword arguments
they give `generate`, and the check that a count flag is a whole number > 0."""

from __future__ import annotations

from tinyqwen.errors import TinyQwenError
from tinyqwen.sampling import NON_THINKING, THINKING, SamplingParams


def sampling_params(args, generation_config: dict, thinking: bool) -> SamplingParams:
    """Qwen's preset for the mode, flags on top.

    Thinking mode starts from the checkpoint's generation_config.json (Qwen3 ships the thinking preset there);
    non-thinking mode from Qwen's non-thinking preset (T 0.7, top-p 0.8, top-k 20), since generation_config
    has only one set of values.
    """
    base = (
        SamplingParams.from_generation_config(generation_config, base=THINKING) if thinking else NON_THINKING
    )
    return base.override(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        repetition_penalty=args.repetition_penalty,
    )


def generation_kwargs(args, params: SamplingParams) -> dict:
    """The keyword arguments of `stream_generate` / `generate_batch` that the flags set (a seed only when sampling)."""
    kwargs = {"params": params, "temperature": params.temperature}
    if getattr(args, "kv_dtype", "float32") != "float32":
        kwargs["kv_dtype"] = args.kv_dtype
    if not params.greedy:
        kwargs["seed"] = args.seed
    if args.thinking_budget is not None:
        kwargs["thinking_budget"] = args.thinking_budget
        if args.early_stop_text is not None:
            kwargs["early_stop"] = args.early_stop_text
    return kwargs


def require_positive(flag: str, value: int) -> int:
    """`value`, or a one-line error naming the flag when it is not a whole number > 0."""
    if value <= 0:
        raise TinyQwenError(f"{flag} must be a whole number > 0, got {value}")
    return value
