"""The package's import graph: no cycle, and no module importing a layer above its own.

Every `import` statement of every module in `tinyqwen/` and `backends/` counts, including the ones inside functions
(a deferred import hides a cycle from Python, not from a reader). The layers, bottom to top:

    foundation   errors, config (and the checkpoint a config implies), the file formats (safetensors, GGUF and its
                 quantized blocks), bf16,
                 blas_threads (how many threads OpenBLAS runs), heap (freed memory back to the system)
    reference    the readable kernels (norm, rope, attention, mlp, moe), sampling, the text side (tokenizer,
                 chat template and parsing, the chat's context window, thinking)
    contract     tinyqwen.backends.contract: the Backend dataclass
    backends     the numba and cupy backends and their helpers
    registry     tinyqwen.backends itself: get_backend, which imports a backend when asked for it
    model        kv_cache, model
    generation   generation, training gradients, the corpus, verify
    apps         cli, serve, bench, train, testing, quantize (the command that writes GGUF files)

A module may import its own layer or any layer below; within a layer the graph must still have no cycle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

LAYERS = [
    (
        "foundation",
        [
            "errors",
            "config",
            "safetensors",
            "checkpoint",
            "bf16",
            "blas_threads",
            "heap",
            "hub",
            "gguf",
            "quantization",
            "gguf_checkpoint",
        ],
    ),
    (
        "reference",
        [
            "norm",
            "rope",
            "attention",
            "mlp",
            "moe",
            "sampling",
            "tokenizer",
            "chat_template",
            "chat_parsing",
            "chat_context",
            "thinking",
        ],
    ),  # fmt: skip
    ("contract", ["backends.contract"]),
    ("backends", ["backends.*"]),
    ("registry", ["backends"]),
    ("model", ["kv_cache", "model"]),
    ("generation", ["generation", "grad", "corpus", "verify"]),
    ("apps", ["cli", "serve", "bench", "train", "testing", "quantize"]),
]


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for the installed layout: backends/ is tinyqwen.backends."""
    found = {}
    for root, prefix in ((REPO / "tinyqwen", "tinyqwen"), (REPO / "backends", "tinyqwen.backends")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def layer_of(module: str) -> int:
    """Index into LAYERS of a tinyqwen module (a subpackage's modules share its layer)."""
    name = module.removeprefix("tinyqwen").lstrip(".")
    if name == "":
        return -1  # the package's __init__ only names things lazily
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for pattern in names:
            if pattern.endswith(".*"):
                hit = name.startswith(pattern[:-1])
            else:
                hit = name == pattern or name.startswith(pattern + ".")
            if hit and best is None:
                best = i
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The tinyqwen modules `path` imports, anywhere in the file."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            # `from tinyqwen import attention`: a submodule; `from tinyqwen.x import name`: the module x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        colour[node] = "black"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_through_a_deferred_import(tmp_path):
    # the checker itself: a cycle closed by an import inside a function is still a cycle
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from tinyqwen.model import Qwen3\n")
    assert imports_of("tinyqwen.kv_cache", src, {"tinyqwen.model", "tinyqwen.kv_cache"}) == {"tinyqwen.model"}


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


@pytest.mark.parametrize("module", sorted(module_files()))
def test_no_upward_import(module):
    graph = import_graph()
    mine = layer_of(module)
    upward = [f"{m} ({LAYERS[layer_of(m)][0]})" for m in sorted(graph[module]) if layer_of(m) > mine]
    assert not upward, f"{module} ({LAYERS[mine][0]}) imports a layer above its own: {', '.join(upward)}"


def test_a_checkout_imports_its_own_backends_without_installing():
    # as a notebook does: the repository on sys.path, and no installed mapping to fall back on
    import subprocess
    import sys

    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
        f"sys.path.insert(0, {str(REPO)!r}); "
        "import tinyqwen.backends.contract, tinyqwen.backends as b; print(b.__file__); "
        "print(b.get_backend('numpy').name)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(REPO / "backends" / "__init__.py"), "numpy"]


def test_pyproject_lists_every_package_of_the_tree():
    # pyproject names the packages one by one (backends/ is mapped to tinyqwen.backends, which a find cannot do):
    # a new subpackage left out of the list would be missing from the wheel, and only an install would show it
    import re

    text = (REPO / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; the project supports 3.10)
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*?)\]", text, re.M | re.S).group(1)))
    found = {name for name, path in module_files().items() if path.name == "__init__.py"}
    assert listed == found, (
        f"missing from pyproject: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
    )


MAX_MODULE_LINES = 600


@pytest.mark.parametrize("module", sorted(module_files()))
def test_one_room_per_concept(module):
    # a module a reader can take in whole: past ~600 lines it holds several concepts and should be split, unless it
    # is one concept that does not split, and its docstring says so ("One concept: ...")
    path = module_files()[module]
    lines = len(path.read_text().splitlines())
    if lines > MAX_MODULE_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "One concept:" in doc, (
            f"{path.relative_to(REPO)} has {lines} lines (over {MAX_MODULE_LINES}): split it by concept, or say "
            "in its docstring why it is one ('One concept: ...')"
        )
