"""Chapter 9 checkpoints: the chat template and thinking — and, last, your Qwen3 end to end.

Expected values come from the official implementations (exercises/references/ch09_chat_template_thinking.json, made
by make_ch09_chat_template_thinking.py): the official Jinja chat template rendered by transformers, ids from the
official tokenizer, the Qwen3 model card's recipe for splitting the thinking, tool-call turns rendered by the official
template, and transformers' greedy `generate` on a tiny real-vocabulary checkpoint.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from exercises.grading import (
    REPO,
    Mistake,
    call,
    expect,
    expect_equal,
    learner_model,
    notebook,
    reference_file,
    your,
)
from exercises.test_ch08_kv_cache_generation import Watched, check_loop

DATA = REPO / "tinyqwen" / "data"
EMPTY_THINK = "<think>\n\n</think>\n\n"
NOTHING = object()  # a Mistake whose symptom is absent: never equal to anything


# reread("...") -> 'notebooks/09-chat-template-thinking.ipynb, section "..."': where a failure sends the learner
reread = functools.partial(notebook, 9)
REF = reference_file("ch09_chat_template_thinking.json")


def symptom(cause: str, present: bool, got, hint: str = "") -> Mistake:
    """A classic mistake recognised by a symptom in the output rather than by a whole known-wrong output."""
    return Mistake(cause, got if present else NOTHING, hint)


# ------------------------------------------------------------------------------------------ the template


def render_mistakes(case: dict, got) -> list[Mistake]:
    want = case["text"]
    text = got if isinstance(got, str) else ""
    mistakes = [
        Mistake("the newline after '<|im_start|>assistant' is missing",
                want.replace("<|im_start|>assistant\n", "<|im_start|>assistant"),
                "Every turn header is '<|im_start|>{role}' followed by a newline — the generation prompt too."),
        Mistake("the newline after '<|im_end|>' is missing", want.replace("<|im_end|>\n", "<|im_end|>"),
                "Each turn ends with '<|im_end|>' and a newline."),
        Mistake("the role names were not written ('<|im_start|>\\n...')",
                want.replace("<|im_start|>system\n", "<|im_start|>\n").replace("<|im_start|>user\n", "<|im_start|>\n")),
    ]  # fmt: skip
    if case["add_generation_prompt"]:
        if case["enable_thinking"]:
            mistakes.append(Mistake("an empty think block was added although enable_thinking is True", want + EMPTY_THINK,
                                    "Only enable_thinking=False pre-fills the empty block; with thinking on, the "
                                    "model writes its own <think>."))  # fmt: skip
        else:
            mistakes.append(Mistake("the empty think block is missing although enable_thinking is False",
                                    want.removesuffix(EMPTY_THINK),
                                    f"With enable_thinking=False the prompt ends with {EMPTY_THINK!r}."))  # fmt: skip
    else:
        mistakes.append(Mistake("a generation prompt was added although add_generation_prompt is False",
                                want + "<|im_start|>assistant\n"))  # fmt: skip
    markers = REF["markers"]
    if markers["old_reasoning"] in json.dumps(case["messages"]):
        mistakes.append(symptom("an earlier assistant turn kept its reasoning", markers["old_reasoning"] in text, got,
                                "Only assistant turns after the last user message keep their <think> block."))  # fmt: skip
    if markers["new_reasoning"] in json.dumps(case["messages"]):
        mistakes.append(symptom("the last turn's reasoning was dropped too", markers["new_reasoning"] not in text, got,
                                "An assistant turn after the last user message keeps its reasoning."))  # fmt: skip
    if "<think>" in want and want.count("<think>") < text.count("<think>"):
        mistakes.append(symptom("the <think> text was left inside an earlier turn's content", True, got,
                                "Cut the content at the last '</think>' and drop what comes before."))  # fmt: skip
    return mistakes


def check_renders(course, names: tuple[str, ...], what: str, section: str) -> None:
    cases = [c for c in REF["render"] if c["name"] in names]
    assert cases, names
    for case in cases:
        flags = f"add_generation_prompt={case['add_generation_prompt']}, enable_thinking={case['enable_thinking']}"
        got = call(course.ch09.render_chat, json.loads(json.dumps(case["messages"])), case["add_generation_prompt"],
                  case["enable_thinking"], what="render_chat", reread=section)  # fmt: skip
        expect(isinstance(got, str), what=what, reread=section,
               problem=f"render_chat must return a string, got {type(got).__name__}")  # fmt: skip
        expect_equal(got, case["text"], what=f"{what} ({case['name']}) vs the official Jinja template",
                     inputs=f"messages {json.dumps(case['messages'], ensure_ascii=False)}, {flags}",
                     reread=section, mistakes=render_mistakes(case, got))  # fmt: skip


def test_one_turn(course):
    """One user turn in ChatML"""
    check_renders(course, ("one user message", "unicode and a soft switch"), "render_chat: one user message",
                  reread("The template as code"))  # fmt: skip


def test_enable_thinking(course):
    """enable_thinking=False pre-fills an empty think block"""
    check_renders(
        course, ("a system prompt",), "render_chat with and without thinking", reread("The empty think block")
    )


def test_history(course):
    """System prompts and a multi-turn history"""
    check_renders(course, ("a finished exchange", "a system message later in the chat"),
                  "render_chat on a conversation", reread("The template as code"))  # fmt: skip


def test_reasoning_history(course):
    """Earlier turns lose their reasoning"""
    check_renders(course, ("history with reasoning in the content",
                           "history with reasoning_content, then a reasoned last turn"),
                  "render_chat with reasoning in the history", reread("Earlier turns lose their reasoning"))  # fmt: skip


# ------------------------------------------------------------------------------------------ reading the reply


def test_split_thinking(course):
    """Splitting the thinking from the answer"""
    section = reread("Parsing the thinking out")
    for case in REF["split"]:
        ids = case["ids"]
        got = call(course.ch09.split_thinking, list(ids), what="split_thinking", reread=section)
        expect(isinstance(got, tuple) and len(got) == 2, what="split_thinking", reread=section,
               problem=f"split_thinking must return (thinking ids, content ids), got {type(got).__name__}")  # fmt: skip
        got = [list(map(int, part)) for part in got]
        want = [case["thinking_ids"], case["content_ids"]]
        mistakes = []
        if 151668 in ids:
            first = ids.index(151668) + 1
            last = len(case["thinking_ids"])
            mistakes += [
                Mistake("the split is at the FIRST </think>", [ids[:first], ids[first:]],
                        "Split after the LAST 151668: the thinking may contain the tag too."),
                Mistake("the </think> went to the content", [ids[: last - 1], ids[last - 1 :]],
                        "The index is just AFTER the last </think>: len(ids) - ids[::-1].index(151668)."),
            ]  # fmt: skip
        else:
            mistakes.append(Mistake("without </think> everything was taken as thinking", [ids, []],
                                    "No </think> means no finished thinking: index 0, all ids are content."))  # fmt: skip
        expect_equal(got, want, what=f"split_thinking ({case['name']}) vs the Qwen3 model card's recipe",
                     inputs=f"ids of {case['text']!r}", reread=section, mistakes=mistakes)  # fmt: skip


def test_parse_tool_calls(course):
    """Tool calls parsed out of a reply"""
    section = reread("Tool calls")
    for case in REF["tools"]:
        got = call(course.ch09.parse_tool_calls, case["text"], what="parse_tool_calls", reread=section)
        expect(isinstance(got, tuple) and len(got) == 2, what="parse_tool_calls", reread=section,
               problem=f"parse_tool_calls must return (content, calls), got {type(got).__name__}")  # fmt: skip
        content, calls = got
        calls = [dict(c) if isinstance(c, dict) else c for c in calls] if isinstance(calls, list) else calls
        want = [case["content"], case["calls"]]
        got_list = [content, calls]
        mistakes = [
            symptom("the <tool_call> blocks were left in the content", isinstance(content, str) and "<tool_call>" in content,
                    got_list, "The content is the text OUTSIDE the blocks."),
            symptom("only the first call was parsed", isinstance(calls, list) and len(case["calls"]) > 1 and len(calls) == 1,
                    got_list, "A reply may hold several <tool_call> blocks: find them all, in order."),
            symptom("'arguments' was left as a JSON string", isinstance(calls, list) and any(
                isinstance(c, dict) and isinstance(c.get("arguments"), str) for c in calls), got_list,
                "json.loads a string 'arguments' into a dict."),
            symptom("the content was not stripped of its newlines", isinstance(content, str)
                    and content != case["content"] and content.strip("\n") == case["content"], got_list,
                    "Strip newlines at both ends of the remaining content."),
        ]  # fmt: skip
        expect_equal(got_list, want, what=f"parse_tool_calls ({case['name']}): [content, calls]",
                     inputs=f"a reply rendered by the official template: {case['text']!r}",
                     reread=section, mistakes=mistakes)  # fmt: skip


# ------------------------------------------------------------------------------------------ end to end


@functools.cache
def tokenizer_files() -> tuple[dict[str, int], dict[tuple[str, str], int], dict[str, int], dict[int, str]]:
    """(vocab, ranks, added, id_to_token) from the official files, as chapter 1's exercises receive them."""
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    ranks: dict[tuple[str, str], int] = {}
    for line in (
        (DATA / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ):  # line 0 is "#version: ..."
        if line:
            left, right = line.split(" ")
            ranks[left, right] = len(ranks)
    config = json.loads((DATA / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
    id_to_token = {i: token for token, i in vocab.items()} | {i: token for token, i in added.items()}
    return vocab, ranks, added, id_to_token


@functools.cache
def tiny_chat_dir(seed: int) -> Path:
    """The tiny real-vocabulary Qwen3 of the reference, written once per session (~20 MB, in a temporary folder)."""
    from tinyqwen.testing import END_TO_END_SCALE, write_tiny_qwen3

    folder = Path(tempfile.mkdtemp(prefix="tinyqwen-ch09-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return write_tiny_qwen3(folder, seed=seed, scale=END_TO_END_SCALE, with_tokenizer=False)


def test_your_qwen3_end_to_end(course):
    """Your Qwen3 end to end"""
    e = REF["end_to_end"]
    vocab, ranks, added, id_to_token = tokenizer_files()
    section = reread("Your Qwen3 end to end")
    where = f"{len(e['messages'])} messages, add_generation_prompt=True, enable_thinking=False"

    # your code of every chapter, the template and tokenizer included, recorded as it runs (the score table says)
    model = learner_model(course, upto=9, fixture=str(tiny_chat_dir(e["seed"])))
    text = call(your(model, "render_chat"), json.loads(json.dumps(e["messages"])), True, False, what="render_chat",
               reread=section)  # fmt: skip
    case = {
        "text": e["prompt_text"],
        "messages": e["messages"],
        "add_generation_prompt": True,
        "enable_thinking": False,
    }
    expect_equal(text, e["prompt_text"], what="1/5 your chat template (chapter 9) on the conversation",
                 inputs=where, reread=reread("The template as code"), mistakes=render_mistakes(case, text))  # fmt: skip

    ids = call(your(model, "encode"), text, vocab, ranks, added, what="chapter 1's encode", reread=section)
    expect_equal(ids, e["prompt_ids"], what="2/5 your tokenizer (chapter 1) on the prompt vs the official tokenizer",
                 inputs=repr(text), reread=notebook(1))  # fmt: skip

    watched = Watched(model, course.ch08.kv_cache_update)
    n = e["max_new_tokens"]
    what = "3/5 your loader and kernels (chapters 2-7), cache and greedy loop (chapter 8) vs transformers' generate"
    new = call(your(model, "greedy_generate"), watched, [list(ids)], n, kwargs={"pad_id": 151643, "eos_id": e["eos_id"]},
               what=what,
              reread=section)  # fmt: skip
    inputs = f"a tiny Qwen3 with the real 151,936-token vocabulary, {len(ids)} prompt tokens, {n} new tokens"
    check_loop(watched, [ids], n, what, inputs)
    expect(isinstance(new, list) and len(new) == 1, what=what, inputs=inputs, reread=notebook(8),
           problem=f"greedy_generate must return one list of ids per prompt, got {new!r}")  # fmt: skip
    expect_equal(list(map(int, new[0])), e["new_ids"], what=what, inputs=inputs, reread=notebook(8))

    parts = call(your(model, "split_thinking"), list(e["new_ids"]), what="split_thinking", reread=section)
    expect_equal([list(map(int, p)) for p in parts], [[], e["new_ids"]],
                 what="4/5 split_thinking on the reply (thinking was off: no </think>, all content)",
                 inputs=str(e["new_ids"]), reread=reread("Parsing the thinking out"))  # fmt: skip

    reply = call(
        your(model, "decode"), list(parts[1]), id_to_token, what="chapter 1's decode", reread=section
    )
    expect_equal(reply, e["text"], what="5/5 your decode (chapter 1) of the reply vs the official tokenizer",
                 inputs=str(e["new_ids"]), reread=notebook(1))  # fmt: skip
