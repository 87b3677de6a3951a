"""backends/numba/kernel_cache.py: a saved kernel is recompiled when ANY file of its package changes.

Numba stamps a cached kernel with its own file only; a kernel that calls a function of another file holds that
function's old machine code after the other file is edited. These tests run the real Numba cache in a
subprocess on a two-file package, edit the called file, and check the caller's result changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

from tinyqwen.backends.numba import kernel_cache, norm_rope  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_the_packages_kernels_are_stamped_with_the_whole_package():
    locator = norm_rope._rms_norm._cache._impl.locator
    assert isinstance(locator, kernel_cache.PackageStamp)
    own, package = locator.get_source_stamp()
    assert package == kernel_cache.package_digest(kernel_cache.PACKAGE_DIR)
    assert own is not None  # Numba's stamp of the file itself is kept beside it


def test_the_digest_changes_when_any_file_of_the_package_changes(tmp_path):
    for path in kernel_cache.PACKAGE_DIR.glob("*.py"):
        shutil.copy(path, tmp_path / path.name)
    before = kernel_cache.package_digest.__wrapped__(tmp_path)
    assert before == kernel_cache.package_digest(kernel_cache.PACKAGE_DIR)  # same bytes, same digest
    avx2 = tmp_path / "avx2.py"
    avx2.write_text(avx2.read_text() + "\n# edited\n")
    edited = kernel_cache.package_digest.__wrapped__(tmp_path)
    (tmp_path / "new_kernel.py").write_text("x = 1\n")
    added = kernel_cache.package_digest.__wrapped__(tmp_path)
    assert len({before, edited, added}) == 3


def _write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def _run(tmp_path: Path, locators: str) -> str:
    script = textwrap.dedent(
        f"""
        import tinyqwen.backends.numba  # installs the package's locators; then this test's own
        from numba.core import config
        config.CACHE_LOCATOR_CLASSES = {locators!r}
        import pkg.b
        print(pkg.b.twice(), type(pkg.b.twice._cache._impl.locator).__name__)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "NUMBA_CACHE_DIR": ""}
    env.pop("NUMBA_CACHE_LOCATOR_CLASSES", None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_editing_a_called_file_recompiles_its_caller(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write(pkg / "a.py", "from numba import njit\n\n@njit(cache=True)\ndef value():\n    return 1\n")
    _write(
        pkg / "b.py",
        "from numba import njit\nfrom pkg.a import value\n\n@njit(cache=True)\ndef twice():\n    return 2 * value()\n",
    )
    _write(
        tmp_path / "lc.py",
        """
        from pathlib import Path
        from tinyqwen.backends.numba.kernel_cache import PackageStamp, locator_classes

        class Stamp(PackageStamp):
            package = Path(__file__).resolve().parent / "pkg"

        PackageUserProvidedCacheLocator, PackageInTreeCacheLocator, PackageUserWideCacheLocator = locator_classes(Stamp)
        """,
    )
    locators = "lc.PackageInTreeCacheLocator,numba.core.caching.InTreeCacheLocator"
    assert _run(tmp_path, locators) == ["2", "PackageInTreeCacheLocator"]
    assert list((pkg / "__pycache__").glob("b.twice-*.nbi")), "the caller's kernel was saved"
    # edit only the called file (a different size, so Python's own .pyc check sees it too)
    _write(pkg / "a.py", "from numba import njit\n\n@njit(cache=True)\ndef value():\n    return 37\n")
    # b.py is untouched, yet its saved kernel must be recompiled with the new value(). (With Numba's own locator
    # alone, numba 0.68, the same run prints 2: b's saved kernel, value() = 1 compiled in.)
    assert _run(tmp_path, locators)[0] == "74"


def test_functions_outside_the_package_keep_numbas_own_cache(tmp_path):
    _write(
        tmp_path / "outside.py", "from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import outside
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("outside", None)
    locator = outside.f._cache._impl.locator
    assert not isinstance(locator, kernel_cache.PackageStamp)
    assert type(locator).__name__ == "InTreeCacheLocator"


# --- the lean start: saved kernels load without Numba's runtime compile or its registries ---------------------------

EXTERNAL_IR = """
declare i32 @tinyqwen_no_such_symbol(i32)
declare extern_weak i32 @a_weak_one(i32)
define i32 @defined_here(i32 %x) {
  %y = call i32 @tinyqwen_no_such_symbol(i32 %x)
  %z = call i32 @a_weak_one(i32 %y)
  %w = call i32 @PyErr_Occurred_alias(i32 %z)
  ret i32 %w
}
declare i32 @PyErr_Occurred_alias(i32)
"""


def _object(ir: str) -> bytes:
    import llvmlite.binding as ll

    ll.initialize_native_target()
    ll.initialize_native_asmprinter()
    machine = ll.Target.from_default_triple().create_target_machine()
    obj = machine.emit_object(ll.parse_assembly(ir))
    if obj[:6] != b"\x7fELF\x02\x01":
        pytest.skip(
            "this platform's objects are not ELF64 little-endian (the lean start then refreshes first)"
        )
    return obj


def test_undefined_symbols_reads_an_objects_symbol_table():
    obj = _object(EXTERNAL_IR)
    # the defined function is not listed, the weak one may stay unresolved (it is not listed either)
    assert sorted(kernel_cache.undefined_symbols(obj)) == ["PyErr_Occurred_alias", "tinyqwen_no_such_symbol"]
    assert kernel_cache.undefined_symbols(b"\xcf\xfa\xed\xfe" + obj[4:]) is None  # Mach-O's magic: not read
    assert kernel_cache.undefined_symbols(obj[:100]) is None  # truncated: no section headers


def test_a_kernel_is_loaded_lean_only_when_every_symbol_it_needs_is_known():
    norm_rope.rms_norm(
        np.ones((1, 4), np.float32), np.ones(4, np.float32), 1e-6
    )  # the runtime's C API registered
    hooks = []

    def payload(ir, kind="object"):
        return (
            ("lib", kind, (_object(ir), b"")),
            None,
            None,
            None,
            False,
            (),
            "",
            [lambda: hooks.append(1)],
            (),
        )

    known = "declare i8* @PyErr_Occurred()\ndeclare void @NRT_Free(i8*)\n" + (
        "define void @f(i8* %p) {\n  %e = call i8* @PyErr_Occurred()\n  call void @NRT_Free(i8* %p)\n  ret void\n}\n"
    )
    assert kernel_cache._known_to_linker(payload(known))
    assert hooks == [1]  # the kernel's reload hooks (the parallel runtime's start) ran before the check
    assert not kernel_cache._known_to_linker(payload(EXTERNAL_IR))  # an unknown symbol: Numba's full path
    assert not kernel_cache._known_to_linker(payload(known, kind="bitcode"))


LEAN_SCRIPT = """
import sys
import numpy as np
import numba
from numba.core.runtime import nrt
from tinyqwen.backends.numba.norm_rope import rms_norm
from tinyqwen.norm import rms_norm as reference

x, w = np.linspace(-2, 2, 24, dtype=np.float32).reshape(3, 8), np.linspace(0.5, 1.5, 8, dtype=np.float32)
ok = np.allclose(rms_norm(x, w, 1e-6), reference(x, w, 1e-6), rtol=1e-6, atol=1e-6)
print(int(ok), int(nrt.rtsys._library is None), int("numba.np.linalg" in sys.modules))

@numba.njit
def fresh(a):  # compiled in this process: its arrays need the runtime module, compiled now
    b = a.copy()
    return (b * 2).sum()

print(int(fresh(x) == 2 * x.sum()), int(nrt.rtsys._library is not None))
"""


@pytest.mark.parametrize("lean", ["1", "0"])
def test_a_saved_kernel_loads_without_starting_numbas_compiler(lean):
    env = {**os.environ, "PYTHONPATH": str(REPO), kernel_cache.LEAN_START_ENV: lean}

    def run() -> list[str]:
        out = subprocess.run(
            [sys.executable, "-c", LEAN_SCRIPT], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    run()  # a cold cache compiles rms_norm here (Numba's whole start); the next process loads it
    result, no_runtime_module, registries, fresh_ok, runtime_module = run()
    assert (result, fresh_ok, runtime_module) == (
        "1",
        "1",
        "1",
    )  # same values, and a compile still works after
    # (the tinyqwen.norm reference: float32 rtol 1e-6, a sum of 8 squares and one rsqrt per row)
    if lean == "1":
        assert (no_runtime_module, registries) == ("1", "0"), "the saved kernel started Numba's compiler"
    else:  # switched off: Numba's own start, the runtime compiled and every registry imported at the first load
        assert (no_runtime_module, registries) == ("0", "1")


def test_a_saved_function_outside_the_package_loads_as_numba_loads_it(tmp_path):
    _write(
        tmp_path / "outside.py",
        "from numba import njit\n\n@njit(cache=True)\ndef f(a):\n    return a.sum()\n",
    )
    script = (
        "import numpy as np, tinyqwen.backends.numba, outside\nfrom numba.core.runtime import nrt\n"
        "print(outside.f(np.arange(4.0)), int(nrt.rtsys._library is not None), sum(outside.f.stats.cache_hits.values()))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "NUMBA_CACHE_DIR": ""}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    value, runtime_module, hits = runs[1].stdout.split()
    assert (value, runtime_module) == (
        "6.0",
        "1",
    )  # Numba's own start: its runtime module compiled at the load
    assert hits == "1"  # and it did come from the cache
