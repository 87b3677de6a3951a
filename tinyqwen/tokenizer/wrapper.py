"""The `Tokenizer` class: the whole pipeline behind one object, with the Hugging Face habits.

The steps live in their own modules (pretokenize.py, byte_level.py, bpe.py, streaming.py, files.py); this class
holds the loaded vocabulary and merges and runs them in order. It adds what the steps alone do not have: added
tokens matched in the raw text (and the choice of which are allowed, against prompt injection), a cache of
encoded pieces, decoding, and transformers' calling conventions (`tok(texts, padding=True)`, `batch_decode`,
`apply_chat_template`, `from_pretrained`).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from tinyqwen.errors import TokenizerError
from tinyqwen.tokenizer.arguments import (
    _as_array,
    _check_add_special_tokens,
    _check_return_tensors,
    _check_texts,
)
from tinyqwen.tokenizer.bpe import MergeStep, merge_steps, merge_symbols
from tinyqwen.tokenizer.byte_level import bytes_to_unicode, symbols_to_bytes, text_to_symbols
from tinyqwen.tokenizer.files import (
    DATA_DIR,
    AddedToken,
    Merges,
    gguf_tokenizer_fields,
    read_json,
    read_tokenizer_json,
    read_vocab_merges,
)
from tinyqwen.tokenizer.pretokenize import QWEN2_SPLIT_PATTERN, nfc, pre_tokenize
from tinyqwen.tokenizer.streaming import StreamDecoder

_CACHE_MAX = 200_000  # cached pieces; the cache is emptied when full (simple, and text is bursty anyway)
_CACHE_PIECE_MAX = 256  # longer pieces are not cached: they are rare and would pin memory


class Tokenizer:
    """Qwen2/Qwen3 byte-level BPE tokenizer, written from scratch, id for id the same as the reference.

    Build one with `Tokenizer.from_pretrained(folder)` or `Tokenizer.qwen3()`.

    >>> tok = Tokenizer.qwen3()
    >>> tok.encode("<|im_start|>user\\nHi!<|im_end|>")
    [151644, 872, 198, 13048, 0, 151645]
    >>> tok.decode([151644, 872, 198, 13048, 0, 151645], skip_special_tokens=True)
    'user\\nHi!'
    >>> len(tok), tok.eos_token_id, tok.pad_token_id, tok.token_to_id("<think>")
    (151669, 151645, 151643, 151667)
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Merges,
        added: list[AddedToken],
        eos_token: str | None = None,
        pad_token: str | None = None,
        source: str = "<memory>",
        padding_side: str = "right",
    ):
        """`merges`: the (left, right) pairs in rank order, and rank -> where it came from (for error messages)."""
        if padding_side not in ("right", "left"):
            raise TokenizerError(f"{source}: padding_side must be 'right' or 'left', got {padding_side!r}")
        self.padding_side = (
            padding_side  # where `__call__(..., padding=True)` pads; "right" as in transformers
        )
        byte_symbols = set(bytes_to_unicode().values())
        missing = sorted(byte_symbols - vocab.keys())
        if missing:
            raise TokenizerError(
                f"{source}: the vocabulary lacks byte symbol(s) {missing[:5]}; all 256 are needed"
            )
        pairs, origin = merges
        # the rank table holds the vocabulary's own strings: a merge's halves, as read from a file, are new strings
        # equal to vocabulary keys (302,774 of them for Qwen3's merges, ~17 MiB of a loaded tokenizer's memory)
        shared = {token: token for token in vocab}
        self.ranks: dict[tuple[str, str], int] = {
            (shared.get(left, left), shared.get(right, right)): rank
            for rank, (left, right) in enumerate(pairs)
        }
        del shared
        for rank, (left, right) in enumerate(pairs):
            if (
                left not in vocab
                or right not in vocab
                or left + right not in vocab
                or self.ranks[left, right] != rank
            ):
                part = next((p for p in (left, right, left + right) if p not in vocab), None)
                if part is None:
                    raise TokenizerError(
                        f"{origin(rank)}: merge {left!r} {right!r} appears again at {origin(self.ranks[left, right])}"
                    )
                raise TokenizerError(
                    f"{origin(rank)}: token {part!r} of merge {left!r} {right!r} is not in the vocabulary"
                )
        self.vocab = vocab
        self.added_tokens: dict[str, AddedToken] = {}
        for token in added:
            if token.content in vocab and vocab[token.content] != token.id:
                raise TokenizerError(
                    f"{source}: added token {token.content!r} has id {token.id} but the vocabulary says "
                    f"{vocab[token.content]}"
                )
            self.added_tokens[token.content] = token
        size = max([*vocab.values(), *(t.id for t in added)]) + 1
        id_to_token: list[str | None] = [None] * size
        for token, i in vocab.items():
            id_to_token[i] = token
        for token in added:
            id_to_token[token.id] = token.content
        if None in id_to_token:
            gap = id_to_token.index(None)
            raise TokenizerError(f"{source}: no token has id {gap}, but ids go up to {size - 1}")
        self._id_to_token: list[str] = id_to_token  # type: ignore[assignment]
        self._id_bytes = [self._bytes_of(i) for i in range(size)]
        self._special_ids = {t.id for t in added if t.special}
        self.eos_token_id = self._config_token_id(eos_token, "eos_token", source)
        self.pad_token_id = self._config_token_id(pad_token, "pad_token", source)
        # Added tokens are found in the raw text with leftmost-longest matching, like the reference: at the first
        # position where any matches, the longest wins. Sorting longest first makes a regex alternation do that.
        contents = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._allowed_re: dict[frozenset[str], re.Pattern | None] = {}
        self._cache: dict[str, tuple[int, ...]] = {}

    def _config_token_id(self, content: str | None, key: str, source: str) -> int | None:
        if content is None:
            return None
        i = self.token_to_id(content)
        if i is None:
            raise TokenizerError(f"{source}: {key} {content!r} is not a token of this vocabulary")
        return i

    def _bytes_of(self, i: int) -> bytes:
        # As the reference's ByteLevel decoder: a token made only of byte stand-ins gives those bytes, any other
        # token (an added token such as "<think>" happens to be both) its UTF-8 text.
        token = self._id_to_token[i]
        raw = symbols_to_bytes(token)
        return raw if raw is not None else token.encode("utf-8")

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load from a folder holding tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json.

        tokenizer.json wins when both are present; tokenizer_config.json, when present, names eos and pad (and
        padding_side). `path` may start with `~`, or be a Hugging Face id such as "Qwen/Qwen3-0.6B", found in the
        Hugging Face cache (or downloaded) exactly as `tinyqwen.load_model` and the command line find it.
        """
        from tinyqwen.hub import is_hub_id, resolve_model

        folder = Path(path).expanduser()
        if not folder.exists() and is_hub_id(str(path)):
            folder = resolve_model(str(path))
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a directory (expected a folder with the tokenizer files)")
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else None
        if config is not None and not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: expected a JSON object")
        needed = ("vocab.json", "merges.txt", "tokenizer_config.json")
        if (folder / "tokenizer.json").is_file():
            tok = cls(**read_tokenizer_json(folder / "tokenizer.json", config, QWEN2_SPLIT_PATTERN))
        elif not all((folder / name).is_file() for name in needed):
            missing = [name for name in needed if not (folder / name).is_file()]
            raise TokenizerError(
                f"{folder}: no tokenizer found: looked for tokenizer.json, or vocab.json + merges.txt + "
                f"tokenizer_config.json (missing: {', '.join(missing)}); every official Qwen3 model uses the "
                "tokenizer that Tokenizer.qwen3() returns"
            )
        else:
            tok = cls(**read_vocab_merges(folder, config))
        tok.chat_template_in_files = (
            bool(config and config.get("chat_template")) or (folder / "chat_template.jinja").is_file()
        )
        return tok

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer stored in a llama.cpp GGUF file's metadata (`tokenizer.ggml.*`; see `gguf_tokenizer_fields`)."""
        from tinyqwen.gguf import GGUFFile

        with GGUFFile(Path(path).expanduser()) as f:
            return cls(**gguf_tokenizer_fields(f.metadata, str(path)))

    @classmethod
    def qwen3(cls) -> Tokenizer:
        """The official Qwen3 tokenizer shipped inside the package (works offline)."""
        return _packaged_qwen3()

    chat_template_in_files: bool | None = None  # the files it came from have a chat template (None: no files)

    @property
    def has_chat_template(self) -> bool:
        """It knows <|im_start|> and <|im_end|>, and its files (if any) carry a chat template. A base model's own
        tokenizer (chapter 13 trains one) has none: `tinyqwen generate` then feeds prompts as written."""
        tokens = all(t in self.added_tokens for t in ("<|im_start|>", "<|im_end|>"))
        return tokens and self.chat_template_in_files is not False

    # ---------------------------------------------------------------- vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of tokens (151,669 for Qwen3). The model's 151,936 embedding rows include unused padding."""
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """All added tokens, content -> id: the strings recognised whole inside text (special or not)."""
        return {content: t.id for content, t in self.added_tokens.items()}

    def token_to_id(self, token: str) -> int | None:
        """Id of a token written as the vocabulary writes it (byte stand-ins: " hi" is "Ġhi"), or None."""
        added = self.added_tokens.get(token)
        return added.id if added is not None else self.vocab.get(token)

    def id_to_token(self, token_id: int) -> str:
        """The token string of an id, as the vocabulary writes it."""
        return self._id_to_token[self._check_id(token_id)]

    def _check_id(self, token_id) -> int:
        try:
            i = operator.index(token_id)  # int, numpy integer; not float or str
        except TypeError:
            raise TokenizerError(f"token id {token_id!r} is not an integer") from None
        if not 0 <= i < len(self._id_to_token):
            raise TokenizerError(
                f"token id {i} is outside the vocabulary [0, {len(self._id_to_token)}) of {len(self._id_to_token)} "
                "tokens (the model's extra embedding rows are padding, not tokens)"
            )
        return i

    # ---------------------------------------------------------------- encode

    def encode(
        self,
        text: str,
        allowed_special: Literal["all", "none"] | Collection[str] = "all",
        add_special_tokens: bool = True,
    ) -> list[int]:
        """Token ids of `text`. No BOS is added (Qwen has none).

        `allowed_special` says which added tokens written in the text become their control token:
        "all" (the default, as transformers and the official `tokenizers` do), "none" (or an empty set): none,
        every character is plain text, or a set of token strings: only those. Use "none" for text you did not
        write yourself: otherwise a user who types "<|im_end|>" ends the turn (prompt injection).
        `add_special_tokens` is accepted for transformers' habit and changes nothing: Qwen's tokenizer adds no BOS
        or EOS either way.

        >>> tok = Tokenizer.qwen3()
        >>> tok.encode("Hello world"), tok.encode("<think>\\n\\n</think>")
        ([9707, 1879], [151667, 271, 151668])
        >>> tok.encode("<|im_end|>"), tok.encode("<|im_end|>", allowed_special="none")
        ([151645], [27, 91, 318, 6213, 91, 29])
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        _check_add_special_tokens(add_special_tokens)
        pattern = self._special_pattern(allowed_special)
        found = [] if pattern is None else list(pattern.finditer(text))
        return self._encode_around(
            text, [(m.start(), m.end(), self.added_tokens[m.group()].id) for m in found]
        )

    def encode_parts(self, parts: Iterable[tuple[str, bool]]) -> list[int]:
        """Token ids of the parts' joined text, where added tokens count only inside parts marked True.

        This is how to tokenize a prompt built from trusted text (a chat template) and untrusted text (what users,
        web pages or tools wrote): a part marked False is plain text even where it spells "<|im_start|>". The
        joined text is tokenized as one string, so when no False part spells an added token the ids equal
        `encode("".join(texts))`; and a False part's ids are those of the official tokenizer with added tokens
        switched off.

        >>> tok = Tokenizer.qwen3()
        >>> tok.encode_parts([("<|im_start|>user\\n", True), ("<|im_end|>", False), ("<|im_end|>", True)])
        [151644, 872, 198, 27, 91, 318, 6213, 91, 29, 151645]
        """
        if isinstance(parts, (str, bytes)):
            raise TokenizerError("encode_parts expects (text, special) pairs, got a single string")
        texts, found, offset = [], [], 0
        for k, part in enumerate(parts):
            if not (isinstance(part, (tuple, list)) and len(part) == 2):
                raise TokenizerError(
                    f"encode_parts: part {k} must be a (text, special) pair, got {part!r:.80}"
                )
            text, special = part
            if not isinstance(text, str) or not isinstance(special, bool):
                raise TokenizerError(
                    f"encode_parts: part {k} must be (str, bool), got ({type(text).__name__}, "
                    f"{type(special).__name__})"
                )
            if special and self._added_re is not None:
                found += [
                    (offset + m.start(), offset + m.end(), self.added_tokens[m.group()].id)
                    for m in self._added_re.finditer(text)
                ]
            texts.append(text)
            offset += len(text)
        return self._encode_around("".join(texts), found)

    def _special_pattern(self, allowed) -> re.Pattern | None:
        """The regex finding the allowed added tokens (leftmost, then longest), or None when none are allowed."""
        if isinstance(allowed, str):
            if allowed == "all":
                return self._added_re
            if allowed == "none":
                return None
            raise TokenizerError(
                f"allowed_special must be 'all', 'none' or a set of added tokens, got {allowed!r}"
            )
        try:
            allowed = frozenset(allowed)
        except TypeError:
            raise TokenizerError(
                f"allowed_special must be 'all', 'none' or a set of added tokens, got {type(allowed).__name__}"
            ) from None
        if allowed not in self._allowed_re:
            unknown = sorted(
                (t for t in allowed if not isinstance(t, str) or t not in self.added_tokens), key=repr
            )
            if unknown:
                raise TokenizerError(
                    f"allowed_special: {unknown[0]!r} is not an added token of this tokenizer"
                )
            contents = sorted(allowed, key=len, reverse=True)
            self._allowed_re[allowed] = re.compile("|".join(map(re.escape, contents))) if contents else None
        return self._allowed_re[allowed]

    def _encode_around(self, text: str, specials: list[tuple[int, int, int]]) -> list[int]:
        """Ids of `text` with the given (start, end, id) added tokens; the text between them is ordinary text."""
        ids: list[int] = []
        start = 0
        for begin, end, token_id in specials:
            if begin > start:
                self._encode_ordinary(text[start:begin], ids, start)
            ids.append(token_id)
            start = end
        if start < len(text):
            self._encode_ordinary(text[start:], ids, start)
        return ids

    def _encode_ordinary(self, segment: str, ids: list[int], offset: int) -> None:
        """Steps 2-6 for a stretch of text without added tokens; appends to `ids`."""
        cache, vocab, ranks = self._cache, self.vocab, self.ranks
        for piece in pre_tokenize(nfc(segment)):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                try:
                    symbols = text_to_symbols(piece)
                except (
                    UnicodeEncodeError
                ) as e:  # a lone surrogate: not Unicode text, and not encodable to UTF-8
                    where = offset + segment.find(piece[e.start])
                    raise TokenizerError(
                        f"text contains a lone surrogate {piece[e.start]!r} near index {where}; it is not valid Unicode"
                    ) from None
                piece_ids = tuple(vocab[s] for s in merge_symbols(list(symbols), ranks))
                if len(piece) <= _CACHE_PIECE_MAX:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[piece] = piece_ids
            ids.extend(piece_ids)

    def bpe_steps(self, word: str) -> list[MergeStep]:
        """Every merge BPE makes on one pre-tokenized piece, in order: the teaching view of step 5.

        Symbols are bytes written with their stand-ins ("Ġ" is a space). Each step merges the adjacent pair with
        the lowest rank (its line in merges.txt), leftmost first, until no adjacent pair is in merges.txt.

        >>> tok = Tokenizer.qwen3()
        >>> for step in tok.bpe_steps(" hello"):
        ...     print(step)
        rank     45: 'e' + 'l' -> Ġ h el l o
        rank     49: 'Ġ' + 'h' -> Ġh el l o
        rank    129: 'l' + 'o' -> Ġh el lo
        rank   4535: 'el' + 'lo' -> Ġh ello
        rank  23555: 'Ġh' + 'ello' -> Ġhello
        >>> tok.token_to_id("Ġhello"), tok.encode(" hello")
        (23811, [23811])
        """
        return merge_steps(list(text_to_symbols(word)), self.ranks)

    # ---------------------------------------------------------------- decode

    def _token_bytes(self, token_id, skip_special: bool) -> bytes:
        # An id past the last token decodes to nothing, as in transformers. Qwen3's embedding has 151,936 rows for
        # 151,669 tokens, and a random or fine-tuned model can choose one of the spare rows: that must not make a
        # whole reply (or a batch of them) undecodable. Negative or non-integer ids are still errors.
        try:
            if operator.index(token_id) >= len(self._id_bytes):
                return b""
        except TypeError:
            pass  # not an integer: _check_id says so
        i = self._check_id(token_id)
        return b"" if skip_special and i in self._special_ids else self._id_bytes[i]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids. Bytes that are not valid UTF-8 become "�" (U+FFFD), one per maximal invalid run,
        as the reference does. `skip_special_tokens` drops the special added tokens (not `<think>` & co). Ids past
        the vocabulary (a model's spare embedding rows, 151669 and up for Qwen3) decode to "", as in transformers.

        >>> tok = Tokenizer.qwen3()
        >>> tok.decode([9707, 1879, 151645]), tok.decode([9707, 151645], skip_special_tokens=True)
        ('Hello world<|im_end|>', 'Hello')
        >>> tok.decode([26525])  # the first 3 bytes of an emoji, alone
        ' �'
        >>> tok.decode([9707, 151700, 1879])
        'Hello world'
        """
        if isinstance(ids, (str, bytes)):
            raise TokenizerError(f"decode expects a sequence of token ids, got {type(ids).__name__}")
        try:
            ids = list(ids)
        except TypeError:
            raise TokenizerError(
                f"decode expects a sequence of token ids, got {type(ids).__name__}"
            ) from None
        raw = b"".join([self._token_bytes(i, skip_special_tokens) for i in ids])
        return raw.decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A `StreamDecoder` for showing generated text token by token."""
        return StreamDecoder(self, skip_special_tokens)

    def batch_decode(
        self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False
    ) -> list[str]:
        """`decode` of each sequence, as transformers' `batch_decode` (a 2-D NumPy array works too).

        >>> Tokenizer.qwen3().batch_decode([[9707, 1879], [13048]])
        ['Hello world', 'Hi']
        """
        if isinstance(sequences, (str, bytes)):
            raise TokenizerError(
                f"batch_decode expects sequences of token ids, got {type(sequences).__name__}"
            )
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    # ---------------------------------------------------------------- the transformers habits

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        allowed_special: Literal["all", "none"] | Collection[str] = "all",
    ) -> dict[str, Any]:
        """`tok(text)` as in transformers: a dict with "input_ids" and "attention_mask" (1 = a real token).

        One string gives flat lists; a list of strings gives a list per text, of different lengths unless
        `padding=True` (or "longest"), which pads to the longest with `pad_token_id` (151643, `<|endoftext|>`)
        and mask 0. Padding goes on the right, as transformers does for Qwen3 (its tokenizer_config sets no
        `padding_side`); pass `padding_side="left"` for a batch that transformers' `generate` will extend.
        (tinyqwen's own `generate_batch` takes the unpadded lists and pads them itself.) `return_tensors="np"`
        gives int64 arrays of shape [batch, T] ([1, T] for one string).

        >>> tok = Tokenizer.qwen3()
        >>> tok("Hi there")
        {'input_ids': [13048, 1052], 'attention_mask': [1, 1]}
        >>> tok(["Hi there", "a"], padding=True)
        {'input_ids': [[13048, 1052], [64, 151643]], 'attention_mask': [[1, 1], [1, 0]]}
        """
        single = isinstance(text, str)
        texts = [text] if single else _check_texts(text)
        side = self._check_padding(padding, padding_side)
        _check_return_tensors(return_tensors)
        ids = [
            self.encode(t, allowed_special=allowed_special, add_special_tokens=add_special_tokens)
            for t in texts
        ]
        masks = [[1] * len(row) for row in ids]
        if padding in (True, "longest") and ids:
            ids, masks = self._pad(ids, masks, side)
        if return_tensors == "np":
            return {
                "input_ids": _as_array(ids, "input_ids"),
                "attention_mask": _as_array(masks, "attention_mask"),
            }
        if single:
            return {"input_ids": ids[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "attention_mask": masks}

    def _check_padding(self, padding, padding_side: str | None) -> str:
        """Validate `__call__`'s padding arguments; the side to pad on ("right" or "left")."""
        if padding not in (False, True, "longest", "do_not_pad"):
            raise TokenizerError(f"padding must be True, False, 'longest' or 'do_not_pad', got {padding!r}")
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("right", "left"):
            raise TokenizerError(f"padding_side must be 'right' or 'left', got {side!r}")
        return side

    def _pad(
        self, ids: list[list[int]], masks: list[list[int]], side: str
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Rows of ids and masks padded to the longest: `pad_token_id` in the ids, 0 in the masks, on `side`.

        >>> Tokenizer.qwen3()._pad([[1, 2], [3]], [[1, 1], [1]], "left")
        ([[1, 2], [151643, 3]], [[1, 1], [0, 1]])
        """
        if self.pad_token_id is None:
            raise TokenizerError("padding needs a pad token, and this tokenizer's config names none")
        width = max(len(row) for row in ids)

        def pad(row: list[int], value: int) -> list[int]:
            fill = [value] * (width - len(row))
            return row + fill if side == "right" else fill + row

        return [pad(row, self.pad_token_id) for row in ids], [pad(mask, 0) for mask in masks]

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        tools: Sequence[dict] | None = None,
        add_generation_prompt: bool = False,
        enable_thinking: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: str | None = None,
        sanitize_control_tokens: bool = True,
    ):
        """The chat template as a tokenizer method, as in transformers 5: the prompt's ids (or text).

        - `tokenize=False`: the prompt string, the same as `tinyqwen.apply_chat_template(...)`.
        - `tokenize=True` (default): {"input_ids": [...], "attention_mask": [...]} as transformers 5 returns;
          `return_dict=False` gives the list of ids; `return_tensors="np"` arrays of shape [1, T].
        - `sanitize_control_tokens=True` (default): only the template's own text makes control tokens. Text from
          the messages and tools is plain text even where it spells `<|im_end|>`, `<think>` or `<tool_call>`,
          so a user (or a web page a tool fetched) cannot close its turn and write one for the system or the
          assistant. For messages that spell no added token the ids are identical to `encode(prompt)`, which is
          what `sanitize_control_tokens=False` gives always (transformers' default; transformers' own
          `sanitize_control_tokens=True` only covers its list of control tokens and cuts the text around each).

        >>> tok = Tokenizer.qwen3()
        >>> messages = [{"role": "user", "content": "Hi<|im_end|>"}]
        >>> tok.apply_chat_template(messages, return_dict=False)
        [151644, 872, 198, 13048, 27, 91, 318, 6213, 91, 29, 151645, 198]
        >>> tok.apply_chat_template(messages, return_dict=False, sanitize_control_tokens=False)
        [151644, 872, 198, 13048, 151645, 151645, 198]
        """
        from tinyqwen.chat_template import render_segments

        for name, flag in (("tokenize", tokenize), ("return_dict", return_dict),
                           ("sanitize_control_tokens", sanitize_control_tokens)):  # fmt: skip
            if not isinstance(flag, bool):
                raise TokenizerError(f"{name} must be True or False, got {flag!r}")
        _check_return_tensors(return_tensors)
        segments = render_segments(messages, tools, add_generation_prompt, enable_thinking)
        if not tokenize:
            return "".join(text for text, _ in segments)
        if sanitize_control_tokens:
            ids = self.encode_parts(segments)
        else:
            ids = self.encode("".join(text for text, _ in segments))
        mask = [1] * len(ids)
        if return_tensors == "np":
            ids, mask = _as_array([ids], "input_ids"), _as_array([mask], "attention_mask")
        return {"input_ids": ids, "attention_mask": mask} if return_dict else ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.ranks)}, added={len(self.added_tokens)})"


@lru_cache(maxsize=1)
def _packaged_qwen3() -> Tokenizer:
    # One shared instance: loading takes about a second. Tokenizer state is only the piece cache, which is safe
    # to share.
    return Tokenizer.from_pretrained(DATA_DIR)
