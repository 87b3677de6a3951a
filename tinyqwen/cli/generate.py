"""`tinyqwen generate`: replies to prompts given as arguments or one a line in a file, batched."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tinyqwen.cli.display import ReplyPrinter, Style, answer_text
from tinyqwen.cli.flags import generation_kwargs, require_positive, sampling_params
from tinyqwen.cli.loading import eos_ids, load
from tinyqwen.cli.your_code import load_yours, report, stream
from tinyqwen.errors import TinyQwenError
from tinyqwen.thinking import thinking_mode


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
    from tinyqwen.generation import generate_batch

    batch_size = require_positive("--batch-size", args.batch_size)
    prompts = read_prompts(args)
    # --kernels exercises: the learner's own functions inside the model (tinyqwen/cli/your_code.py)
    model, tokenizer = load(args) if getattr(args, "kernels", "tinyqwen") == "tinyqwen" else load_yours(args)
    eos = eos_ids(model)
    enable_thinking = not args.no_think
    context = model.config.max_position_embeddings
    raw = args.raw or not tokenizer.has_chat_template
    if raw and not args.raw:  # a base model's own tokenizer: its model has never seen the chat format
        missing = (
            "<|im_start|>/<|im_end|> tokens"
            if tokenizer.chat_template_in_files is not False
            else "chat template"
        )
        print(f"tinyqwen: note: the tokenizer has no {missing}, so prompts go in as written (as with --raw)",
              file=sys.stderr)  # fmt: skip
    rows = []  # (where, prompt, ids, thinking mode)
    for where, p in prompts:
        messages = [{"role": "user", "content": p}]
        # templated: the prompt is user content, so control tokens it spells stay plain text (as in chat);
        # --raw feeds the text as written, added tokens included (a base model's prompt may use them on purpose)
        ids = (
            tokenizer.encode(p)
            if raw
            else tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, enable_thinking=enable_thinking, return_dict=False
            )
        )
        if len(ids) >= context:  # checked for all prompts before any is generated
            raise TinyQwenError(
                f"{where}: prompt has {len(ids)} tokens but the model's context is {context} tokens "
                "(max_position_embeddings): shorten the prompt"
            )
        rows.append((where, p, ids, thinking_mode(messages, enable_thinking) and not raw))
    style = Style.for_stream(sys.stdout, args.no_color)
    if len(rows) == 1 and not args.json:
        params = sampling_params(args, model.generation_config, rows[0][3])
        printer = ReplyPrinter(tokenizer, style, sys.stdout, eos)
        kwargs = generation_kwargs(args, params)
        for token in stream(model, rows[0][2], args.max_new_tokens, eos, **kwargs):  # --kernels: maybe yours
            printer.push(token)
        printer.close()
        report(model)
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
    report(model)
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
