"""BPE training (tinyqwen.corpus.train_bpe, and chapter 1's solution): the incremental trainer learns exactly the
merges of a plain one that recounts every pair after each merge, on corpora full of ties and repeated symbols."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from exercises.solutions import ch01_tokenization as solution
from tinyqwen import corpus
from tinyqwen.tokenizer import bytes_to_unicode

SPECIAL = "<|endoftext|>"


def naive_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """The textbook loop, written plainly: count every adjacent pair of every word (weighted by the word's count),
    take the most frequent — among equal counts the smallest (a, b) — merge it everywhere, left to right."""
    words = {tuple(w): c for w, c in words.items()}
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for i in range(len(w) - 1):
                pairs[w[i], w[i + 1]] += c
        if not pairs:
            break
        top = max(pairs.values())
        best = min(p for p in pairs if pairs[p] == top)
        merges.append(best)
        merged = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


def random_text(seed: int, alphabet: str, n_words: int) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(n_words))


CORPORA = {
    "example": "aaab aaab",
    "runs of one letter": "aaaa aaaaa aaaaaaa a aa aaa b bb bbbb abab ababab baba",
    "all ties": "ab cd ef gh ba dc fe hg",
    "two letters": random_text(0, "ab", 400),
    "three letters": random_text(1, "abc", 400),
    "with spaces and digits": random_text(2, "ab 1.", 300),
    "non-ASCII": random_text(3, "aé中😀\u0301", 200),  # the accent composes with the letter before it (NFC)
    "specials": f"abab{SPECIAL}abab{SPECIAL}{SPECIAL}ba ba",
    "synthetic corpus": "\n".join(t for _, t in corpus.synthetic_documents(300, seed=5)),
}


@pytest.mark.parametrize("name", list(CORPORA))
def test_incremental_trainers_learn_the_naive_merges(name):
    text = CORPORA[name]
    words = corpus.word_counts([text], (SPECIAL,))
    n = 60 if name != "synthetic corpus" else 150
    want = naive_merges(words, n)
    assert len(want) > 0
    assert corpus.learn_merges(words, n) == want
    vocab, merges = corpus.train_bpe([text], 256 + n, (SPECIAL,))
    assert merges == want and len(vocab) == 256 + len(want)
    assert all(vocab[a + b] == 256 + r for r, (a, b) in enumerate(merges))
    assert (
        solution.train_bpe(text, 256 + 1 + n, [SPECIAL]) == want
    )  # the solution's vocab_size counts the special


def test_ties_go_to_the_pair_that_sorts_first():
    # "xy ba": three pairs once each: ('b', 'a') < ('x', 'y') < ('Ġ', 'b') as strings (Ġ is U+0120), then the
    # new 'ba' pairs with Ġ
    assert corpus.train_bpe(["xy ba"], 259)[1] == [("b", "a"), ("x", "y"), ("Ġ", "ba")]
    assert solution.train_bpe("xy ba", 259, []) == [("b", "a"), ("x", "y"), ("Ġ", "ba")]


def test_words_are_split_like_the_encoder_and_specials_are_cut_out():
    words = corpus.word_counts(
        ["Hi  there 42!", f"a{SPECIAL}b"], (SPECIAL,)
    )  # Hi, " ", " there", " ", 4, 2, !
    space = bytes_to_unicode()[ord(" ")]
    assert words == Counter({("H", "i"): 1, (space,): 2, (space, "t", "h", "e", "r", "e"): 1, ("4",): 1,
                             ("2",): 1, ("!",): 1, ("a",): 1, ("b",): 1})  # fmt: skip
    # no merge spans a special token: "ab" never occurs in one piece
    assert ("a", "b") not in corpus.train_bpe([f"a{SPECIAL}b " * 5], 300, (SPECIAL,))[1]


def test_a_trained_tokenizer_encodes_with_its_merges(tmp_path):
    import tinyqwen

    text = CORPORA["synthetic corpus"]
    vocab, merges = corpus.train_bpe([text], 300)
    corpus.save_tokenizer(tmp_path, vocab, merges)
    tok = tinyqwen.Tokenizer.from_pretrained(tmp_path)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < 0.7 * len(text.encode())  # 44 merges already compress
