"""``--model org/name[@revision]``: hub ids resolve through huggingface_hub's cache, and each process downloads only
the weight shards it reads. No network: an offline hub cache laid out here, and a fake hub on 127.0.0.1."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from moeray.cli import main
from moeray.model.backbone import build_backbone, inspect_checkpoint
from moeray.model.checkpoint import CheckpointError
from moeray.model.hub import HubRef, HubSource, parse_model_ref
from moeray.model.tiny import save_tiny_checkpoint
from moeray.model.weights import TensorReader, read_expert

REPO = "org/name"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DENSE = "model-00001-of-00005.safetensors"


def _shard_of(key: str) -> str:
    """Dense tensors in one shard; each MoE layer's experts 0-3 in one, 4-7 in another."""
    m = re.search(r"layers\.(\d+)\..*experts\.(\d+)\.", key)
    if m is None:
        return DENSE
    return f"model-{2 + 2 * int(m[1]) + (int(m[2]) >= 4):05d}-of-00005.safetensors"


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny Mixtral (2 MoE layers, 8 experts), sharded with a model.safetensors.index.json: file name -> bytes."""
    src = save_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("src"))
    tensors = load_file(src / "model.safetensors")
    weight_map = {key: _shard_of(key) for key in tensors}
    out = tmp_path_factory.mktemp("sharded")
    for shard in sorted(set(weight_map.values())):
        save_file({k: t for k, t in tensors.items() if weight_map[k] == shard}, out / shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "tokenizer_config.json").write_text("{}")
    for name in ("config.json", "generation_config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _lay_out_cache(cache: Path, files: dict[str, bytes], skip: tuple[str, ...] = ()) -> Path:
    """huggingface_hub's cache layout: blobs by hash, a snapshot of links per commit, refs/main naming the commit."""
    root = cache / "models--org--name"
    for name, data in files.items():
        if name in skip:
            continue
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return root / "snapshots" / COMMIT


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """An empty hub cache under tmp_path. NOTE: huggingface_hub reads its environment once, at import."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return cache


@pytest.fixture
def offline(monkeypatch, hub_env):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_env


# -- references --------------------------------------------------------------------------------------------------
def test_parse_model_ref(tmp_path, monkeypatch):
    assert parse_model_ref("org/name") == HubRef("org/name")
    assert parse_model_ref("org/name@v1.0") == HubRef("org/name", "v1.0")
    assert parse_model_ref("Org-2/my.model_x@refs/pr/1") == HubRef("Org-2/my.model_x", "refs/pr/1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert parse_model_ref("org/name") == Path("org/name")  # an existing local directory always wins
    for bad in ("name", "org/na me", "org/name@", "org/name@a@b", "a/b/c", "org/-bad--name"):
        with pytest.raises(CheckpointError, match=re.escape(repr(bad)) + ".*org/name\\[@revision\\]"):
            parse_model_ref(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        parse_model_ref(tmp_path / "nope")


# -- an offline hub cache ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rev", ["", "@main", "@" + COMMIT])
def test_offline_cache_resolves(offline, repo_files, rev):
    snapshot = _lay_out_cache(offline, repo_files)
    loaded = inspect_checkpoint(REPO + rev)
    checkpoint = loaded.checkpoint
    assert checkpoint.hub == HubSource(REPO, COMMIT)
    assert checkpoint.ref == f"{REPO}@{COMMIT}" and checkpoint.name == "name"
    assert checkpoint.path == str(snapshot) and checkpoint.model_type == "mixtral"
    assert set(checkpoint.tensors) == set(json.loads(repo_files["model.safetensors.index.json"])["weight_map"])
    assert {Path(loc.file).name for loc in loaded.index.dense.values()} == {DENSE}
    assert loaded.spec.num_experts == 8 and len(loaded.spec.moe_layers) == 2


def test_offline_reads_experts_like_a_local_directory(offline, repo_files, checkpoints):
    _lay_out_cache(offline, repo_files)
    hub, local = inspect_checkpoint(REPO), inspect_checkpoint(checkpoints["mixtral"])
    reader_hub, reader_local = TensorReader(), TensorReader()
    for layer, src_hub, src_local in zip(hub.spec.moe_layers, hub.index.experts, local.index.experts):
        for e in (0, 7):
            got = read_expert(reader_hub, layer, src_hub, e, torch.float32)
            want = read_expert(reader_local, layer, src_local, e, torch.float32)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_offline_unknown_repo_or_revision(offline, repo_files):
    _lay_out_cache(offline, repo_files)
    for ref in ("org/other", "org/name@nope", "org/name@" + "f" * 40):
        with pytest.raises(CheckpointError, match="not in the hub cache .*HF_HUB_OFFLINE"):
            inspect_checkpoint(ref)


def test_offline_uncached_shard_is_named(offline, repo_files):
    _lay_out_cache(offline, repo_files, skip=("model-00004-of-00005.safetensors",))
    with pytest.raises(CheckpointError, match="shard model-00004-of-00005.safetensors is not in the hub cache"):
        inspect_checkpoint(REPO)


def test_cli_info_offline(offline, repo_files, capsys):
    """The whole command, `moeray info --model org/name` (no Ray), in a process that finds the offline cache through
    HF_HUB_CACHE and HF_HUB_OFFLINE alone; and a clear error for a revision the cache lacks."""
    _lay_out_cache(offline, repo_files)
    out = subprocess.run([sys.executable, "-m", "moeray.cli", "info", "--model", REPO], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert (info["model_type"], info["experts"], info["moe_layers"]) == ("mixtral", 8, 2)
    assert main(["info", "--model", "org/name@nope"]) == 2
    assert "error: org/name@nope is not in the hub cache" in capsys.readouterr().err


# -- a fake hub on 127.0.0.1 -------------------------------------------------------------------------------------
class _FakeHub(BaseHTTPRequestHandler):
    """The endpoints huggingface_hub 2.x calls: repo info by revision, the file tree, and HEAD/GET (with Range) of
    /{repo}/resolve/{revision}/{file}. Records every request as (method, path, Range header)."""

    files: dict[str, bytes] = {}
    log: list[tuple[str, str, str | None]] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _missing(self, code: str) -> None:
        self._send(404, b"{}", {"X-Error-Code": code, "X-Error-Message": code})

    def _revision(self, rev: str) -> bool:
        if rev in ("main", COMMIT):
            return True
        self._missing("RevisionNotFound")
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.log.append((self.command, path, self.headers.get("Range")))
        if path.startswith(("/api/models/org/gated/", "/org/gated/")):
            return self._send(403, b"{}", {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path):
            if m[1] != REPO:
                return self._missing("RepoNotFound")
            if not self._revision(m[3]):
                return None
            if m[2] == "tree":
                return self._json([{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                   for n, d in self.files.items()])
            return self._json({"id": REPO, "sha": COMMIT, "private": False,
                               "siblings": [{"rfilename": n} for n in self.files]})
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/(.+?)/([^/]+)", path):
            if m[1] != REPO:
                return self._missing("RepoNotFound")
            if not self._revision(m[2]):
                return None
            if m[3] not in self.files:
                return self._missing("EntryNotFound")
            data = self.files[m[3]]
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            if r := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or ""):
                start, end = int(r[1]), min(int(r[2] or len(data) - 1), len(data) - 1)
                return self._send(206, data[start:end + 1],
                                  {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})
            return self._send(200, data, headers)
        return self._missing("RepoNotFound")


@pytest.fixture
def online(monkeypatch, hub_env, repo_files):
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Hub", (_FakeHub,), {"files": repo_files, "log": []}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        yield server.RequestHandlerClass.log
    finally:
        server.shutdown()
        server.server_close()


def _cached_shards(cache: Path) -> set[str]:
    return {p.name for p in (cache / "models--org--name" / "snapshots" / COMMIT).glob("*.safetensors")}


def _shard_downloads(log) -> set[str]:
    """Shards sent whole (a GET without a Range header); header reads are Range requests."""
    return {Path(p).name for method, p, rng in log if method == "GET" and p.endswith(".safetensors") and rng is None}


def test_indexing_downloads_no_shard_and_each_reader_only_its_own(online, hub_env, checkpoints):
    loaded = inspect_checkpoint(REPO)
    assert loaded.checkpoint.hub == HubSource(REPO, COMMIT)
    snapshot = Path(loaded.checkpoint.path)
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "generation_config.json", "tokenizer_config.json",
                                                     "model.safetensors.index.json"}
    assert _cached_shards(hub_env) == set() and _shard_downloads(online) == set()
    assert {Path(p).name for m, p, rng in online if rng is not None} == {f"model-0000{i}-of-00005.safetensors"
                                                                         for i in range(1, 6)}

    # A worker holding expert 5 of MoE layer 1 fetches that expert's shard, and nothing else.
    layer = loaded.spec.moe_layers[1]
    got = read_expert(TensorReader(), layer, loaded.index.experts[1], 5, torch.float32)
    local = inspect_checkpoint(checkpoints["mixtral"])
    want = read_expert(TensorReader(), local.spec.moe_layers[1], local.index.experts[1], 5, torch.float32)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert _cached_shards(hub_env) == _shard_downloads(online) == {"model-00005-of-00005.safetensors"}

    # A router, opening the pinned reference the engine hands it, fetches only the dense shard.
    model, router_view = build_backbone(loaded.checkpoint.ref, torch.float32, dispatch=lambda *a: None)
    assert router_view.checkpoint.hub == loaded.checkpoint.hub
    assert _cached_shards(hub_env) == _shard_downloads(online) == {DENSE, "model-00005-of-00005.safetensors"}
    embed = load_file(Path(checkpoints["mixtral"]) / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight, embed)


def test_online_unknown_repo_or_revision(online):
    with pytest.raises(CheckpointError, match="'org/other' is not a local directory, and the Hugging Face hub"):
        inspect_checkpoint("org/other")
    with pytest.raises(CheckpointError, match="org/name has no revision 'nope'"):
        inspect_checkpoint("org/name@nope")
    with pytest.raises(CheckpointError, match="org/gated is a gated repository: accept its terms"):
        inspect_checkpoint("org/gated")


def test_unreachable_hub(monkeypatch, hub_env, repo_files):
    """Online, but the hub does not answer: a cached snapshot still resolves, and an uncached shard is named."""
    _lay_out_cache(hub_env, repo_files, skip=("model-00004-of-00005.safetensors",))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(CheckpointError, match="cannot fetch model-00004-of-00005.safetensors of org/name@0123.*"
                                              "from the Hugging Face hub"):
        inspect_checkpoint(REPO)
    with pytest.raises(CheckpointError, match="cannot reach the Hugging Face hub .* for org/other"):
        inspect_checkpoint("org/other")
