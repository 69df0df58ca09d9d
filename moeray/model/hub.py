"""Hugging Face hub model references (``org/name[@revision]``), resolved through huggingface_hub's cache.

    "org/name@main" ─▶ resolve: revision -> commit, metadata files into the cache (config, generation config,
                       tokenizer, chat template, safetensors index); no weights
                    ─▶ shard_headers: each shard's safetensors header, by an HTTP range request (a cached shard's
                       own header when it is there; offline, only cached shards)
                    ─▶ TensorLocation(..., hub=HubFile(repo, commit, shard))   (moeray.model.checkpoint)
    TensorReader opens a location ─▶ HubFile.fetch: that one shard into this node's cache, if not there yet

So the driver indexes a checkpoint without downloading a weight shard, a router downloads the shards that hold
dense tensors and each worker only the shards that hold its experts. Every process reads the same snapshot: the
revision is pinned to a commit once, in the driver, and ``HubSource.ref`` (``org/name@<commit>``) is what other
processes open. huggingface_hub's own settings apply on every node: HF_HOME / HF_HUB_CACHE (where), HF_HUB_OFFLINE
(cache only), HF_TOKEN (private and gated repos), HF_ENDPOINT (a mirror); its progress bars show downloads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)
from huggingface_hub.utils import validate_repo_id

from moeray.model.checkpoint import CheckpointError, _read_header

log = logging.getLogger(__name__)

ACCEPTED = "a local checkpoint directory or a Hugging Face hub id org/name[@revision]"
# Everything a router or the ingress reads besides the weights. NOTE: no pattern may match a weight file.
METADATA_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "chat_template.json", "chat_template.jinja",
]
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^@\s]+))?$")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class HubSource:
    """One snapshot of a hub model repository. Pickleable: it travels to routers and workers."""

    repo_id: str
    commit: str  # 40 hex digits: a branch or tag resolved once, so every process reads the same files

    @property
    def ref(self) -> str:
        """What another process passes to ``open_checkpoint`` to open this very snapshot."""
        return f"{self.repo_id}@{self.commit}"

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class HubFile:
    """One file of a snapshot, maybe not downloaded yet (a ``TensorLocation`` of a hub checkpoint names it)."""

    source: HubSource
    filename: str  # relative to the repository root

    def fetch(self) -> str:
        """The file's path in this node's hub cache, downloading it first if it is not there (no network if it is)."""
        try:
            return hf_hub_download(self.source.repo_id, self.filename, revision=self.source.commit)
        except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, OSError) as e:
            raise _error(e, self.source.repo_id, self.source.commit, what=self.filename) from None


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A parsed ``org/name[@revision]``; ``revision`` None means the default branch."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A resolved hub reference: its metadata files are in ``directory`` (on this node); weight shards may not be."""

    source: HubSource
    directory: Path  # <hub cache>/models--org--name/snapshots/<commit>


def parse_model_ref(value: str | os.PathLike) -> Path | HubRef:
    """An existing local directory always wins; otherwise ``org/name`` or ``org/name@revision`` is a hub id."""
    local = Path(value).expanduser()
    if local.is_dir():
        return local
    text = os.fspath(value)
    match = _HUB_ID.match(text) if isinstance(text, str) and not isinstance(value, os.PathLike) else None
    if match is not None:
        try:
            validate_repo_id(match["repo"])
        except HFValidationError:
            match = None
    if match is None:
        if isinstance(value, os.PathLike) or text.startswith(("/", ".", "~")) or text.count("/") > 1:
            raise CheckpointError(f"checkpoint directory {text!r} does not exist (--model takes {ACCEPTED})")
        raise CheckpointError(f"{text!r} is neither an existing checkpoint directory nor a Hugging Face hub id; "
                              f"--model takes {ACCEPTED}")
    return HubRef(match["repo"], match["revision"])


def resolve(ref: HubRef) -> Snapshot:
    """Pin ``ref`` to a commit and bring its metadata files (no weights) into the hub cache."""
    try:
        directory = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=METADATA_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, EntryNotFoundError, HFValidationError, OSError) as e:
        raise _error(e, ref.repo_id, ref.revision, what=None) from None
    source = HubSource(ref.repo_id, directory.name)  # the snapshot folder is named by its commit
    if ref.revision != source.commit:
        log.info("%s is commit %s", ref, source.commit)
    return Snapshot(source=source, directory=directory)


def shard_names(snapshot: Snapshot) -> list[str]:
    """The weight shards, as transformers finds them: the index's ``weight_map``, else a single model.safetensors."""
    index = snapshot.directory / _INDEX
    if not index.is_file():
        return [_SINGLE]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{snapshot.source.ref}: {_INDEX} has no readable weight_map: {e}") from None
    return sorted(set(weight_map.values()))


def shard_headers(snapshot: Snapshot, names: list[str]) -> dict[str, dict]:
    """Each shard's safetensors header (tensor name -> {dtype, shape, ...}) without downloading any shard."""
    api = HfApi()

    def header(name: str) -> dict:
        cached = snapshot.directory / name
        if cached.is_file():  # a download finished earlier (a link into blobs/): no network
            return _read_header(cached)
        if constants.is_offline_mode():
            raise CheckpointError(
                f"{snapshot.source.ref}: shard {name} is not in the hub cache ({constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE is set, so its tensors cannot be indexed; download the checkpoint once with "
                f"network access (hf download {snapshot.source.repo_id} --revision {snapshot.source.commit})")
        try:
            meta = api.parse_safetensors_file_metadata(snapshot.source.repo_id, name, revision=snapshot.source.commit)
        except SafetensorsParsingError as e:
            raise CheckpointError(f"{snapshot.source.ref}: {name} has a corrupt safetensors header: {e}") from None
        except Exception as e:  # HTTP errors, and the transport's own (refused connections, timeouts)
            raise _error(e, snapshot.source.repo_id, snapshot.source.commit, what=name) from None
        return {key: {"dtype": t.dtype, "shape": list(t.shape)} for key, t in meta.tensors.items()}

    # NOTE: one range request per shard; large checkpoints have 100+ shards, so a few at a time.
    with ThreadPoolExecutor(max_workers=min(8, len(names)) or 1) as pool:
        return dict(zip(names, pool.map(header, names)))


def local_model_dir(model: str | os.PathLike) -> str:
    """The directory with ``model``'s config and tokenizer files on this node: ``model`` itself if it is a local
    directory, else its hub snapshot (metadata downloaded if needed). For transformers' ``from_pretrained``."""
    ref = parse_model_ref(model)
    return str(ref) if isinstance(ref, Path) else str(resolve(ref).directory)


def _error(e: Exception, repo_id: str, revision: str | None, *, what: str | None) -> CheckpointError:
    """One line that says what went wrong with a hub look-up, and what to do about it."""
    where = f"{repo_id}@{revision}" if revision else repo_id
    subject = f"{what} of {where}" if what else where
    if isinstance(e, GatedRepoError):
        return CheckpointError(f"{repo_id} is a gated repository: accept its terms on the hub, then log in on every "
                               f"node (hf auth login, or HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(f"{repo_id!r} is not a local directory, and the Hugging Face hub "
                               f"({constants.ENDPOINT}) has no model repository of that name (a private one needs a "
                               f"login: hf auth login, or HF_TOKEN)")
    if isinstance(e, RevisionNotFoundError):
        return CheckpointError(f"the Hugging Face hub repository {repo_id} has no revision {revision!r}")
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        if what == _SINGLE:
            return CheckpointError(f"{where} has neither {_SINGLE} nor {_INDEX}; moeray reads safetensors "
                                   f"checkpoints")
        return CheckpointError(f"{where} has no file {what}")
    if isinstance(e, LocalEntryNotFoundError):
        if constants.is_offline_mode():
            download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
            return CheckpointError(f"{subject} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                                   f"is set; download it once with network access ({download})")
        return CheckpointError(f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) for {subject}, and it is "
                               f"not in the hub cache ({constants.HF_HUB_CACHE})")
    if isinstance(e, HFValidationError):
        return CheckpointError(f"{repo_id!r} is not a valid Hugging Face hub id ({ACCEPTED}): {e}")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return CheckpointError(f"cannot fetch {subject} from the Hugging Face hub ({constants.ENDPOINT}): "
                           f"{type(e).__name__}: {first}")
