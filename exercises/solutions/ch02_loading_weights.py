"""Chapter 2 solutions: thin adapters over tinyqwen's own loader (tinyqwen/safetensors.py, tinyqwen/model.py)."""

from __future__ import annotations

import os
import struct

import numpy as np

from tinyqwen import bf16
from tinyqwen import safetensors as st
from tinyqwen.checkpoint import Checkpoint
from tinyqwen.config import config_from_dict, expected_tensors


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    infos, metadata = st.read_header(path)  # validated; positions are absolute
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
    header: dict = {"__metadata__": metadata} if metadata else {}
    for name, t in infos.items():
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [t.start - data_start, t.end - data_start],
        }
    return header, data_start


def bf16_to_float32(u16: np.ndarray) -> np.ndarray:
    return bf16.bf16_to_float32(u16)


def read_tensor(path: str | os.PathLike, name: str) -> np.ndarray:
    with st.SafetensorsFile(path) as f:
        return f.get(name)


def map_tensor(path: str | os.PathLike, name: str) -> np.ndarray:
    with st.SafetensorsFile(path) as f:
        return f.raw(name)  # a view of the mapping; it keeps the mapping alive after close()


def load_checkpoint(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    with Checkpoint(directory) as checkpoint:
        return {name: checkpoint.get(name) for name in sorted(checkpoint.keys())}


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    return expected_tensors(config_from_dict(config))
