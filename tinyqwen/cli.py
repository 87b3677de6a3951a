"""The `tinyqwen` command line: chat, generate, verify, info, bench, serve, train.

    tinyqwen chat --model Qwen/Qwen3-0.6B                 # multi-turn REPL; Ctrl-D or /exit quits, /clear starts over
    tinyqwen chat --model ./ckpt --no-think --temperature 0
    tinyqwen generate --model ./ckpt "Write a haiku about NumPy"
    tinyqwen generate --model ./ckpt --file prompts.txt    # one prompt per line, in batches of 8
    tinyqwen verify --model ./ckpt                         # our logits vs transformers' (if installed)
    tinyqwen info --model ./ckpt                           # config, parameters, memory
    tinyqwen bench --model ./ckpt --json                   # speed vs transformers / llama.cpp, one run
    tinyqwen serve --model ./ckpt --port 8000              # an OpenAI-compatible endpoint (tinyqwen[serve])

Every error caused by the input (a missing model, a bad flag value, a prompt longer than the context) is a
`TinyQwenError`, printed as one line on stderr with exit code 1; a traceback means a bug in tinyqwen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinyqwen.errors import TinyQwenError, TokenizerError
from tinyqwen.hub import resolve_model
from tinyqwen.sampling import NON_THINKING, THINKING, SamplingParams
from tinyqwen.thinking import THINK_END_ID, THINK_START_ID, thinking_mode

TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
QWEN3_TOKENS = 151669  # ids 0..151668 of the Qwen3 tokenizer (151,643 BPE tokens + 26 added ones)
QWEN_EOS_IDS = (151643, 151645)  # <|endoftext|> (base models), <|im_end|> (chat models)


# ------------------------------------------------------------------------------------------ loading


def load_tokenizer(model_dir: Path, tokenizer_dir: str | None = None, config=None):
    """The tokenizer for a model: --tokenizer DIR, else the checkpoint's own files, else (see below) the Qwen3
    tokenizer shipped with tinyqwen. With the model's `config`, its vocabulary is checked to fit the model's.

    Decision: a checkpoint without tokenizer files whose config.json is a Qwen3 one (model_type qwen3 or
    qwen3_moe, at least the 151,669 rows that the Qwen3 tokenizer's ids need, Qwen's eos ids) gets the bundled
    Qwen3 tokenizer, with a one-line note on stderr saying so: every official Qwen3 model, dense or MoE, uses that
    one tokenizer. Any other checkpoint gets an error asking for --tokenizer DIR, since a tokenizer guessed for
    an unknown vocabulary would give wrong ids without a word.
    """
    from tinyqwen.tokenizer import Tokenizer

    if tokenizer_dir:
        folder = Path(tokenizer_dir).expanduser()
        where = f"--tokenizer {tokenizer_dir}"
        if not has_tokenizer_files(folder):
            raise TokenizerError(
                f"{where}: no tokenizer files there (tokenizer.json, or vocab.json + merges.txt)"
            )
        tokenizer = Tokenizer.from_pretrained(folder)
    elif has_tokenizer_files(model_dir):
        where = f"the tokenizer in {model_dir}"
        tokenizer = Tokenizer.from_pretrained(model_dir)
    elif config is not None and looks_like_qwen3(config):
        print(
            f"tinyqwen: note: {model_dir} has no tokenizer files; using the Qwen3 tokenizer shipped with tinyqwen "
            "(--tokenizer DIR picks another)",
            file=sys.stderr,
        )
        return Tokenizer.qwen3()
    else:
        raise TokenizerError(
            f"{model_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); "
            "pass --tokenizer DIR pointing at this model's tokenizer"
        )
    if config is not None and tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(
            f"{where} has {tokenizer.vocab_size:,} tokens but the model has only {config.vocab_size:,} "
            "(vocab_size in its config.json), so most ids would be out of range: use the model's own tokenizer"
        )
    return tokenizer


def has_tokenizer_files(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in group) for group in TOKENIZER_FILES)


def looks_like_qwen3(config) -> bool:
    """Whether a config.json is one of the Qwen3 family's, so that the Qwen3 tokenizer fits it."""
    eos = config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return (
        config.model_type in ("qwen3", "qwen3_moe")
        and config.vocab_size >= QWEN3_TOKENS
        and all(e in QWEN_EOS_IDS for e in eos)
    )


def load(args, need_tokenizer: bool = True):
    """(model, tokenizer or None) for --model/--backend/--tokenizer. The tokenizer is loaded and checked against
    config.json before the weights are read, so a mismatch fails in a moment, not after loading gigabytes."""
    import tinyqwen
    from tinyqwen.config import load_config

    path = resolve_model(args.model)
    tokenizer = None
    if need_tokenizer:
        tokenizer = load_tokenizer(path, getattr(args, "tokenizer", None), load_config(path))
    model = tinyqwen.load_model(
        path, backend=args.backend, matmul_precision=getattr(args, "matmul_precision", "highest")
    )
    return model, tokenizer


# ------------------------------------------------------------------------------------------ sampling flags


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


# ------------------------------------------------------------------------------------------ display


@dataclass
class Style:
    """How thinking is shown apart from the answer: dim text between labels (labels alone without colour)."""

    color: bool

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color and text else text

    @classmethod
    def for_stream(cls, stream, disabled: bool) -> Style:
        return cls(color=not disabled and "NO_COLOR" not in os.environ and stream.isatty())


class ReplyPrinter:
    """Streams a reply's ids to the terminal as text: thinking dimmed between [thinking] labels, then the answer.

    The tokenizer's stream decoder holds back bytes of a character that is not complete yet, so multi-byte
    characters split over several tokens print correctly.
    """

    def __init__(self, tokenizer, style: Style, out=sys.stdout, eos_ids=()):
        self.tokenizer, self.style, self.out, self.eos_ids = tokenizer, style, out, set(eos_ids)
        self.decoder = tokenizer.stream_decoder()
        self.thinking = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(self.style.dim(text) if self.thinking else text)
            self.out.flush()

    def push(self, token: int) -> None:
        if token == THINK_START_ID:
            self._write(self.decoder.flush())
            self.thinking = True
            self._write("[thinking]")
        elif token == THINK_END_ID:
            self._write(self.decoder.flush())
            self._write("[/thinking]")
            self.thinking = False
        elif token not in self.eos_ids:
            self._write(self.decoder.push(token))

    def close(self) -> None:
        self._write(self.decoder.flush())
        if self.thinking:  # cut off while thinking (max tokens, Ctrl-C)
            self._write("[/thinking]")
            self.thinking = False
        self.out.write("\n")
        self.out.flush()


def eos_ids(model) -> tuple[int, ...]:
    eos = model.generation_config.get("eos_token_id", model.config.eos_token_id)
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


def answer_text(tokenizer, ids: list[int], eos: tuple[int, ...]) -> tuple[str, str]:
    """(thinking, answer) as text, eos dropped.

    A reply cut off inside `<think>` (Ctrl-C, max tokens) has no answer yet: its open think block is thinking,
    never part of the answer, so an unclosed `<think>` never reaches a chat's history.
    """
    from tinyqwen.chat_parsing import split_thinking

    ids = [t for t in ids if t not in eos]
    opened = max((i for i, t in enumerate(ids) if t == THINK_START_ID), default=None)
    unfinished: list[int] = []
    if opened is not None and THINK_END_ID not in ids[opened:]:
        ids, unfinished = ids[:opened], ids[opened + 1 :]
    thinking, content = split_thinking(ids)
    return tokenizer.decode(thinking + unfinished).strip(), tokenizer.decode(content).strip()


def undecodable(text: str) -> str | None:
    """A one-line complaint when `text` holds a lone surrogate, else None.

    Python reads bytes that are not UTF-8 (a terminal in another encoding, a broken paste) as lone surrogates
    U+DC80..U+DCFF ("surrogateescape"), which are not Unicode text and cannot be tokenized.

    >>> undecodable("caf\\udcff!")
    "byte 0xff at character 4 (after 'caf') is not UTF-8 text; is the terminal set to UTF-8?"
    >>> undecodable("café") is None
    True
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        char, before = text[e.start], text[max(0, e.start - 20) : e.start]
        what = f"byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF else f"{char!r}"
        return (
            f"{what} at character {e.start + 1} (after {before!r}) is not UTF-8 text; "
            "is the terminal set to UTF-8?"
        )


# ------------------------------------------------------------------------------------------ commands

CHAT_QUIT = ("/exit", "/quit", "/bye")
CHAT_CLEAR = ("/clear", "/reset")


def cmd_chat(args) -> int:
    """The REPL. Each turn renders the whole conversation with the chat template and generates a reply.

    The user's text is tokenized as plain text (`Tokenizer.apply_chat_template`, sanitize_control_tokens): typing
    "<|im_end|>" or "<think>" cannot fake a turn or a thought; only the template writes control tokens. A line that
    cannot be sent (not UTF-8) is refused with one line and the chat goes on; nothing is added to the history until
    a reply has been generated.

    The context (`--context`, default the model's max_position_embeddings) is a budget: after each reply the chat
    says how many tokens the conversation uses and how many are left. When a new message would not leave room for
    a reply (`reply_room`: --max-new-tokens, at most a quarter of the context), the *oldest exchanges* (a user
    message and the replies to it; the system message is always kept) are dropped from the history, with a
    notice saying how many — the model then no longer sees them. A single message too long for the context even
    with no history is refused.
    """
    from tinyqwen.chat_template import apply_chat_template
    from tinyqwen.generation import stream_generate

    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    if args.system is not None and undecodable(args.system):
        raise TinyQwenError(f"--system: {undecodable(args.system)}")
    model, tokenizer = load(args)
    style = Style.for_stream(sys.stdout, args.no_color)
    eos = eos_ids(model)
    context = model.config.max_position_embeddings
    if args.context is not None:
        context = min(context, require_positive("--context", args.context))
    room = reply_room(args.max_new_tokens, context)
    enable_thinking = not args.no_think
    fresh: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(fresh)
    name = Path(str(args.model)).name or str(args.model)
    print(style.dim(f"tinyqwen chat · {name} · {args.backend} · Ctrl-D or /exit quits · /clear starts over · "
                    "/think, /no_think in a message switch modes"))  # fmt: skip
    while True:
        try:
            text = input(">>> ")
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C drops the half-typed line, as a shell does; the chat goes on
            print(style.dim("^C (Ctrl-D or /exit quits)"))
            continue
        command = text.strip()
        if not command:
            continue
        if command in CHAT_QUIT:
            return 0
        if command in CHAT_CLEAR:
            messages = list(fresh)
            print(style.dim("[new conversation]"))
            continue
        problem = undecodable(text)
        if problem:
            print(f"tinyqwen: error: your message was not sent: {problem}", file=sys.stderr)
            continue
        user = {"role": "user", "content": text}
        try:
            ids = tokenizer.apply_chat_template(
                [*messages, user],
                add_generation_prompt=True,
                enable_thinking=enable_thinking,
                return_dict=False,
            )
            dropped = 0
            while len(ids) + room > context and (shorter := drop_oldest_exchange(messages)) is not None:
                messages, dropped = shorter, dropped + 1
                ids = tokenizer.apply_chat_template(
                    [*messages, user],
                    add_generation_prompt=True,
                    enable_thinking=enable_thinking,
                    return_dict=False,
                )
        except TinyQwenError as error:
            print(f"tinyqwen: error: your message was not sent: {one_line(error)}", file=sys.stderr)
            continue
        if dropped:
            print(style.dim(f"[context: dropped the oldest {dropped} exchange{'s' * (dropped > 1)} to make room: "
                            f"the prompt is now {len(ids):,} of {context:,} tokens]"))  # fmt: skip
        turn = [*messages, user]
        thinking = thinking_mode(turn, enable_thinking)
        if len(ids) >= context:
            print(
                f"tinyqwen: error: your message was not sent: with it the conversation is {len(ids):,} tokens, "
                f"and the model's context is {context:,}; /clear starts a new conversation",
                file=sys.stderr,
            )
            continue
        params = sampling_params(args, model.generation_config, thinking)
        if args.show_prompt:
            mode = "thinking" if thinking else "non-thinking"
            prompt = apply_chat_template(turn, add_generation_prompt=True, enable_thinking=enable_thinking)
            print(style.dim(f"[prompt: {len(ids)} tokens, {mode} mode]\n{prompt}[/prompt]"))
        printer = ReplyPrinter(tokenizer, style, sys.stdout, eos)
        reply: list[int] = []
        try:
            kwargs = generation_kwargs(args, params)
            budget = min(args.max_new_tokens, context - len(ids))  # --context caps the reply too
            for token in stream_generate(model, ids, budget, eos_token_ids=eos, **kwargs):
                reply.append(token)
                printer.push(token)
        except KeyboardInterrupt:
            printer.close()
            print(style.dim("[interrupted]"))
        except TinyQwenError as error:  # say so, keep the REPL and the conversation as it was
            printer.close()
            print(f"tinyqwen: error: {one_line(error)}", file=sys.stderr)
            continue
        else:
            printer.close()
        # history keeps the answer only: the template drops earlier turns' thinking anyway
        _, answer = answer_text(tokenizer, reply, eos)
        messages = [*turn, {"role": "assistant", "content": answer}]
        used = len(ids) + len(reply)
        print(style.dim(f"[context: {used:,} of {context:,} tokens used, {max(0, context - used):,} left]"))


def reply_room(max_new_tokens: int, context: int) -> int:
    """Tokens a new prompt must leave free for the reply: --max-new-tokens, but at most a quarter of the context
    (a 2,048-token reply budget must not empty a 4,096-token conversation).

    >>> reply_room(2048, 40960), reply_room(2048, 4096)
    (2048, 1024)
    """
    return max(0, min(max_new_tokens, context // 4))


def drop_oldest_exchange(messages: list[dict]) -> list[dict] | None:
    """The history without its oldest exchange (the first user message and everything up to the next user
    message); system messages stay. None when there is no exchange left to drop.

    >>> m = [{"role": "system"}, {"role": "user"}, {"role": "assistant"}, {"role": "user"}, {"role": "assistant"}]
    >>> [x["role"] for x in drop_oldest_exchange(m)]
    ['system', 'user', 'assistant']
    """
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        return None
    end = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), len(messages))
    return messages[:first] + messages[end:]


def read_prompts(args) -> list[tuple[str, str]]:
    """(where, prompt) for each prompt: the arguments, then the --file's non-blank lines (`where` names them in
    errors). The whole file is read and checked first, so a bad byte fails before any generation starts."""
    prompts = [(f"prompt {i + 1}", p) for i, p in enumerate(args.prompt)]
    if args.file:
        file = Path(args.file).expanduser()
        if not file.is_file():
            raise TinyQwenError(f"--file {file}: no such file")
        try:  # utf-8-sig: a byte-order mark (as some Windows editors write) is not part of the first prompt
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            line = file.read_bytes()[: e.start].count(b"\n") + 1
            raise TinyQwenError(
                f"--file {file}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}, line {line}); "
                "save it as UTF-8"
            ) from None
        prompts += [
            (f"{file.name} line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    if not prompts:
        raise TinyQwenError("no prompt: give one as an argument or --file with one prompt per line")
    return prompts


DEFAULT_BATCH_SIZE = 8
"""Prompts of a `--file` generated together. Batching makes each decode step a matrix product over the rows, so
8 rows cost far less than 8 single runs; past that the gain flattens on a CPU while memory keeps growing: the KV
cache holds batch x (prompt + max_new_tokens) positions, 224 KiB each for Qwen3-0.6B in float32, so 8 rows of a
2,048-token reply take about 3.5 GiB beside 2.4 GiB of weights. Each batch's replies are written as soon as it
finishes, so a long file shows progress and a failure late in it loses nothing already written."""


def cmd_generate(args) -> int:
    from tinyqwen.generation import generate_batch, stream_generate

    batch_size = require_positive("--batch-size", args.batch_size)
    prompts = read_prompts(args)
    model, tokenizer = load(args)
    eos = eos_ids(model)
    enable_thinking = not args.no_think
    context = model.config.max_position_embeddings
    rows = []  # (where, prompt, ids, thinking mode)
    for where, p in prompts:
        messages = [{"role": "user", "content": p}]
        # templated: the prompt is user content, so control tokens it spells stay plain text (as in chat);
        # --raw feeds the text as written, added tokens included (a base model's prompt may use them on purpose)
        ids = (
            tokenizer.encode(p)
            if args.raw
            else tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, enable_thinking=enable_thinking, return_dict=False
            )
        )
        if len(ids) >= context:  # checked for all prompts before any is generated
            raise TinyQwenError(
                f"{where}: prompt has {len(ids)} tokens but the model's context is {context} tokens "
                "(max_position_embeddings): shorten the prompt"
            )
        rows.append((where, p, ids, thinking_mode(messages, enable_thinking) and not args.raw))
    style = Style.for_stream(sys.stdout, args.no_color)
    if len(rows) == 1 and not args.json:
        params = sampling_params(args, model.generation_config, rows[0][3])
        printer = ReplyPrinter(tokenizer, style, sys.stdout, eos)
        kwargs = generation_kwargs(args, params)
        for token in stream_generate(model, rows[0][2], args.max_new_tokens, eos_token_ids=eos, **kwargs):
            printer.push(token)
        printer.close()
        return 0
    done = 0
    for batch in batches(rows, batch_size):
        # one batch shares one set of sampling values, so a batch holds prompts of one mode only
        params = sampling_params(args, model.generation_config, batch[0][3])
        kwargs = generation_kwargs(args, params)
        outputs = generate_batch(
            model, [r[2] for r in batch], args.max_new_tokens, eos_token_ids=eos, **kwargs
        )
        for (_, prompt, _, _), out in zip(batch, outputs, strict=True):
            done += 1
            thinking, answer = answer_text(tokenizer, out, eos)
            if args.json:
                record = {"prompt": prompt, "thinking": thinking, "answer": answer, "ids": out}
                print(json.dumps(record, ensure_ascii=False))
                continue
            print(style.dim(f"--- [{done}/{len(rows)}] {prompt}"))
            if thinking:
                print(style.dim(f"[thinking]{thinking}[/thinking]"))
            print(answer)
        sys.stdout.flush()  # this batch is on disk (or the pipe) before the next one starts
    return 0


def batches(rows: list[tuple], size: int) -> list[list[tuple]]:
    """Consecutive runs of at most `size` rows with the same thinking mode (the last field), in order.

    >>> [len(b) for b in batches([("a", True)] * 5 + [("b", False)] * 2, 2)]
    [2, 2, 1, 2]
    """
    out: list[list[tuple]] = []
    for row in rows:
        if out and len(out[-1]) < size and out[-1][-1][-1] == row[-1]:
            out[-1].append(row)
        else:
            out.append([row])
    return out


def cmd_info(args) -> int:
    from tinyqwen.config import count_parameters, load_config, load_generation_config

    path = resolve_model(args.model)
    c = load_config(path)
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
    gen = load_generation_config(path)
    if gen:
        keys = ("temperature", "top_k", "top_p", "eos_token_id")
        lines.append("generation   " + ", ".join(f"{k} {gen[k]}" for k in keys if k in gen))
    if args.context is not None:
        lines += ["", *memory_table(c, require_positive("--context", args.context), args.batch, args.backend)]
    print("\n".join(lines))
    return 0


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


def cmd_verify(args) -> int:
    from tinyqwen.verify import report, transformers_available, verify, verify_stored

    live = transformers_available()
    if not live and (args.tokens is not None or args.seed is not None):
        raise TinyQwenError(
            "--tokens and --seed choose the random ids of a live comparison with transformers, which is not "
            'installed here (pip install "tinyqwen[crosscheck]"); without them verify uses the stored reference'
        )
    tokens = 16 if args.tokens is None else require_positive("--tokens", args.tokens)
    model, _ = load(args, need_tokenizer=False)
    results = []
    stored = Path(model.path) / "reference.npz"
    if stored.is_file():  # a committed fixture: transformers' outputs recorded when it was made
        results.append(verify_stored(model, stored))
    if live or not results:  # live comparison (says what to install when it cannot run)
        if tokens > model.config.max_position_embeddings:
            raise TinyQwenError(
                f"--tokens {tokens} is longer than the model's context ({model.config.max_position_embeddings})"
            )
        rng = np.random.default_rng(args.seed if args.seed is not None else 0)
        ids = rng.integers(0, min(model.config.vocab_size, 151643), (2, tokens))
        results.append(verify(model, ids))
    print(report(model, str(args.model), results, rtol=args.rtol, atol=args.atol))
    return 0 if all(r.ok(args.rtol, args.atol) for r in results) else 1


def cmd_serve(args) -> int:
    """`tinyqwen serve`: the OpenAI-compatible endpoint of tinyqwen/serve/, until Ctrl-C."""
    from tinyqwen.serve import require_serve_extra, serve

    require_serve_extra()
    if not 0 <= args.port <= 65535:
        raise TinyQwenError(f"--port must be in 0..65535, got {args.port}")
    model, tokenizer = load(args)
    name = args.served_model_name or str(args.model)
    print(f"tinyqwen serve: {name} ({args.backend}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    serve(model, tokenizer, name, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def require_positive(flag: str, value: int) -> int:
    """`value`, or a one-line error naming the flag when it is not a whole number > 0."""
    if value <= 0:
        raise TinyQwenError(f"{flag} must be a whole number > 0, got {value}")
    return value


def cmd_bench(args) -> int:
    from tinyqwen.bench import ENGINE_KINDS, format_report, run_benchmark

    for flag in ("--prompt-tokens", "--new-tokens", "--repeat", "--threads"):
        require_positive(flag, getattr(args, flag[2:].replace("-", "_")))
    kinds = [k.strip() for k in args.engines.split(",") if k.strip()] if args.engines else list(ENGINE_KINDS)
    if not args.peer:
        kinds = [k for k in kinds if k in ("numpy", "numba", "cupy")]
    if args.backend:
        # one of tinyqwen's backends alone: it must be able to run here, or we say why in one line
        from tinyqwen.backends import get_backend

        get_backend(args.backend)
        kinds = [args.backend]
    report = run_benchmark(
        args.model,
        kinds,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeat=args.repeat,
        threads=args.threads,
        peer_python=args.peer_python,
        ggufs=[Path(g).expanduser() for g in args.gguf] or None,
        gemv_shape=None if args.no_gemv or args.backend == "cupy" else (151_936, 1_024),
        progress=None if args.json else lambda line: print(line, file=sys.stderr, flush=True),
    )
    report["command"] = "tinyqwen " + " ".join(sys.argv[1:])  # what reproduces this run
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0


def cmd_train(args) -> int:
    from tinyqwen.train import TrainConfig, train

    cfg = TrainConfig.from_file(args.config)
    if args.out is not None:
        cfg.out_dir = args.out
    if args.steps is not None:
        cfg.steps = require_positive("--steps", args.steps)
    if args.no_progress:
        cfg.progress = False
    summary = train(cfg, resume=args.resume)
    print(
        f"trained {summary['steps']} steps, {summary['tokens_seen']:,} tokens in {summary['wall_s']:.0f} s: "
        f"validation loss {summary['val_loss']:.3f} (unigram baseline {summary['unigram_val_loss']:.3f}); "
        f"checkpoint {summary['checkpoint']}, log {Path(cfg.out_dir) / 'log.jsonl'}"
    )
    return 0


# ------------------------------------------------------------------------------------------ parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, except where there is none to show (no value, or an on/off switch)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from tinyqwen import __version__
    from tinyqwen.verify import RTOL

    parser = argparse.ArgumentParser(
        prog="tinyqwen", description="Qwen3 (dense and MoE) in NumPy.", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"tinyqwen {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{chat,generate,verify,info,bench,serve,train}"
    )

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model",
        "-m",
        required=True,
        help="checkpoint directory, or a Hugging Face id (cached, or downloaded with tinyqwen[hub])",
    )
    model.add_argument("--backend", default="numpy", help="compute backend")
    model.add_argument(
        "--matmul-precision",
        choices=("highest", "medium"),
        default="highest",
        help="highest: float32 products; medium (numba): bf16-rounded inputs, a faster prefill on bf16-capable CPUs",
    )

    gen = argparse.ArgumentParser(add_help=False)
    gen.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    gen.add_argument("--no-think", action="store_true", help="disable thinking (enable_thinking=False)")
    gen.add_argument("--thinking-budget", type=int, metavar="N",
                     help="stop thinking after N tokens and make the model answer")  # fmt: skip
    gen.add_argument("--early-stop-text", help="text fed in when the thinking budget runs out")
    gen.add_argument("--max-new-tokens", type=int, default=2048, help="most tokens to generate per reply")
    preset = "(default: Qwen's preset for the mode)"
    gen.add_argument("--temperature", type=float, help=f"0 = greedy {preset}")
    gen.add_argument("--top-k", type=int, help=f"sample from the k most likely tokens {preset}")
    gen.add_argument(
        "--top-p", type=float, help=f"sample from the smallest set with this probability {preset}"
    )
    gen.add_argument("--min-p", type=float, help=f"drop tokens below min-p x the top probability {preset}")
    gen.add_argument("--presence-penalty", type=float, help=f"penalise tokens already generated {preset}")
    gen.add_argument("--repetition-penalty", type=float, help=f"divide repeated tokens' logits {preset}")
    gen.add_argument("--seed", type=int, help="make sampling reproducible")
    gen.add_argument("--no-color", action="store_true", help="plain text (also with NO_COLOR set)")
    gen.add_argument(
        "--kv-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="KV cache storage: bfloat16/float16 halve its memory (float32: exact)",
    )

    chat = command("chat", parents=[model, gen], help="multi-turn chat in the terminal")
    chat.add_argument("--system", help="a system message")
    chat.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="token budget of the conversation (default: the model's context); the oldest exchanges are "
        "dropped, with a notice, when a new message would not leave room for a reply",
    )
    chat.add_argument(
        "--show-prompt", action="store_true", help="print the rendered prompt before each reply"
    )
    chat.set_defaults(func=cmd_chat)

    generate = command("generate", parents=[model, gen], help="reply to one prompt, or a file of prompts")
    generate.add_argument("prompt", nargs="*", help="prompt text(s)")
    generate.add_argument("--file", "-f", help="a UTF-8 text file with one prompt per line")
    generate.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="prompts generated together; each batch's replies are written as soon as it finishes. Memory "
        "grows with it: the KV cache holds batch x (prompt + max-new-tokens) positions",
    )
    generate.add_argument(
        "--raw", action="store_true", help="feed the prompt as is, without the chat template"
    )
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt")
    generate.set_defaults(func=cmd_generate)

    verify = command("verify", parents=[model], help="compare logits with Hugging Face transformers")
    verify.add_argument(
        "--tokens",
        type=int,
        help="length of the 2 random sequences of a live comparison (default: 16; needs transformers)",
    )
    verify.add_argument("--seed", type=int, help="seed of those random ids (default: 0; needs transformers)")
    verify.add_argument(
        "--rtol",
        type=float,
        default=RTOL,
        help="equal means |logit difference| <= rtol x max(1, largest |logit|) (see tinyqwen/verify.py)",
    )
    verify.add_argument(
        "--atol", type=float, help="an absolute bound on |logit difference| instead of --rtol"
    )
    verify.set_defaults(func=cmd_verify)

    info = command("info", help="config summary, parameter count, memory needed")
    info.add_argument("--model", "-m", required=True, help="checkpoint directory or Hugging Face id")
    info.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="also print the memory to prefill N tokens: weights, KV cache (per cache dtype), activations",
    )
    info.add_argument("--batch", type=int, default=1, help="sequences in the batch (with --context)")
    info.add_argument("--backend", default="numpy", help="whose weight storage to count (with --context)")
    info.set_defaults(func=cmd_info)

    bench = command(
        "bench",
        help="prefill / decode speed, TTFT, peak memory: tinyqwen's backends and the peers, each in its own process",
    )
    bench.add_argument("--model", "-m", required=True, help="checkpoint directory, or a Hugging Face id")
    bench.add_argument("--prompt-tokens", type=int, default=512, help="length of the random prompt")
    bench.add_argument("--new-tokens", type=int, default=128, help="tokens decoded after it")
    bench.add_argument("--repeat", type=int, default=2, help="timed runs per engine (the best is kept)")
    bench.add_argument("--threads", type=int, default=2, help="threads for every engine")
    bench.add_argument(
        "--engines",
        help="comma-separated subset of numpy,numba,transformers,llama.cpp (default: all; missing ones are skipped)",
    )
    bench.add_argument(
        "--peer-python",
        default=os.environ.get("TINYQWEN_PEER_PYTHON"),
        help="Python with torch/transformers/llama_cpp for the peers (default: $TINYQWEN_PEER_PYTHON, else this one)",
    )
    bench.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="FILE",
        help="GGUF file for llama.cpp, repeatable (default: <model>/*.gguf and <model>-*.gguf beside it)",
    )
    bench.add_argument(
        "--backend",
        choices=("numpy", "numba", "cupy"),
        help="only this tinyqwen backend (cupy: on an NVIDIA GPU; reports the achieved HBM bandwidth)",
    )
    bench.add_argument("--json", action="store_true", help="print the whole run as one JSON object")
    bench.add_argument("--no-gemv", action="store_true", help="skip the GEMV bandwidth probe")
    bench.add_argument(
        "--no-peer",
        dest="peer",
        action="store_false",
        help="only tinyqwen's backends (no transformers, no llama.cpp)",
    )
    bench.set_defaults(func=cmd_bench)

    served = command(
        "serve", parents=[model], help="an OpenAI-compatible HTTP endpoint (needs tinyqwen[serve])"
    )
    served.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    served.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    served.add_argument("--port", type=int, default=8000, help="TCP port")
    served.add_argument(
        "--served-model-name", help="the model's name in the API (default: --model as given, as vLLM does)"
    )
    served.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")  # fmt: skip
    served.set_defaults(func=cmd_serve)

    train = command(
        "train", help="train a (tiny) Qwen3 / Qwen3-MoE in NumPy on the built-in synthetic corpus"
    )
    train.add_argument(
        "--config", "-c", required=True, help="training config, JSON or TOML (see tinyqwen/train.py)"
    )
    train.add_argument("--resume", metavar="DIR", help="continue from a checkpoint folder this trainer saved")
    train.add_argument("--out", help="output folder (default: the config's out_dir)")
    train.add_argument("--steps", type=int, help="total steps (default: the config's)")
    train.add_argument(
        "--no-progress", action="store_true", help="no progress bar (the log is still written)"
    )
    train.set_defaults(func=cmd_train)
    return parser


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TinyQwenError as error:
        print(f"tinyqwen: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinyqwen generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
