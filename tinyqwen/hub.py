"""Finding a checkpoint by name: a local directory, a Hugging Face id in the local cache, or a download.

`--model` takes any of

    ./my-checkpoint              a directory in the Hugging Face layout (config.json + *.safetensors)
    Qwen/Qwen3-0.6B              a Hub id: first looked up in the local Hugging Face cache
                                 ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub), then, with the
                                 optional `huggingface_hub` package and a network, downloaded (with progress bars)

The cache layout is Hugging Face's: `models--Qwen--Qwen3-0.6B/refs/main` holds a commit hash and
`models--Qwen--Qwen3-0.6B/snapshots/<hash>/` holds the files. We read it by hand so that a cached model works with
no extra package installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from pathlib import Path

from tinyqwen.errors import CheckpointError

# what a checkpoint needs: config, generation config, weights, tokenizer
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.jinja", "LICENSE", "README.md"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, honouring the same environment variables as huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_snapshot(model_id: str, revision: str = "main", cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of `model_id`, or None when it is not in the cache.

    >>> cached_snapshot("Qwen/Qwen3-0.6B", cache_dir=Path("/nonexistent")) is None
    True
    """
    repo = (cache_dir or hf_cache_dir()) / ("models--" + model_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / revision
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
    elif (snapshots / revision).is_dir():  # a commit hash given as the revision
        candidate = snapshots / revision
    else:  # no ref file (e.g. copied caches): the most recently written snapshot with a config
        found = sorted(
            (p for p in snapshots.iterdir() if (p / "config.json").is_file()), key=os.path.getmtime
        )
        candidate = found[-1] if found else None
    if candidate is None or not (candidate / "config.json").is_file():
        return None
    return candidate


def is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TINYQWEN_OFFLINE")
    )


def resolve_model(name: str | os.PathLike, revision: str = "main", download: bool = True) -> Path:
    """Turn a `--model` value into a local checkpoint directory, or raise CheckpointError saying what to do."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a directory but has no config.json: not a Hugging Face checkpoint"
            )
        return path
    if (
        path.is_file() and path.suffix.lower() == ".gguf"
    ):  # a llama.cpp file: config, tokenizer and weights in one
        return path
    if path.exists():
        raise CheckpointError(
            f"--model {text}: expected a checkpoint directory (or a .gguf file), got a file"
        )
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(
            f"--model {text}: no such directory (and it is not a Hugging Face id like Qwen/Qwen3-0.6B)"
        )

    snapshot = cached_snapshot(text, revision)
    if snapshot is not None:
        return snapshot
    how = f"{download_command(text)}  (or pass a local checkpoint directory to --model)"
    where = f"not a local directory and not in the Hugging Face cache ({hf_cache_dir()})"
    if not download or is_offline():
        raise CheckpointError(
            f"model {text!r} is {where}, and downloads are off (offline); to get it run: {how}"
        )
    if importlib.util.find_spec("huggingface_hub") is None:
        raise CheckpointError(f"model {text!r} is {where}; to download it run: {how}")
    return _download(text, revision, how)


def download_command(model_id: str) -> str:
    """The shell command that downloads `model_id` with the huggingface_hub installed here.

    huggingface_hub 0.34 added the `hf` command and 1.0 removed `huggingface-cli`, so the hint is read from the
    commands the installed version really declares; without huggingface_hub, a fresh install gets `hf`.
    """
    try:
        commands = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points}
    except importlib.metadata.PackageNotFoundError:
        return f'pip install "tinyqwen[hub]" && hf download {model_id}'
    if "hf" not in commands and "huggingface-cli" in commands:
        return f"huggingface-cli download {model_id}"
    return f"hf download {model_id}"


def _download(model_id: str, revision: str, how: str) -> Path:
    """Download with huggingface_hub (it draws a tqdm progress bar per file)."""
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(
            model_id, revision=revision, allow_patterns=DOWNLOAD_PATTERNS
        )
    except Exception as error:  # network, auth, unknown repo: all end the same way for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"could not download {model_id!r} ({reason}); try: {how}") from None
    return Path(folder)


OFFICIAL_DEFAULT = "Qwen/Qwen3-0.6B"


def official_checkpoint(model_id: str = OFFICIAL_DEFAULT) -> Path | None:
    """A real official checkpoint already on this machine, for the course's notebooks; None when there is none.

    Looks at `$TINYQWEN_MODEL` (a checkpoint directory, or a Hub id found in the cache), then the Hugging Face
    cache for `model_id`. Never downloads: a notebook must run offline, so it falls back to the repo's fixtures.

    >>> import os; os.environ.pop("TINYQWEN_MODEL", None) and None
    >>> official_checkpoint("nobody/not-a-model") is None
    True
    """
    wanted = os.environ.get("TINYQWEN_MODEL", "").strip()
    if wanted:
        path = Path(wanted).expanduser()
        if (path / "config.json").is_file():
            return path
        if _HUB_ID.match(wanted):
            return cached_snapshot(wanted)
        return None
    return cached_snapshot(model_id)


def is_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hugging Face model id ("owner/name"), not as a path.

    >>> is_hub_id("Qwen/Qwen3-0.6B"), is_hub_id("./ckpt"), is_hub_id("~/models/x"), is_hub_id("ckpt")
    (True, False, False, False)
    """
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))
