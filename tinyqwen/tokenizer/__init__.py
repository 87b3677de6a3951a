"""The tokenizer. Text in, token ids out (and back), exactly as Qwen3 was trained.

Qwen3 uses the Qwen2 byte-level BPE: 151,643 regular tokens learned by byte-pair encoding, plus 26 added tokens
(`<|im_start|>`, `<think>`, ...) with ids 151643..151668. Encoding a string is a pipeline of small steps, each in
its own module of this package:

    "Hi <think>ça"
      1. added tokens, matched in the raw text    ["Hi ", <think>=151667, "ça"]                  wrapper.py
      2. NFC normalisation of the other parts     "ça" stays "ça" (a decomposed "c" + U+0327     pretokenize.py
                                                  would become "ç")
      3. the split regex ("pre-tokenizer")        ["Hi", " "], ["ça"]                            pretokenize.py
      4. UTF-8 bytes, shown as printable chars    "ça" -> b"\\xc3\\xa7a" -> "Ã§a"               byte_level.py
      5. BPE: merge adjacent symbols by rank      ["Ã", "§", "a"] -> ["Ã§", "a"] -> ["Ã§a"]     bpe.py
      6. look the symbols up in the vocabulary    -> ids                                         wrapper.py

Decoding runs it backwards: ids -> symbols -> bytes -> UTF-8 text (streaming.py: token by token, never half a
character). files.py reads vocab.json, merges.txt, tokenizer_config.json and tokenizer.json; wrapper.py holds the
`Tokenizer` class that runs the steps. One wrong id puts the model off-distribution, so every step copies the
reference (Hugging Face `tokenizers`) exactly, quirks included; tests/test_tokenizer.py checks that on the
llama.cpp vectors, a megabyte of mixed text and random Unicode strings.

    tok = Tokenizer.qwen3()                      # the copy shipped in tinyqwen/data
    tok.encode("Hello world")                    # [9707, 1879]
    tok.decode([9707, 1879])                     # 'Hello world'
    for step in tok.bpe_steps(" hello"): print(step)   # watch BPE at work

Added tokens written in text become control tokens by default (step 1), as in transformers. Text you did not
write yourself should not get that power, or typing "<|im_end|>" ends a turn (prompt injection):

    tok.encode("<|im_end|>")                             # [151645]: the control token
    tok.encode("<|im_end|>", allowed_special="none")     # [27, 91, 318, 6213, 91, 29]: plain text "<", "|", ...
    tok.encode_parts([(template_text, True), (user_text, False)])   # control tokens only from the trusted parts
    tok.apply_chat_template(messages)            # {"input_ids": ..., "attention_mask": ...}, messages' text plain

The transformers habits work too: `tok(text)` / `tok([texts], padding=True)`, `tok.batch_decode(rows)`,
`Tokenizer.from_pretrained("Qwen/Qwen3-0.6B")` (the Hugging Face cache) and `~` in paths.
"""

from tinyqwen.tokenizer.bpe import MergeStep, merge_steps, merge_symbols
from tinyqwen.tokenizer.byte_level import bytes_to_unicode, symbols_to_bytes, text_to_symbols
from tinyqwen.tokenizer.files import DATA_DIR, AddedToken, Merges
from tinyqwen.tokenizer.pretokenize import QWEN2_SPLIT_PATTERN, nfc, pre_tokenize, split_regex
from tinyqwen.tokenizer.streaming import StreamDecoder, incomplete_utf8_tail
from tinyqwen.tokenizer.wrapper import Tokenizer

__all__ = [
    "DATA_DIR",
    "QWEN2_SPLIT_PATTERN",
    "AddedToken",
    "MergeStep",
    "Merges",
    "StreamDecoder",
    "Tokenizer",
    "bytes_to_unicode",
    "incomplete_utf8_tail",
    "merge_steps",
    "merge_symbols",
    "nfc",
    "pre_tokenize",
    "split_regex",
    "symbols_to_bytes",
    "text_to_symbols",
]
