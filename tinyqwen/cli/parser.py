"""The argument parser of `tinyqwen`: every command, its flags, their defaults and help."""

from __future__ import annotations

import argparse
import os

from tinyqwen.cli.chat import cmd_chat
from tinyqwen.cli.commands import cmd_bench, cmd_serve, cmd_train, cmd_verify
from tinyqwen.cli.generate import DEFAULT_BATCH_SIZE, cmd_generate
from tinyqwen.cli.info import cmd_info, cmd_quantize
from tinyqwen.cli.your_code import KERNELS


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
        dest="command", required=True, metavar="{chat,generate,verify,info,bench,serve,train,quantize}"
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
        help="highest: float32 products; medium (numba): bf16-rounded inputs, faster prefill and batches on bf16 CPUs",
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
    chat.add_argument(
        "--kernels",
        choices=KERNELS,
        default="tinyqwen",
        help="exercises: YOUR functions of the course's exercises/ run inside the model (stubs fall back to "
        "tinyqwen's; stderr says which are yours); solutions: the course's solutions",
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
    generate.add_argument(
        "--kernels",
        choices=KERNELS,
        default="tinyqwen",
        help="exercises: YOUR functions of the course's exercises/ run inside the model (stubs fall back to "
        "tinyqwen's; stderr says which are yours); solutions: the course's solutions",
    )
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
    info.add_argument(
        "--layers",
        type=int,
        metavar="N",
        help="a .gguf file: predict the numba backend's peak RSS for the same model with N layers (a file cut to a "
        "few layers predicting the full model: weights per layer from its tensor table x N, the embedding rows a "
        "prompt reads, the KV cache of --context tokens (default 4096) in bf16, the runtime measured)",
    )
    info.add_argument(
        "--as-config",
        metavar="CONFIG",
        help="as --layers, taking N from a config.json or a published model's name (e.g. Qwen3-30B-A3B)",
    )
    info.set_defaults(func=cmd_info)

    quant = command(
        "quantize",
        help="write a checkpoint as a llama.cpp GGUF file: q8_0, q4_k_m (llama.cpp's mix), bf16 or f32",
    )
    quant.add_argument("model", help="checkpoint directory, .gguf file, or Hugging Face id")
    quant.add_argument("--to", required=True, choices=["q8_0", "q4_k_m", "bf16", "f32"], help="target type")
    quant.add_argument("out", help="the .gguf file to write")
    quant.set_defaults(func=cmd_quantize)

    bench = command(
        "bench",
        help="prefill / decode speed, TTFT, peak memory: tinyqwen's backends and the peers, each in its own process",
    )
    bench.add_argument(
        "--model", "-m", required=True, help="checkpoint directory, .gguf file, or a Hugging Face id"
    )
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
    served.add_argument("--max-batch", type=int, default=None,
                        help="most sequences decoded together in one step (default 16); more requests wait")  # fmt: skip
    served.add_argument("--kv-budget", default=None,
                        help="KV cache memory for the running sequences, e.g. 4GiB or 512MiB (default: every row "
                             "the whole context, at most a quarter of the free memory)")  # fmt: skip
    served.add_argument("--prefill-chunk", type=int, default=None,
                        help="prompt tokens prefilled per step between decode steps (default 256)")  # fmt: skip
    served.add_argument("--max-queue", type=int, default=None,
                        help="requests that may wait for a KV row before new ones get 429 (default 256)")  # fmt: skip
    served.add_argument("--kv-dtype", default="float32", choices=("float32", "bfloat16"),
                        help="KV pool storage: bfloat16 halves its memory (twice the positions in --kv-budget) "
                             "and what a decode step reads (float32: exact, as the library's default)")  # fmt: skip
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
