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

One module per concept:

    parser.py     every command's flags, defaults and help (build_parser)
    loading.py    the model and its tokenizer, checked against each other before the weights are read
    flags.py      the sampling flags on top of Qwen's preset; count flags that must be > 0
    display.py    replies streamed to the terminal (thinking dimmed), answer text, one-line errors
    chat.py       `tinyqwen chat`, the REPL (its context-window policy: tinyqwen/chat_context.py)
    generate.py   `tinyqwen generate`: prompts from arguments or a file, in batches
    info.py       `tinyqwen info`: config summary, parameter count, memory tables
    commands.py   `verify`, `serve`, `bench`, `train`: flag checks, then the module that does the work
"""

from __future__ import annotations

import sys

from tinyqwen.cli.display import one_line
from tinyqwen.cli.parser import build_parser
from tinyqwen.errors import TinyQwenError

__all__ = ["main"]


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
