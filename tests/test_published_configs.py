"""`tinyqwen.config.published_configs`: the eight released Qwen3 configs, against the real files and independent counts.

Three independent checks, so that a fresh clone (no ../shared) still checks something real:
- the shipped official files are the Hub's bytes (sha256 pins of the Hub files, the same as ../shared's SHA256SUMS);
- where ../shared (or $TINYQWEN_SHARED) holds a real config.json, the function's config equals it on every field;
- every one of the eight gives exactly keras-hub's parameter count (keras-hub converted the official weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from tinyqwen.config import (
    CONFIG_DIR,
    FAMILY,
    KERAS_HUB_PARAMETER_COUNTS,
    OFFICIAL_CONFIG_FILES,
    PUBLISHED_CHANGES,
    count_parameters,
    load_config,
    published_configs,
)

REPO = Path(__file__).resolve().parents[1]

# sha256 of the official Hub config.json files, as pinned by third parties (a restore manifest of
# Qwen/Qwen3-4B@1cfa9a7… and Qwen/Qwen3-8B@b968826…, a models--Qwen--Qwen3-0.6B cache listing); ../shared's README
# says where each pin comes from.
HUB_SHA256 = {
    "Qwen3-0.6B": "660db3b73d788119c04535e48cf9be5f55bc3100841a718637ae695b442f27dd",
    "Qwen3-4B": "8ba006f74fecfaaeb392872a60f4a480e7ec9860153d2e1b769ec81f9a147f8a",
    "Qwen3-8B": "f7c4eadfbbf522470667b797a3c89be2524832d2d599797248dc304fff447c30",
}


def shared_models() -> Path | None:
    """../shared/qwen3-tokenizer/models (or under $TINYQWEN_SHARED), or None when there is none."""
    roots = [Path(os.environ["TINYQWEN_SHARED"])] if os.environ.get("TINYQWEN_SHARED") else []
    for root in [*roots, REPO.parent / "shared"]:
        if (root / "qwen3-tokenizer").is_dir():
            return root / "qwen3-tokenizer" / "models"
    return None


def test_family_order_and_names():
    family = published_configs()
    assert list(family) == list(FAMILY) and len(FAMILY) == 8
    assert set(OFFICIAL_CONFIG_FILES) | set(PUBLISHED_CHANGES) | {"Qwen3-30B-A3B"} == set(FAMILY)
    assert [n for n in FAMILY if family[n].is_moe] == ["Qwen3-30B-A3B", "Qwen3-235B-A22B"]


@pytest.mark.parametrize("name", OFFICIAL_CONFIG_FILES)
def test_shipped_official_files_are_the_hub_files(name):
    assert hashlib.sha256((CONFIG_DIR / f"{name}.json").read_bytes()).hexdigest() == HUB_SHA256[name]


def test_the_official_files_are_stored_once():
    """tinyqwen/data/configs is the one copy that tests, exercises, notebooks and reference makers read; the test
    fixtures keep only what is theirs (fixture configs, transformers' re-saves, invalid files)."""
    fixtures = REPO / "tests" / "fixtures" / "configs"
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.json"))
    assert shipped == sorted(f"{n}.json" for n in (*OFFICIAL_CONFIG_FILES, "Qwen3-30B-A3B"))
    assert not [name for name in shipped if (fixtures / name).exists()]


def test_published_configs_equal_the_real_files_in_shared():
    """Every model with a real config.json in ../shared: the function's config equals it on every field
    tinyqwen reads (all of Qwen3Config's fields; only `extra`, the keys tinyqwen ignores, is left out)."""
    models = shared_models()
    if models is None:
        pytest.skip(
            "no ../shared (or $TINYQWEN_SHARED) beside the repo; the shipped files are checked by sha256 instead"
        )
    files = sorted(models.glob("*/config.json"))
    assert files, f"{models} holds no */config.json"
    family = published_configs()
    mismatches = []
    for file in files:
        name = file.parent.name
        assert name in family, f"{name} has a real config.json but published_configs() does not list it"
        real, ours = load_config(file), family[name]
        for f in dataclasses.fields(real):
            if f.compare and getattr(real, f.name) != getattr(ours, f.name):
                mismatches.append(
                    f"{name}.{f.name}: real {getattr(real, f.name)!r}, ours {getattr(ours, f.name)!r}"
                )
    assert not mismatches, "\n".join(mismatches)
    assert {f.parent.name for f in files} >= set(OFFICIAL_CONFIG_FILES)


@pytest.mark.parametrize("name", FAMILY)
def test_parameter_counts_equal_keras_hub(name):
    """keras-hub's count of the official weights, to the last parameter: evidence for the four configs written
    from published values (a wrong width, depth or head count would change it)."""
    assert count_parameters(published_configs()[name]) == KERAS_HUB_PARAMETER_COUNTS[name]


def test_derived_configs_differ_from_their_sibling_only_where_listed():
    family = published_configs()
    for name, (sibling, changes) in PUBLISHED_CHANGES.items():
        differ = {
            f.name
            for f in dataclasses.fields(family[name])
            if f.compare and getattr(family[name], f.name) != getattr(family[sibling], f.name)
        }
        assert differ == set(changes), name
