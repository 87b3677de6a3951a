"""Reference values for chapter 9 (chat template and thinking), made by the official implementations.

    python exercises/references/make_ch09_chat_template_thinking.py   # from the repository root, with .[crosscheck] installed

Needs torch, transformers and jinja2; of tinyqwen it imports only `tinyqwen.testing` (the tiny checkpoint's
NumPy weights), never the code under test. Writes `exercises/references/ch09_chat_template_thinking.json`:

- `render`: conversations rendered by the OFFICIAL Jinja chat template (the `chat_template` of
  tinyqwen/data/tokenizer_config.json, pinned by sha256) through transformers' `apply_chat_template`, with every
  combination of `add_generation_prompt` / `enable_thinking` the case names; plus the ids of each render from the
  official tokenizer (transformers' Qwen2Tokenizer on the same files; cross-checked against the `tokenizers`
  library's tokenizer.json when ../shared/qwen3-tokenizer is there).
- `split`: replies tokenized by the official tokenizer and split by the Qwen3 model card's own recipe
  (`index = len(ids) - ids[::-1].index(151668)`, 0 when there is no `</think>`; thinking = ids[:index],
  content = ids[index:]; decoded with skip_special_tokens=True and stripped of newlines).
- `tools`: assistant turns with tool calls, rendered by the official template as an earlier turn (so without a
  think block); the text the model writes is the turn between `<|im_start|>assistant\\n` and `<|im_end|>`.
  Parsing it must give back the content and the calls that went in.
- `end_to_end`: a tiny random Qwen3 with the REAL vocabulary (151,936 rows; `tinyqwen.testing.tiny_qwen3_tensors`,
  pure NumPy, so the graded test builds the very same weights), loaded by transformers, greedy `generate` on a chat
  prompt: the prompt text and ids, the new ids, and their decoded text.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # this checkout's tinyqwen.testing, installed or not
from tinyqwen.testing import (  # noqa: E402
    END_TO_END_SCALE,
    QWEN3_GENERATION_CONFIG,
    tiny_qwen3_config,
    tiny_qwen3_tensors,
)

DATA = REPO / "tinyqwen" / "data"
SHARED_TOKENIZER = REPO.parent / "shared" / "qwen3-tokenizer" / "tokenizer.json"
OUT = HERE / "ch09_chat_template_thinking.json"
TEMPLATE_SHA256 = "d5d09f07b48c3086c508b30d1c9114bd1189145b74e982a265350c923acd8101"  # tokenizer_config.json
THINK_END = 151668
IM_END = 151645
SEED = 9  # the chapter number; the first seed from here whose greedy steps are not near-ties is used
NEW_TOKENS = 12

# ------------------------------------------------------------------------------------------ the conversations

ASK = {"role": "user", "content": "What is 2 + 2?"}
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
OLD_REASONING = "The user asks a sum. 2 plus 2 makes 4."
NEW_REASONING = "Doubling 4 gives 8."
RENDER_CASES = [
    # (name, messages, [(add_generation_prompt, enable_thinking), ...])
    ("one user message", [ASK], [(True, True), (True, False), (False, True)]),
    ("a system prompt", [SYSTEM, ASK], [(True, True), (True, False)]),
    ("unicode and a soft switch", [{"role": "user", "content": "Grüße 👋 — explain RoPE briefly /no_think"}],
     [(True, True)]),
    ("a finished exchange", [SYSTEM, ASK, {"role": "assistant", "content": "4"}], [(False, True)]),
    ("history with reasoning in the content",
     [ASK, {"role": "assistant", "content": f"<think>\n{OLD_REASONING}\n</think>\n\n4"},
      {"role": "user", "content": "And doubled?"}],
     [(True, True), (True, False)]),
    ("history with reasoning_content, then a reasoned last turn",
     [SYSTEM, ASK, {"role": "assistant", "content": "4", "reasoning_content": OLD_REASONING},
      {"role": "user", "content": "And doubled?"},
      {"role": "assistant", "content": "8", "reasoning_content": NEW_REASONING}],
     [(False, True)]),
    ("a system message later in the chat",
     [ASK, {"role": "assistant", "content": "4"}, {"role": "system", "content": "Answer in words."},
      {"role": "user", "content": "And 3 + 3?"}],
     [(True, True)]),
]  # fmt: skip

SPLIT_REPLIES = [
    ("thinking then answer", "<think>\nThe user wants 2 + 2. That is 4.\n</think>\n\n2 + 2 = 4.<|im_end|>"),
    ("empty thinking", "<think>\n\n</think>\n\nHello! How can I help?<|im_end|>"),
    ("no think block (thinking was off)", "Four.<|im_end|>"),
    ("two closing tags: the thinking mentions </think>",
     "<think>\nShould I write </think> now? Not yet.\n</think>\n\nDone.<|im_end|>"),
    ("unfinished thinking (cut off by max_new_tokens)", "<think>\nLet me count: 1, 2, 3"),
]  # fmt: skip

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TIME = {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}
TOOL_CASES = [
    ("text then one call", {"role": "assistant", "content": "Let me check.", "tool_calls": [WEATHER]}),
    ("two calls, no text", {"role": "assistant", "content": "", "tool_calls": [WEATHER, TIME]}),
    ("OpenAI style: wrapped in 'function', arguments as a JSON string",
     {"role": "assistant", "content": "",
      "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}]}),
    ("no call at all", {"role": "assistant", "content": "It is sunny in Paris."}),
]  # fmt: skip

END_TO_END_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give me a short introduction to large language models."},
]

# ------------------------------------------------------------------------------------------ the tiny checkpoint


def tiny_chat_checkpoint(seed: int) -> tuple[dict, dict[str, np.ndarray]]:
    """(config, tensors) of the tiny real-vocabulary Qwen3: deterministic NumPy, float32, official tensor names.
    The same weights the graded test and chapters 9 and 12 build with `tinyqwen.testing.write_tiny_qwen3`."""
    config = tiny_qwen3_config()
    return config, tiny_qwen3_tensors(config, seed, END_TO_END_SCALE)


# ------------------------------------------------------------------------------------------ the references


def think_split(ids: list[int]) -> int:
    """The Qwen3 model card's recipe: the index just after the last </think>, 0 when there is none."""
    try:
        return len(ids) - ids[::-1].index(THINK_END)
    except ValueError:
        return 0


def main() -> None:
    import torch
    import transformers
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = hashlib.sha256((DATA / "tokenizer_config.json").read_bytes()).hexdigest()
    if sha != TEMPLATE_SHA256:
        raise SystemExit(f"tinyqwen/data/tokenizer_config.json is not the pinned official file ({sha})")
    tok = AutoTokenizer.from_pretrained(DATA)
    official_ids = None
    if SHARED_TOKENIZER.is_file():
        import tokenizers

        official_ids = tokenizers.Tokenizer.from_file(str(SHARED_TOKENIZER))

    def ids_of(text: str) -> list[int]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if official_ids is not None and official_ids.encode(text, add_special_tokens=False).ids != ids:
            raise SystemExit(f"transformers and tokenizers disagree on {text!r}")
        return ids

    def render(messages, add_generation_prompt, enable_thinking) -> str:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                       enable_thinking=enable_thinking)  # fmt: skip

    out: dict = {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "template_sha256": sha,
        "markers": {"old_reasoning": OLD_REASONING, "new_reasoning": NEW_REASONING},
        "render": [],
        "split": [],
        "tools": [],
    }
    for name, messages, flags in RENDER_CASES:
        for gen, think in flags:
            text = render(messages, gen, think)
            out["render"].append({"name": name, "messages": messages, "add_generation_prompt": gen,
                                  "enable_thinking": think, "text": text, "ids": ids_of(text)})  # fmt: skip

    for name, reply in SPLIT_REPLIES:
        ids = ids_of(reply)
        index = think_split(ids)
        out["split"].append({
            "name": name, "text": reply, "ids": ids, "thinking_ids": ids[:index], "content_ids": ids[index:],
            "thinking": tok.decode(ids[:index], skip_special_tokens=True).strip("\n"),
            "content": tok.decode(ids[index:], skip_special_tokens=True).strip("\n"),
        })  # fmt: skip

    for name, message in TOOL_CASES:
        # an earlier turn (a user message follows), so the template writes it without a think block: exactly the
        # text a model writes after its thinking
        text = render([ASK, message, {"role": "user", "content": "Thanks!"}], False, True)
        turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        calls = []
        for call in message.get("tool_calls", []):
            call = call.get("function", call)
            args = call["arguments"]
            calls.append(
                {"name": call["name"], "arguments": json.loads(args) if isinstance(args, str) else args}
            )
        content = message["content"]
        out["tools"].append({"name": name, "text": turn, "content": content, "calls": calls})

    # end to end: the first seed whose greedy steps all have a clear winner (no near-ties that rounding could flip)
    prompt_text = render(END_TO_END_MESSAGES, True, False)
    prompt_ids = ids_of(prompt_text)
    seed = SEED
    while True:
        config, tensors = tiny_chat_checkpoint(seed)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "config.json").write_text(json.dumps(config, indent=2))
            (folder / "generation_config.json").write_text(json.dumps(QWEN3_GENERATION_CONFIG, indent=2))
            save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, attn_implementation="eager"
            )
            model.eval()
            with torch.no_grad():
                result = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                        dtype=torch.long), do_sample=False, max_new_tokens=NEW_TOKENS,
                                        eos_token_id=IM_END, pad_token_id=151643, output_scores=True,
                                        return_dict_in_generate=True)  # fmt: skip
        new_ids = result.sequences[0, len(prompt_ids) :].tolist()
        margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in result.scores]
        if min(margins) > 1e-3:
            break
        seed += 1
    out["end_to_end"] = {
        "seed": seed,
        "messages": END_TO_END_MESSAGES,
        "add_generation_prompt": True,
        "enable_thinking": False,
        "eos_id": IM_END,
        "max_new_tokens": NEW_TOKENS,
        "prompt_text": prompt_text,
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
        "text": tok.decode(new_ids, skip_special_tokens=False),
        "min_top2_margin": min(margins),
    }
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size:,} bytes); end-to-end seed {seed}, "
          f"min top-2 margin {min(margins):.3g}, new ids {new_ids}")  # fmt: skip


if __name__ == "__main__":
    main()
