"""A local Hugging Face-format checkpoint directory: its config and an index of its safetensors tensors.

Everything here reads only file headers, so it is cheap enough to run in the driver before any actor starts:
a bad checkpoint is rejected at load with a clear error, and no actor is left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import transformers
from transformers import AutoConfig, PretrainedConfig


class CheckpointError(ValueError):
    """The checkpoint directory cannot be served; the message says why."""


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    file: str  # absolute path of the .safetensors file
    key: str  # tensor name inside it
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint:
    path: str
    config: PretrainedConfig
    tensors: dict[str, TensorLocation]  # checkpoint key -> where it lies

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def has_tokenizer(self) -> bool:
        return any((Path(self.path) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def _read_header(file: Path) -> dict:
    """Parse one safetensors header and check that the file holds every byte the header promises."""
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{file} is truncated: header of {header_len} bytes, file of {size}")
        try:
            header = json.loads(f.read(header_len))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file} has a corrupt safetensors header: {e}") from None
    header.pop("__metadata__", None)
    data_end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(
            f"{file} is truncated: its tensors need {8 + header_len + data_end} bytes, the file has {size}"
        )
    return header


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read config.json and every safetensors header of a checkpoint directory; raise CheckpointError if unusable."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {str(root)!r} does not exist")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{str(root)!r} has no config.json; expected a Hugging Face-format checkpoint")
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"config.json in {str(root)!r} is not a model transformers {transformers.__version__} "
                              f"supports: {e}") from None
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(root)!r} has no *.safetensors files")
    tensors: dict[str, TensorLocation] = {}
    for file in files:
        for key, meta in _read_header(file).items():
            tensors[key] = TensorLocation(str(file.resolve()), key, tuple(meta["shape"]), meta["dtype"])
    index = root / "model.safetensors.index.json"
    if index.is_file():
        expected = set(json.loads(index.read_text()).get("weight_map", {}))
        missing = sorted(expected - tensors.keys())
        if missing:
            raise CheckpointError(f"{str(root)!r} is missing {len(missing)} tensors its index names, e.g. {missing[0]}")
    return Checkpoint(path=str(root.resolve()), config=config, tensors=tensors)
