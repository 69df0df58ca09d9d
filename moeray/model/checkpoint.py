"""A Hugging Face-format checkpoint (a local directory or a hub id): its config and an index of its safetensors tensors.

Everything here reads only file headers, so it is cheap enough to run in the driver before any actor starts:
a bad checkpoint is rejected at load with a clear error, and no actor is left behind. A hub id (``org/name[@rev]``)
is resolved through huggingface_hub's cache by ``moeray.model.hub``: headers are read without downloading shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from moeray.model.hub import HubFile, HubSource


# bytes per element by safetensors dtype code
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """The checkpoint directory cannot be served; the message says why."""


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    file: str  # absolute path of the .safetensors file
    key: str  # tensor name inside it
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16"
    # A hub checkpoint's shard (``file`` is then where it lies or will lie in this node's snapshot directory);
    # whoever opens the location downloads it first (TensorReader).
    hub: HubFile | None = None

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * _ITEMSIZE[self.dtype]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint:
    path: str
    config: PretrainedConfig
    tensors: dict[str, TensorLocation]  # checkpoint key -> where it lies
    hub: HubSource | None = None  # set for a hub checkpoint; ``path`` is then its snapshot directory on this node

    @property
    def ref(self) -> str:
        """What another process passes to ``open_checkpoint`` to open this same checkpoint (a hub id pinned to the
        commit read here, or the directory)."""
        return self.path if self.hub is None else self.hub.ref

    @property
    def name(self) -> str:
        """The model's name: the repository's (``name`` of ``org/name``), else the directory's."""
        return os.path.basename(self.path.rstrip("/")) if self.hub is None else self.hub.name

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
    """Read config.json and every safetensors header of a checkpoint directory or hub id (``org/name[@revision]``;
    an existing directory wins); raise CheckpointError if unusable."""
    import transformers  # NOTE: here, not at the top: expert workers import this module without needing it
    from transformers import AutoConfig

    from moeray.model import hub  # NOTE: hub imports this module

    ref = hub.parse_model_ref(path)
    snapshot = hub.resolve(ref) if isinstance(ref, hub.HubRef) else None
    root = ref if snapshot is None else snapshot.directory
    label = repr(str(root)) if snapshot is None else snapshot.source.ref  # for messages
    if not (root / "config.json").is_file():
        raise CheckpointError(f"{label} has no config.json; expected a Hugging Face-format checkpoint")
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"config.json in {label} is not a model transformers {transformers.__version__} "
                              f"supports: {e}") from None
    tensors: dict[str, TensorLocation] = {}
    if snapshot is None:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{str(root)!r} has no *.safetensors files")
        for file in files:
            for key, meta in _read_header(file).items():
                tensors[key] = TensorLocation(str(file.resolve()), key, tuple(meta["shape"]), meta["dtype"])
    else:  # NOTE: a shard's path stays in the snapshot directory: resolving its link would name a blob
        for name, header in hub.shard_headers(snapshot, hub.shard_names(snapshot)).items():
            where = hub.HubFile(snapshot.source, name)
            for key, meta in header.items():
                tensors[key] = TensorLocation(str(root / name), key, tuple(meta["shape"]), meta["dtype"], where)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        expected = set(json.loads(index.read_text()).get("weight_map", {}))
        missing = sorted(expected - tensors.keys())
        if missing:
            raise CheckpointError(f"{label} is missing {len(missing)} tensors its index names, e.g. {missing[0]}")
    return Checkpoint(path=str(root.resolve() if snapshot is None else root), config=config, tensors=tensors,
                      hub=None if snapshot is None else snapshot.source)
