"""The official Qwen3 tokenizer.json, rebuilt byte for byte from the files tinyqwen ships (no ../shared needed).

The official `tokenizer.json` (11 MB) holds nothing that `vocab.json` + `merges.txt` + `tokenizer_config.json` do
not: the same BPE, the NFC normalizer, the Qwen2 split regex followed by ByteLevel, and the 26 added tokens. The
official HF `tokenizers` library (the dev dependency, pinned) builds the tokenizer from those pieces and writes it
out; the result is the official file itself: its sha256 is the one pinned for the Hugging Face Hub file
(`aeb13307…`, the same file in Qwen3-0.6B, 4B, 8B and 30B-A3B; see the shared qwen3-tokenizer README). The tests
rebuild it once per session and check that hash before using it as the reference, so the reference is still the
official file and the official library, not tinyqwen's own reading of the data.

    python tests/official_tokenizer.py OUT.json      # writes the file (and checks its sha256)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "tinyqwen" / "data"
OFFICIAL_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer_json(data: Path = PACKAGE_DATA) -> str:
    """The text of tokenizer.json, built by `tokenizers` from vocab.json, merges.txt and tokenizer_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))
    lines = (data / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is "#version: 0.2"
    bpe = BPE(
        vocab=vocab,
        merges=merges,
        byte_fallback=False,
        fuse_unk=False,
        continuing_subword_prefix="",
        end_of_word_suffix="",
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    config = json.loads((data / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = [v for _, v in sorted((int(k), v) for k, v in config["added_tokens_decoder"].items())]

    def token(v: dict) -> AddedToken:
        return AddedToken(
            v["content"],
            single_word=v["single_word"],
            lstrip=v["lstrip"],
            rstrip=v["rstrip"],
            normalized=v["normalized"],
            special=v["special"],
        )

    tok.add_special_tokens([token(v) for v in added if v["special"]])
    tok.add_tokens([token(v) for v in added if not v["special"]])
    for key, v in config["added_tokens_decoder"].items():
        assert tok.token_to_id(v["content"]) == int(key), v["content"]
    # The Python binding's decoders.ByteLevel() takes no options; the official file spells them out (they do not
    # change decoding), so they are set in the JSON and the tokenizer is read back before writing it out.
    spec = json.loads(tok.to_str())
    spec["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return Tokenizer.from_str(json.dumps(spec)).to_str(pretty=True)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_official_tokenizer_json(path: Path) -> Path:
    """Write tokenizer.json to `path`; raise if it is not byte-identical to the official file."""
    text = build_tokenizer_json()
    if sha256(text) != OFFICIAL_SHA256:
        raise AssertionError(
            f"rebuilt tokenizer.json has sha256 {sha256(text)}, not the official {OFFICIAL_SHA256}: "
            "the `tokenizers` version or the files in tinyqwen/data changed"
        )
    path.write_bytes(text.encode("utf-8"))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tokenizer.json")
    print(write_official_tokenizer_json(out), "sha256", OFFICIAL_SHA256)
