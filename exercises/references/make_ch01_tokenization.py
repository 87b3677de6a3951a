"""Regenerate the chapter 1 (tokenization) references with the OFFICIAL implementation.

    python exercises/references/make_ch01_tokenization.py     # from the repository root, with .[crosscheck] installed

Needs the official Hugging Face `tokenizers` library, and for the real-pipeline checkpoint `transformers`, `torch`,
`safetensors` and `jinja2` (the `crosscheck` extra). It reads the official Qwen3 `tokenizer.json` and
`tokenizer_config.json` from $TINYQWEN_SHARED/qwen3-tokenizer or ../shared/qwen3-tokenizer. Of tinyqwen it imports
only `tinyqwen.testing` (the tiny checkpoint's config.json), never the code under test: every expected value says
what the official code computes, not what we compute.

Writes, next to this file:
  ch01_tokenization.json   inputs and the official outputs for every checkpoint of exercises/test_ch01_tokenization.py
  ch01_tokenization.npz    transformers' logits for the real-pipeline checkpoint (a column subset, float32)

What each part of the JSON holds, and which official function made it:
  byte_table       byte -> stand-in character, from `tokenizers.pre_tokenizers.ByteLevel` on real UTF-8 text. Only
                   243 of the 256 byte values occur in valid UTF-8 (never C0, C1, F5..FF), so those 243 are official;
                   the test derives the other 13 by hand (GPT-2's rule, written out in the test).
  alphabet         `ByteLevel.alphabet()`: the official set of all 256 stand-ins.
  symbols          text -> its bytes as stand-ins (ByteLevel pre-tokenizer with use_regex=False).
  pretokenize      text -> pieces (the Split pre-tokenizer of tokenizer.json, alone).
  bpe              a piece in stand-ins -> its official tokens (`Tokenizer.encode(piece).tokens`; each piece is
                   checked to pre-tokenize to itself, so the tokens are BPE's output on exactly that piece).
  encode           text without added tokens -> ids; `ids_without_nfc` = the same with the NFC normalizer removed.
  added            text with added tokens -> ids; `ids_as_plain_text` = the official tokenizer with its added-token
                   list emptied, i.e. what you get if added tokens are not matched before the split regex.
  decode           ids -> `Tokenizer.decode(ids, skip_special_tokens=False)`.
  stream           ids -> the text that is complete after each id, plus what a final flush returns. The split is
                   defined by UTF-8 itself: the chunks are CPython's incremental UTF-8 decoder (errors="replace") fed
                   each token's bytes (official token strings through the official byte table). Their join is
                   checked to equal the official decode. (`tokenizers.decoders.DecodeStream` splits differently: it
                   holds back a whole token while its text ends in "�", so "hi 😁" streams as 'hi', None, ' 😁';
                   we ask for the eager split, 'hi', ' ', '😁', which shows each character as soon as it is whole.)
  real_pipeline    the official chat template (transformers `apply_chat_template`) rendered for two messages, the
                   official ids of that text, a tiny random Qwen3 with the REAL vocabulary (config + seed; the weights
                   come from `real_vocab_tensors` below, which the test re-runs with NumPy alone and checks by
                   sha256), transformers' greedy continuation (8 tokens) and the official decode of it. The logits
                   (`AutoModelForCausalLM`, float32, eager attention) are in the .npz, for the columns listed there.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import tempfile
import unicodedata
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # this checkout's tinyqwen.testing, installed or not
from tinyqwen.testing import tiny_qwen3_config  # noqa: E402

OUT_JSON = HERE / "ch01_tokenization.json"
OUT_NPZ = HERE / "ch01_tokenization.npz"

# ------------------------------------------------------------------------------------------ inputs

# Ordinary text: every alternative of the split regex, several scripts, digits, whitespace runs, emoji.
ENCODE_TEXTS = [
    "Hello world",
    "Hello,  world 2025!\n",
    "I'm sure you'll see they've DON'T it's WE'LL",
    "O'Donnell met O'Sullivan\n'Sorry', she said.",
    "    indented code\n\tdef f(x):\n        return x**2  # square\n\n\n",
    "Ça va? Größe, naïve café, Ελληνικά, русский язык",
    "中文分词测试：你好，世界！",
    "日本語のテキストとカタカナ",
    "한국어 텍스트",
    "emoji 😁👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "π ≈ 3.14159, 1,000,000 and ٣٤٥",
    "tabs\tand\r\nwindows newlines\r\n",
    "   leading and trailing spaces   ",
    "URL: https://example.com/path?q=1&x=y#frag",
    "",
    "<not-an-added-token> and <|im_start without its end",
    "antidisestablishmentarianism supercalifragilisticexpialidocious",
    "∑_{i=1}^{n} x_i² ≤ ∞ → ∀ε>0",
    "The year 1999 had 365 days; 12345678 is long.",
]

# Text whose NFC form differs from the text: decomposed accents, Hangul jamo, compatibility-free singletons.
NFC_TEXTS = [
    "cafe\u0301",
    unicodedata.normalize("NFD", "한국어 텍스트"),
    "\u212b ngstr\u00f6m",  # ANGSTROM SIGN -> Å (a canonical singleton)
    "nin\u0303o and pin\u0303a colada",
    unicodedata.normalize("NFD", "Ça va? Größe, naïve café"),
]

ADDED_TEXTS = [
    "<|im_start|>user\nHi!<|im_end|>",
    "<think>\nLet me think.\n</think>\n\nThe answer is 42.",
    "a<|endoftext|>b",
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    "<|im_start|><|im_start|>",
    "x<|im_end|>\n",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_start|>assistant\n<think>\n\n</think>\n\n",
]

PRETOKENIZE_TEXTS = [
    "Hello,  world 2025!\n",
    "I'm sure you'll see they've DON'T it's WE'LL",
    "O'Donnell met O'Sullivan\n'Sorry', she said.",
    "    indented code\n\tdef f(x):\n        return x**2  # square\n\n\n",
    "π ≈ 3.14159, 1,000,000 and ٣٤٥",
    "tabs\tand\r\nwindows newlines\r\n",
    "   leading and trailing spaces   ",
    "中文分词测试：你好，世界！",
    "emoji 😁👍🏽 family",
    "(word) [x] {y} 'quoted' \"double\"",
    "O'Donnell met O'Sullivan\n'Sorry', she said ('D and 'S are contractions to the regex, in any case)",
    "The year 1999 had 365 days; 12345678 is long.",
]

SYMBOL_TEXTS = ["A", " ", "\n", "Hello world", " ça", "中", "😁", "tab\there", "\x00\x7f", "é\u0301"]

BPE_WORDS = [
    " hello",
    "Hello",
    " tokenization",
    "strawberry",
    " Qwen",
    " indivisibility",
    " antidisestablishmentarianism",
    " supercalifragilisticexpialidocious",
    "你好世界",
    " naïve",
    " Größe",
    " русский",
    " Ελληνικά",
    " ####",
    "    ",
    " 😁",
    "hello",
    " unbelievably",
    " deoxyribonucleic",
    " Pneumonoultramicroscopicsilicovolcanoconiosis",
]

DECODE_EXTRA = [
    [26525],  # the first 3 bytes of an emoji alone
    [26525, 223, 26525, 223],  # two emoji, each split over two tokens
    [151644, 872, 198, 13048, 0, 151645],
    [223],  # a lone continuation byte
]

STREAM_TEXTS = ["hi 😁", "emoji 😁👍🏽 family 👨‍👩‍👧", "中文分词测试", "Größe naïve"]
STREAM_EXTRA = [[26525], [26525, 223, 151645], [223, 26525, 223]]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Translate « Ça va ? » into 日本語, then add 2+2=4 and an emoji 🙂."},
]

# The tiny real-vocabulary checkpoint: the key set of the official Qwen3-0.6B config.json, shrunk, but with the
# real 151,936-row vocabulary so that official token ids can go in and come out.
REAL_VOCAB_CONFIG = tiny_qwen3_config(  # tinyqwen.testing's tiny Qwen3, narrower and one layer deep
    hidden_size=16,
    intermediate_size=48,
    max_position_embeddings=40960,
    max_window_layers=1,
    num_attention_heads=2,
    num_hidden_layers=1,
    num_key_value_heads=1,
)
REAL_VOCAB_SEED = 20250429
N_TOKENS = 151669  # tokens the tokenizer knows; the 267 embedding rows above them are padding, as in Qwen3
MAX_NEW_TOKENS = 8


def real_vocab_tensors(config: dict, seed: int) -> dict[str, np.ndarray]:
    """The tiny checkpoint's weights, float32, from NumPy alone (the test re-runs this and compares sha256).

    Uniform draws from `Generator.random` (53 random bits per float64, exact on every platform), scaled so that
    every weight matters: embeddings U(-0.9, 0.9), projections U(-0.3, 0.3), norms 1 + U(-0.5, 0.5). The padding
    rows of the embedding (ids the tokenizer does not have) are zero, so their logit is exactly 0 and greedy
    decoding never picks them over the real tokens' larger logits.
    """
    rng = np.random.default_rng(seed)
    H, F, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]

    def u(*shape, scale, offset=0.0):
        return ((rng.random(shape) * 2 - 1) * scale + offset).astype(np.float32)

    embed = u(config["vocab_size"], H, scale=0.9)
    embed[N_TOKENS:] = 0.0
    tensors = {"model.embed_tokens.weight": embed}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": u(H, scale=0.5, offset=1.0),
            p + "self_attn.q_proj.weight": u(nq * d, H, scale=0.3),
            p + "self_attn.k_proj.weight": u(nkv * d, H, scale=0.3),
            p + "self_attn.v_proj.weight": u(nkv * d, H, scale=0.3),
            p + "self_attn.o_proj.weight": u(H, nq * d, scale=0.3),
            p + "self_attn.q_norm.weight": u(d, scale=0.5, offset=1.0),
            p + "self_attn.k_norm.weight": u(d, scale=0.5, offset=1.0),
            p + "post_attention_layernorm.weight": u(H, scale=0.5, offset=1.0),
            p + "mlp.gate_proj.weight": u(F, H, scale=0.3),
            p + "mlp.up_proj.weight": u(F, H, scale=0.3),
            p + "mlp.down_proj.weight": u(H, F, scale=0.3),
        }
    tensors["model.norm.weight"] = u(H, scale=0.5, offset=1.0)
    return tensors


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """One digest over every tensor's name, shape and float32 bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name], dtype="<f4")
        h.update(f"{name}{list(t.shape)}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the official side


def shared_tokenizer_dir() -> Path:
    roots = [Path(os.environ["TINYQWEN_SHARED"])] if os.environ.get("TINYQWEN_SHARED") else []
    roots.append(REPO.parent / "shared")
    for root in roots:
        if (root / "qwen3-tokenizer" / "tokenizer.json").is_file():
            return root / "qwen3-tokenizer"
    sys.exit("official tokenizer.json not found: set TINYQWEN_SHARED or provide ../shared/qwen3-tokenizer")


def official_byte_table(byte_level) -> dict[int, str]:
    """byte -> stand-in for every byte value that occurs in valid UTF-8, read off the official ByteLevel step."""
    code_points = [
        *range(0x800),
        0x800,
        *range(0x1000, 0x10000, 0x1000),
        0x10000,
        0x40000,
        0x80000,
        0xC0000,
        0x100000,
    ]
    table: dict[int, str] = {}
    for cp in code_points:
        if 0xD800 <= cp < 0xE000:
            continue
        raw = chr(cp).encode("utf-8")
        (mapped, _), *_ = byte_level.pre_tokenize_str(chr(cp))
        assert len(mapped) == len(raw), (cp, mapped)
        for b, ch in zip(raw, mapped, strict=True):
            assert table.setdefault(b, ch) == ch
    assert len(table) == 243, len(table)
    return table


def gpt2_rule() -> dict[int, str]:
    """GPT-2's byte table written out by hand; used here only to fill the 13 bytes UTF-8 never produces, and
    checked against the 243 official ones first."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, shifted = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def stream_chunks(token_bytes: list[bytes]) -> list[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(b) for b in token_bytes] + [decoder.decode(b"", final=True)]


def no_added_tokens(tj: dict):
    """The official tokenizer with its added-token list emptied: every added token's text is encoded as text.

    (`encode_special_tokens = True` is not the same: it still matches the added tokens that are not special,
    such as `<think>`.)"""
    import tokenizers

    return tokenizers.Tokenizer.from_str(json.dumps(tj | {"added_tokens": []}))


def main() -> None:
    import tokenizers
    from tokenizers import Regex
    from tokenizers.pre_tokenizers import ByteLevel, Split

    shared = shared_tokenizer_dir()
    tj = json.loads((shared / "tokenizer.json").read_text(encoding="utf-8"))
    tok = tokenizers.Tokenizer.from_file(str(shared / "tokenizer.json"))
    plain = tokenizers.Tokenizer.from_file(str(shared / "tokenizer.json"))
    plain.normalizer = None  # the same tokenizer without its NFC step
    as_text = no_added_tokens(tj)  # added tokens are not matched: they go through the regex like text

    def ids(t, text):
        return t.encode(text, add_special_tokens=False).ids

    split_spec, byte_spec = tj["pre_tokenizer"]["pretokenizers"]
    assert split_spec["behavior"] == "Isolated" and not split_spec["invert"]
    split = Split(Regex(split_spec["pattern"]["Regex"]), behavior="isolated", invert=False)
    byte_level = ByteLevel(add_prefix_space=False, use_regex=False)

    table = official_byte_table(byte_level)
    rule = gpt2_rule()
    assert all(rule[b] == ch for b, ch in table.items()), "GPT-2's rule disagrees with the official ByteLevel"
    assert sorted(rule.values()) == sorted(ByteLevel.alphabet())
    full_table = rule  # 243 entries official, 13 by the (checked) rule

    def token_bytes(i: int) -> bytes:
        token = tok.id_to_token(i)
        inverse = {ch: b for b, ch in full_table.items()}
        if all(ch in inverse for ch in token):
            return bytes(inverse[ch] for ch in token)
        return token.encode("utf-8")

    out: dict = {
        "about": (
            "Made by exercises/references/make_ch01_tokenization.py with the official Hugging Face tokenizers "
            f"{tokenizers.__version__} on the official Qwen3 tokenizer.json (sha256 "
            f"{hashlib.sha256((shared / 'tokenizer.json').read_bytes()).hexdigest()[:16]}…). See the script's "
            "docstring for what each key holds."
        ),
        "split_regex": split_spec["pattern"]["Regex"],
        "byte_table": {str(b): table[b] for b in sorted(table)},
        "alphabet": sorted(ByteLevel.alphabet()),
        "symbols": [
            {"text": t, "symbols": byte_level.pre_tokenize_str(t)[0][0] if t else ""} for t in SYMBOL_TEXTS
        ],
        "pretokenize": [
            {"text": t, "pieces": [p for p, _ in split.pre_tokenize_str(t)]} for t in PRETOKENIZE_TEXTS
        ],
    }

    bpe = []
    for word in BPE_WORDS:
        assert [p for p, _ in split.pre_tokenize_str(word)] == [word], word
        symbols = byte_level.pre_tokenize_str(word)[0][0]
        bpe.append(
            {"word": word, "symbols": symbols, "tokens": tok.encode(word, add_special_tokens=False).tokens}
        )
    out["bpe"] = bpe

    out["encode"] = [{"text": t, "ids": ids(tok, t)} for t in ENCODE_TEXTS]
    nfc_cases = []
    for t in NFC_TEXTS:
        assert unicodedata.normalize("NFC", t) != t
        nfc_cases.append({"text": t, "ids": ids(tok, t), "ids_without_nfc": ids(plain, t)})
        assert nfc_cases[-1]["ids"] != nfc_cases[-1]["ids_without_nfc"], t
    out["nfc"] = nfc_cases
    out["added"] = [
        {"text": t, "ids": ids(tok, t), "ids_as_plain_text": ids(as_text, t)} for t in ADDED_TEXTS
    ]
    added = {str(t["id"]): t["content"] for t in tj["added_tokens"]}
    out["added_tokens"] = added

    decode_ids = (
        [ids(tok, t) for t in ENCODE_TEXTS[:10]] + [c["ids"] for c in out["added"][:3]] + DECODE_EXTRA
    )
    out["decode"] = [{"ids": i, "text": tok.decode(i, skip_special_tokens=False)} for i in decode_ids]

    stream = []
    for i in [ids(tok, t) for t in STREAM_TEXTS] + STREAM_EXTRA:
        chunks = stream_chunks([token_bytes(j) for j in i])
        assert "".join(chunks) == tok.decode(i, skip_special_tokens=False), i
        stream.append({"ids": i, "chunks": chunks})
    out["stream"] = stream

    out["real_pipeline"], arrays = real_pipeline(shared, tok)
    OUT_JSON.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    np.savez_compressed(OUT_NPZ, **arrays)
    print(f"wrote {OUT_JSON.relative_to(REPO)} ({OUT_JSON.stat().st_size:,} bytes)")
    print(f"wrote {OUT_NPZ.relative_to(REPO)} ({OUT_NPZ.stat().st_size:,} bytes)")


def real_pipeline(shared: Path, tok) -> tuple[dict, dict[str, np.ndarray]]:
    import safetensors.numpy
    import torch
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(shared))
    text = hf_tok.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    prompt = tok.encode(text, add_special_tokens=False).ids
    assert prompt == hf_tok(text, add_special_tokens=False)["input_ids"]
    as_text = no_added_tokens(json.loads((shared / "tokenizer.json").read_text(encoding="utf-8")))

    seed = REAL_VOCAB_SEED
    while True:  # the first seed whose greedy steps are far from ties (float noise must not flip a token)
        tensors = real_vocab_tensors(REAL_VOCAB_CONFIG, seed)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(json.dumps(REAL_VOCAB_CONFIG, indent=2))
            safetensors.numpy.save_file(
                tensors, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"}
            )
            model, info = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
            )
        assert not any(info.values()), info
        model.eval()
        model.generation_config.eos_token_id = None
        x = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(x).logits[0].numpy()  # [T, V]
            out = model.generate(
                x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                output_scores=True, return_dict_in_generate=True, pad_token_id=0,
            )  # fmt: skip
        new = out.sequences[0, len(prompt) :].tolist()
        margins = [float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in out.scores]
        if min(margins) > 1e-3 and len(set(new)) >= 4 and max(new) < N_TOKENS:
            break
        print(
            f"seed {seed}: greedy margin {min(margins):.2g}, {len(set(new))} distinct tokens; trying the next"
        )
        seed += 1

    rng = np.random.default_rng(seed)
    top = np.argsort(logits, axis=1)[:, -5:].ravel()  # the 5 best columns at every position
    columns = np.unique(np.concatenate([prompt, new, top, rng.choice(logits.shape[1], 64, replace=False)]))
    info = {
        "messages": MESSAGES,
        "text": text,
        "ids": prompt,
        "ids_as_plain_text": as_text.encode(text, add_special_tokens=False).ids,
        "config": REAL_VOCAB_CONFIG,
        "seed": seed,
        "weights_sha256": tensors_sha256(tensors),
        "new_ids": new,
        "new_text": tok.decode(new, skip_special_tokens=False),
        "min_greedy_margin": min(margins),
        "max_new_tokens": MAX_NEW_TOKENS,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }
    arrays = {"logits_columns": columns.astype(np.int64), "logits": logits[:, columns].astype(np.float32)}
    return info, arrays


if __name__ == "__main__":
    main()
