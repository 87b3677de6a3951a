"""A checkpoint folder: the tensors of a Hugging Face checkpoint by name, in one safetensors file or in shards.

Big models are split into shards of a few GB each, with an index that says which file holds which tensor:

    model.safetensors.index.json   {"metadata": {"total_size": ...}, "weight_map": {tensor name: shard file}}
    model-00001-of-00002.safetensors, model-00002-of-00002.safetensors

`Checkpoint` opens either layout and reads every tensor through `tinyqwen.safetensors` (the file format itself).
The index is untrusted input like the files: a shard outside the folder, a tensor listed twice or a missing shard is
refused in one line naming the index file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from tinyqwen.errors import CheckpointError, SafetensorsError
from tinyqwen.safetensors import SafetensorsFile, TensorInfo, not_found_message, unique_keys

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _read_index(index_path: Path, directory: Path) -> tuple[dict[str, Path], dict]:
    """Parse `model.safetensors.index.json`: ({tensor name: shard path}, metadata)."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: not a readable JSON file ({e})") from None
    except SafetensorsError as e:  # a tensor listed twice would name two shards: ambiguous
        raise CheckpointError(f"{index_path}: {e}") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f'{index_path}: expected a JSON object with a "weight_map" object')
    weight_map = index["weight_map"]
    if not weight_map:
        raise CheckpointError(f"{index_path}: weight_map is empty")
    metadata = index.get("metadata") or {}
    shards: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}] must be a file name, got {shard!r}")
        shard_path = (directory / shard).resolve()
        if directory.resolve() not in shard_path.parents:  # untrusted: no "../../etc/passwd"
            raise CheckpointError(
                f"{index_path}: shard {shard!r} of tensor {name!r} is outside the directory"
            )
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard!r} (for tensor {name!r}) does not exist")
        shards[name] = directory / shard
    return shards, metadata


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory, by name, across however many files they are split into.

    The layouts, in the order `transformers` looks for them:
      * `model.safetensors` — everything in one file;
      * `model.safetensors.index.json` + shards — `{"metadata": {...}, "weight_map": {tensor: shard file}}`;
      * (a convenience) any other `*.safetensors` files in the directory and no index, or a single file path.

    All shard headers are read and cross-checked on open (cheap: a few MB even for a 30B model), so a broken
    checkpoint fails before minutes of loading; the data of each shard is memory-mapped on first use.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory)
        self.metadata: dict = {}
        if self.path.is_file():
            locations = None
            self.files = [self.path]
        elif not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        elif (self.path / SINGLE_FILE).is_file():
            locations = None
            self.files = [self.path / SINGLE_FILE]
        elif (self.path / INDEX_FILE).is_file():
            locations, self.metadata = _read_index(self.path / INDEX_FILE, self.path)
            self.files = sorted(set(locations.values()))
        else:
            self.files = sorted(self.path.glob("*.safetensors"))
            locations = None
            if not self.files:
                raise CheckpointError(
                    f"{self.path}: no {SINGLE_FILE}, no {INDEX_FILE}, and no *.safetensors files"
                )

        self._shards: dict[Path, SafetensorsFile] = {}
        try:
            for file in self.files:
                self._shards[file] = SafetensorsFile(file)  # header only; mapped lazily
            self._where = self._locate(locations)
        except BaseException:
            self.close()
            raise

    def _locate(self, index: dict[str, Path] | None) -> dict[str, Path]:
        """{tensor name: file}, checked against the headers: each listed tensor in its shard, and in only one."""
        where: dict[str, Path] = {}
        for file, shard in self._shards.items():
            for name in shard.keys():
                if name in where:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is in two files: {where[name]} and {file}"
                    )
                if index is not None and name in index and index[name] != file:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is in shard {file.name} but the index says {index[name].name}"
                    )
                where[name] = file
        if index is None:
            return where
        for name, file in index.items():
            if where.get(name) != file:
                raise CheckpointError(
                    f"{self.path}: the index puts tensor {name!r} in {file.name}, which lacks it"
                )
        # Tensors in a shard but not in the index are left out: the index is the table of contents.
        return dict(index)

    def keys(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _shard(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise CheckpointError(not_found_message(name, self._where, f"checkpoint {self.path}"))
        return self._shards[self._where[name]]

    def info(self, name: str) -> TensorInfo:
        return self._shard(name).info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype, e.g. "BF16" (`get` returns it widened to float32)."""
        return self.info(name).dtype

    def get(self, name: str) -> np.ndarray:
        return self._shard(name).get(name)

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16 bit patterns): a read-only view of its file, nothing copied."""
        return self._shard(name).raw(name)

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor as stored, read into a new array of process memory, or `out` (see `SafetensorsFile.read`)."""
        return self._shard(name).read(name, out)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._where)} tensors in {len(self.files)} files)"
