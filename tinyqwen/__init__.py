"""tinyqwen: the Qwen3 model family (dense and MoE) built from scratch in NumPy.

The public API, one name per job:

    model  = tinyqwen.load_model("path/to/Qwen3-0.6B")            # Hugging Face layout
    logits = model(ids)                                          # [T] -> [T, vocab]; [B, T] -> [B, T, vocab]
    tok    = tinyqwen.Tokenizer.from_pretrained("path/to/Qwen3-0.6B")
    text   = tinyqwen.apply_chat_template(messages, add_generation_prompt=True)
    new    = tinyqwen.generate(model, tok.encode(text), max_new_tokens=64)
    loss   = tinyqwen.load_balancing_loss(router_logits, num_experts, top_k)

Names are imported on first use, so `import tinyqwen` stays cheap and each chapter's module stands on its own.
"""

import importlib.util
import sys
from importlib import import_module
from pathlib import Path

__version__ = "0.1.0"


class _CheckoutBackends:
    """Finds `tinyqwen.backends` in a checkout: the course keeps the kernels in `backends/` at the top of the
    repository, beside `tinyqwen/`, and installing maps that folder to `tinyqwen.backends` (pyproject's
    package-dir). A checkout imported without installing (a notebook that puts the repository on sys.path), or a
    second checkout beside an editable install of the first, must get the `backends/` beside *this* `tinyqwen/`,
    so this finder is asked first. In an installed wheel there is no such folder and it answers None."""

    folder = Path(__file__).resolve().parent.parent / "backends"

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "tinyqwen.backends" or not (cls.folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, cls.folder / "__init__.py", submodule_search_locations=[str(cls.folder)]
        )


if not any(isinstance(f, type) and f.__name__ == "_CheckoutBackends" for f in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutBackends)

# public name -> module that defines it (one obvious place for each thing)
_API = {
    "load_model": "tinyqwen.model",
    "Qwen3": "tinyqwen.model",
    "Qwen3Config": "tinyqwen.config",
    "load_config": "tinyqwen.config",
    "load_balancing_loss": "tinyqwen.moe",
    "Tokenizer": "tinyqwen.tokenizer",
    "apply_chat_template": "tinyqwen.chat_template",
    "generate": "tinyqwen.generation",
    "generate_batch": "tinyqwen.generation",
    "stream_generate": "tinyqwen.generation",
    "split_thinking": "tinyqwen.chat_parsing",
    "parse_tool_calls": "tinyqwen.chat_parsing",
    "ToolCall": "tinyqwen.chat_parsing",
    "TinyQwenError": "tinyqwen.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(_API[name]), name)
        globals()[name] = value  # cache: the next lookup is a plain attribute
        return value
    raise AttributeError(f"module 'tinyqwen' has no attribute {name!r}")
