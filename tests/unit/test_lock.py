"""requirements.lock is what this environment runs (`make install` installs exactly it), and `make gpu-wheels`
carries the locked transformers and everything it needs, but not the GPU image's own torch and triton."""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_wheels  # noqa: E402 - scripts/gpu_wheels.py


def _locked() -> dict[str, str]:
    entries, _ = gpu_wheels.read_lock((ROOT / "requirements.lock").read_text())
    return {name: entry.split("==")[1].split()[0] for name, entry in entries.items()}


def test_every_locked_package_is_installed_at_its_locked_version():
    locked = _locked()
    assert {"transformers", "kernels", "ray", "setuptools"} <= set(locked) and "torch" not in locked
    installed = {gpu_wheels._canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert {name: installed.get(name) for name in locked if installed.get(name) != locked[name]} == {}
    assert installed["torch"].split("+")[0] == _makefile_torch()


def _makefile_torch() -> str:
    [line] = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("TORCH := ")]
    return line.removeprefix("TORCH := ")


def test_the_gpu_wheels_are_transformers_and_what_it_needs():
    entries, via = gpu_wheels.read_lock((ROOT / "requirements.lock").read_text())
    carried = set(gpu_wheels.closure(entries, via))
    assert {"transformers", "kernels", "huggingface-hub", "tokenizers", "safetensors"} <= carried
    assert not carried & {"torch", "triton", "ray", "grpcio", "openai", "moeray"}
    for name in carried - {gpu_wheels._canonical(r) for r in gpu_wheels.ROOTS}:  # each needed by another carried one
        assert via[name] & carried, name
