"""tinyqwen.heap: a prefill's freed temporaries go back to the system (glibc), and only a prefill asks for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tinyqwen
import tinyqwen.model
from tinyqwen.heap import _malloc_trim, release_freed_memory

FIXTURES = Path(__file__).parent / "fixtures"


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(
    _malloc_trim() is None or not Path("/proc/self/status").exists(), reason="glibc on Linux only"
)
def test_freed_heap_blocks_leave_the_resident_memory():
    # glibc's dynamic mmap threshold: once a 16 MiB mmapped block is freed, blocks up to 16 MiB come from the heap,
    # and the heap keeps up to 32 MiB free at its top. Eight 1 MiB temporaries below a live one then stay resident
    # after they are freed — until release_freed_memory hands their pages back
    np.ones(16 << 18, np.float32)  # 16 MiB, freed at once
    temporaries = [np.ones(1 << 18, np.float32) for _ in range(8)]  # 8 x 1 MiB, every page touched
    keep = np.ones(1 << 10, np.float32)  # noqa: F841 (a live block above them: the heap's top cannot shrink)
    del temporaries
    before = _anon_kib()
    release_freed_memory()
    assert before - _anon_kib() >= 6 << 10, (before, _anon_kib())


def test_only_a_prefill_releases(monkeypatch):
    calls = []
    monkeypatch.setattr(tinyqwen.model, "release_freed_memory", lambda: calls.append(1))
    model = tinyqwen.load_model(FIXTURES / "dense-tied")
    cache = model.new_cache(1, 8)
    first = model.forward(np.array([[1, 2, 3]]), cache=cache).logits
    assert len(calls) == 1
    model.forward(np.array([[4]]), cache=cache)
    assert len(calls) == 1  # a decode step's temporaries are a few KiB: nothing to hand back
    monkeypatch.undo()  # and the logits are the same with the real call
    assert np.array_equal(model.forward(np.array([[1, 2, 3]]), cache=model.new_cache(1, 8)).logits, first)
