"""Every error tinyqwen raises on bad input is a `TinyQwenError`, with a message that names the problem.

The command line catches `TinyQwenError` and prints its message as one line; anything else is a bug in tinyqwen.
"""


class TinyQwenError(Exception):
    """Base class for errors caused by the user's input (files, ids, arguments)."""


class ConfigError(TinyQwenError):
    """A config.json or generation_config.json that tinyqwen cannot use."""


class CheckpointError(TinyQwenError):
    """A checkpoint directory or weight file that is missing, malformed or does not fit the config."""


class SafetensorsError(CheckpointError):
    """A .safetensors file that does not follow the format (header, dtypes, offsets)."""


class TokenizerError(TinyQwenError):
    """Missing or malformed tokenizer files, or ids outside the vocabulary."""


class ChatTemplateError(TinyQwenError):
    """Messages the official chat template would reject or mangle."""


class ToolCallParseError(TinyQwenError):
    """A <tool_call> block whose body is not valid JSON of the expected shape."""


class GenerationError(TinyQwenError):
    """Bad generation arguments: prompt longer than the context, unknown backend, bad sampling values."""


class BackendError(TinyQwenError):
    """An unknown backend name, or a backend whose libraries (numba, cupy, a GPU) are not available here."""


class GGUFError(CheckpointError):
    """A .gguf file that does not follow the format (header, metadata, tensor infos, offsets) or that tinyqwen
    cannot run (an unsupported tensor type, a missing key)."""
