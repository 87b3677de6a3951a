"""`tinyqwen chat`: the multi-turn REPL in the terminal.

The context-window policy it follows (how much room a reply needs, which history is dropped first) is
tinyqwen/chat_context.py; how replies are printed is display.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tinyqwen.chat_context import fit_to_context, reply_room
from tinyqwen.cli.display import ReplyPrinter, Style, answer_text, one_line, undecodable
from tinyqwen.cli.flags import generation_kwargs, require_positive, sampling_params
from tinyqwen.cli.loading import eos_ids, load
from tinyqwen.cli.your_code import load_yours, report, stream
from tinyqwen.errors import TinyQwenError
from tinyqwen.thinking import thinking_mode

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
    message and the replies to it; the system message is always kept) are dropped from the history
    (`fit_to_context`, tinyqwen/chat_context.py), with a notice saying how many — the model then no longer sees
    them. A single message too long for the context even with no history is refused.
    """
    from tinyqwen.chat_template import apply_chat_template

    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    if args.system is not None and undecodable(args.system):
        raise TinyQwenError(f"--system: {undecodable(args.system)}")
    # --kernels exercises: the learner's own functions inside the model (tinyqwen/cli/your_code.py)
    model, tokenizer = load(args) if getattr(args, "kernels", "tinyqwen") == "tinyqwen" else load_yours(args)
    style = Style.for_stream(sys.stdout, args.no_color)
    eos = eos_ids(model)
    context = model.config.max_position_embeddings
    if args.context is not None:
        context = min(context, require_positive("--context", args.context))
    room = reply_room(args.max_new_tokens, context)
    enable_thinking = not args.no_think

    def render(turn: list[dict]) -> list[int]:
        return tokenizer.apply_chat_template(
            turn, add_generation_prompt=True, enable_thinking=enable_thinking, return_dict=False
        )

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
            report(model)  # --kernels: which of the learner's functions ran
            return 0
        except KeyboardInterrupt:  # Ctrl-C drops the half-typed line, as a shell does; the chat goes on
            print(style.dim("^C (Ctrl-D or /exit quits)"))
            continue
        command = text.strip()
        if not command:
            continue
        if command in CHAT_QUIT:
            report(model)
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
            messages, ids, dropped = fit_to_context(messages, user, render, context, room)
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
            for token in stream(model, ids, budget, eos, **kwargs):  # tinyqwen's loop, or --kernels' own
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
