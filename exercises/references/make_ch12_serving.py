"""Reference values for chapter 12 (serving), made by the official implementations.

    python exercises/references/make_ch12_serving.py   # from the repository root, with .[crosscheck] installed

Needs transformers (and jinja2); never imports tinyqwen. Writes `exercises/references/ch12_serving.json`:

- `split`: replies a Qwen3 model writes, tokenized by the official tokenizer (transformers' Qwen2Tokenizer on
  tinyqwen/data, the pinned official files), with each token decoded on its own (`pieces`, what a server streams)
  and the expected reasoning / answer. The rule is the one a *streaming* server must use (vLLM's qwen3 reasoning
  parser): the reasoning is what the model writes between `<think>` and the FIRST `</think>`, the answer what
  follows it, each decoded with `skip_special_tokens=True` and stripped of newlines at both ends (the Qwen3 model
  card's `.strip("\\n")`). A reply cut off inside its think block is all reasoning. The model card's own rule
  (split at the LAST `</think>`) is stored beside it as `model_card` for the cases where the two differ.
- `tools`: replies that call tools. The text after the think block is an assistant turn with `tool_calls` rendered
  by the OFFICIAL Jinja chat template (as an earlier turn, so without a think block): exactly what the model was
  trained to write. Parsing must give back the content and the calls that went in.
- `follow_up`: a tool-call round trip in OpenAI's message format (the assistant's `tool_calls` with JSON-string
  arguments, the result as a `role: "tool"` message), rendered by the official template with
  `add_generation_prompt=True`, and its ids from the official tokenizer: the prompt of the second request.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DATA = REPO / "tinyqwen" / "data"
OUT = HERE / "ch12_serving.json"
TEMPLATE_SHA256 = "d5d09f07b48c3086c508b30d1c9114bd1189145b74e982a265350c923acd8101"  # tokenizer_config.json
THINK, END_THINK = 151667, 151668

SPLIT_REPLIES = [
    ("thinking then answer", "<think>\nThe user wants 2 + 2. That is 4.\n</think>\n\n2 + 2 = 4.<|im_end|>"),
    ("thinking over several lines", "<think>\nFirst, add.\n\nThen check: 4.\n\n</think>\n\nIt is 4.\nSure.<|im_end|>"),
    ("empty thinking (/no_think)", "<think>\n\n</think>\n\nHello! How can I help?<|im_end|>"),
    ("no think block (enable_thinking=False)", "Four, as always.\n<|im_end|>"),
    ("the thinking mentions </think>", "<think>\nShould I write </think> now? Not yet.\n</think>\n\nDone.<|im_end|>"),
    ("cut off while thinking (max_tokens)", "<think>\nLet me count: 1, 2, 3"),
]  # fmt: skip

WEATHER_SCHEMA = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current temperature in a city, in degrees Celsius",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}
TIME = {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
TOOL_CASES = [
    ("one call, no text", "I need the weather tool.", {"role": "assistant", "content": "", "tool_calls": [WEATHER]}),
    ("text, then two calls", "Two tools.",
     {"role": "assistant", "content": "Let me check both.", "tool_calls": [WEATHER, TIME]}),
    ("no call at all", "", {"role": "assistant", "content": "It is sunny in Paris."}),
]  # fmt: skip
FOLLOW_UP = [
    {"role": "system", "content": "You are a weather bot."},
    ASK,
    {"role": "assistant", "content": "",
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"city": "Paris", "celsius": 21}'},
]  # fmt: skip


def expected_split(tok, ids: list[int]) -> tuple[str, str]:
    """The streaming rule (see the module docstring), from the official tokenizer's decode."""

    def text(part: list[int]) -> str:
        return tok.decode(part, skip_special_tokens=True).strip("\n")

    if THINK in ids:
        start = ids.index(THINK) + 1
        if END_THINK in ids[start:]:
            end = ids.index(END_THINK, start)
            return text(ids[start:end]), text(ids[end + 1 :])
        return text(ids[start:]), ""  # cut off while thinking: all of it is reasoning
    return "", text(ids)


def model_card_split(tok, ids: list[int]) -> tuple[str, str]:
    """The Qwen3 model card: index just after the LAST </think>; thinking = ids[:index], content = ids[index:]."""
    index = len(ids) - ids[::-1].index(END_THINK) if END_THINK in ids else 0
    thinking = tok.decode(ids[:index], skip_special_tokens=True).strip("\n")
    return thinking, tok.decode(ids[index:], skip_special_tokens=True).strip("\n")


def main() -> None:
    import transformers
    from transformers import AutoTokenizer

    sha = hashlib.sha256((DATA / "tokenizer_config.json").read_bytes()).hexdigest()
    if sha != TEMPLATE_SHA256:
        raise SystemExit(f"tinyqwen/data/tokenizer_config.json is not the pinned official file ({sha})")
    tok = AutoTokenizer.from_pretrained(DATA)

    def ids_of(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def case(name: str, reply: str) -> dict:
        ids = ids_of(reply)
        pieces = [tok.decode([i]) for i in ids]
        if "".join(pieces) != tok.decode(ids):
            raise SystemExit(f"{name}: a character is split over tokens; pick text whose tokens decode alone")
        reasoning, content = expected_split(tok, ids)
        out = {"name": name, "text": reply, "ids": ids, "pieces": pieces, "reasoning": reasoning,
               "content": content}  # fmt: skip
        card = model_card_split(tok, ids)
        if card != (reasoning, content):
            out["model_card"] = {"reasoning": card[0], "content": card[1]}
        return out

    out: dict = {"transformers_version": transformers.__version__, "template_sha256": sha, "split": [],
                 "tools": [], "weather_schema": WEATHER_SCHEMA}  # fmt: skip
    for name, reply in SPLIT_REPLIES:
        out["split"].append(case(name, reply))

    for name, reasoning, message in TOOL_CASES:
        # an earlier turn (a user message follows): the template writes it without a think block
        text = tok.apply_chat_template([ASK, message, {"role": "user", "content": "Thanks!"}], tokenize=False,
                                       tools=[WEATHER_SCHEMA])  # fmt: skip
        turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
        reply = f"<think>\n{reasoning}\n</think>\n\n{turn}<|im_end|>"
        entry = case(name, reply)
        entry["answer"] = message["content"]  # the content outside the <tool_call> blocks
        entry["calls"] = [
            {"name": c["name"], "arguments": c["arguments"]} for c in message.get("tool_calls", [])
        ]
        out["tools"].append(entry)

    prompt = tok.apply_chat_template(
        FOLLOW_UP, tools=[WEATHER_SCHEMA], tokenize=False, add_generation_prompt=True
    )
    out["follow_up"] = {
        "messages": FOLLOW_UP,
        "tools": [WEATHER_SCHEMA],
        "prompt": prompt,
        "ids": ids_of(prompt),
    }
    OUT.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(REPO)} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
