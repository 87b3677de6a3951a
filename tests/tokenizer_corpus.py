"""A deterministic ~1 MB of mixed text for the tokenizer tests and benchmark (built, never committed).

Half is real code (Python standard library sources), half is seeded random text over many scripts, emoji (ZWJ
sequences, skin tones, flags, keycaps), decomposed accents that NFC must compose, long runs of spaces, tabs and
newlines, CRLF, numbers, and added-token text (whole, adjacent, and broken).
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

ADDED = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
         "<|fim_prefix|>", "<|vision_pad|>", "<tool_response>"]  # fmt: skip
BROKEN_ADDED = ["<|im_end", "<think", "|im_start|>", "<|im_start |>", "< think>", "<<|im_end|>>", "<think>>"]

SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéèêàçñöüßøåæœ",
    "cyrillic": "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЭЮЯ",
    "greek": "αβγδεζηθικλμνξοπρστυφχψωάέήίόύώΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ",
    "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明",
    "hangul": "가나다라마바사아자차카타파하한국어대한민국서울말씀",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "devanagari": "अआइईउऊएऐओऔकखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसहािीुूेैोौंः्",
    "thai": "กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮะาิีึืุูเแโใไ่้๊๋",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
}
EMOJI = ["😀", "😂", "🥲", "👍", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "🇯🇵", "1️⃣", "🧑🏿‍🚀", "🫠", "✅"]  # fmt: skip
# NFC composes most of these with the letter before them
COMBINING = ["\u0301", "\u0300", "\u0308", "\u0327", "\u0323", "\u0302", "\u0303"]
PUNCT = list(".,;:!?-()[]{}\"'«»“”—…/@#$%^&*_+=|\\~`<>") + ["'s", "'re", "'LL", "’s"]


def _random_word(rng: random.Random) -> str:
    script = rng.choice(list(SCRIPTS))
    letters = SCRIPTS[script]
    word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 9 if script != "cjk" else 14)))
    if script in ("latin", "cyrillic", "greek") and rng.random() < 0.1:
        at = rng.randint(1, len(word))  # a decomposed accent: only NFC makes it the same as the composed one
        word = word[:at] + rng.choice(COMBINING) + word[at:]
    return word


def _random_number(rng: random.Random) -> str:
    return rng.choice([
        str(rng.randint(0, 10**rng.randint(1, 20))),
        f"{rng.uniform(-1e6, 1e6):.{rng.randint(0, 6)}f}",
        f"{rng.randint(1, 999)},{rng.randint(0, 999):03d},{rng.randint(0, 999):03d}",
        "٣٤٥", "१२३", "½", "²", "Ⅻ", "１２３",
    ])  # fmt: skip


def _random_space(rng: random.Random) -> str:
    return rng.choice([
        " " * rng.choice([2, 3, 4, 8, 17, 64, 300, 2000]),
        "\t" * rng.randint(1, 12),
        "\n" * rng.randint(1, 6),
        "\r\n" * rng.randint(1, 4),
        " \n  \t\n" * rng.randint(1, 3),
        "\u00a0", "\u3000", "\u2009", "\x0b", "\x0c", "\x85", " \r",
    ])  # fmt: skip


def random_text(n_chars: int, seed: int) -> str:
    """Seeded random text: words in many scripts with the separators, numbers and symbols that real text has."""
    rng = random.Random(seed)
    out: list[str] = []
    length = 0
    while length < n_chars:
        roll = rng.random()
        if roll < 0.55:
            part = (" " if rng.random() < 0.7 else "") + _random_word(rng)
        elif roll < 0.65:
            part = rng.choice(PUNCT)
        elif roll < 0.73:
            part = (" " if rng.random() < 0.5 else "") + _random_number(rng)
        elif roll < 0.81:
            part = _random_space(rng)
        elif roll < 0.88:
            part = "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3)))
        elif roll < 0.93:
            part = rng.choice(ADDED) * rng.randint(1, 2) + rng.choice(["", " ", "\n", "x", "\u0301"])
        elif roll < 0.95:
            part = rng.choice(BROKEN_ADDED)
        else:
            part = chr(
                rng.choice(
                    [rng.randint(0x20, 0x2FFF), rng.randint(0xA000, 0xD7FF), rng.randint(0xE000, 0x1FFFF)]
                )
            )
        out.append(part)
        length += len(part)
    return "".join(out)


def code_text(n_bytes: int) -> str:
    """Python standard library sources (sorted, so the same Python version gives the same text)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    size = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.append(text)
        size += len(text.encode("utf-8"))
        if size >= n_bytes:
            break
    return "".join(out)


def mixed_documents(total_bytes: int = 1_100_000, seed: int = 0) -> list[str]:
    """Documents of a few KB each whose UTF-8 size adds up to at least `total_bytes`: half code, half random."""
    docs: list[str] = []
    code = code_text(total_bytes // 2)
    docs += [code[i : i + 8000] for i in range(0, len(code), 8000)]
    size = len(code.encode("utf-8"))
    k = 0
    while size < total_bytes:
        doc = random_text(3000, seed * 100_003 + k)
        docs.append(doc)
        size += len(doc.encode("utf-8"))
        k += 1
    return docs
