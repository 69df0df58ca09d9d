"""No folder of the repository answers to the name of an installed package, in any process whose ``sys.path`` holds
the repository root: ``python -c`` and ``python -m pytest`` in the clone, and a Ray worker started from it (Ray puts
the driver's working directory on its workers' path). transformers imports Hugging Face's ``kernels`` at start-up;
the repository's top-level ``kernels/`` once shadowed it (kernels/api.py says how it no longer can)."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# What each process below prints: where `kernels` and transformers' MoE model code come from, and moeray.kernels.
PROBE = """
import json, os, sys
import transformers.models.mixtral.modeling_mixtral
import kernels
import moeray.kernels.api
print(json.dumps({"kernels": kernels.__file__, "has_cuda_properties": hasattr(kernels, "CUDAProperties"),
                  "moeray_kernels": moeray.kernels.api.__file__, "cwd": os.getcwd(),
                  "root_on_path": any(os.path.abspath(p or ".") == os.getcwd() for p in sys.path)}))
"""

RAY_DRIVER = """
import json, os, sys
import ray

@ray.remote(num_cpus=0)
def probe(code):
    out = {}
    exec(code.replace("print(json.dumps(", "out.update(("), {"out": out})
    return out

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    print(json.dumps(ray.get(probe.remote(sys.argv[1]), timeout=180)))
finally:
    ray.shutdown()
"""


def _installed(result: dict) -> None:
    assert result["root_on_path"] and pathlib.Path(result["cwd"]) == ROOT, "the probe ran with the root on sys.path"
    assert "site-packages" in result["kernels"] and result["has_cuda_properties"], result["kernels"]
    assert pathlib.Path(result["moeray_kernels"]).resolve() == ROOT / "kernels" / "api.py"


def test_no_top_level_folder_or_module_is_an_installed_packages_name():
    installed = set(importlib.metadata.packages_distributions()) - {"moeray"}
    for where in (ROOT, ROOT / "tests"):  # python -m / Ray put the root on sys.path; pytest puts tests/ there too
        for entry in where.iterdir():
            name = entry.stem if entry.suffix == ".py" else entry.name
            regular = (entry.is_dir() and (entry / "__init__.py").exists()) or entry.suffix == ".py"
            assert not (regular and name in installed), f"{entry} would shadow the installed package {name!r}"
            if where == ROOT and entry.is_dir() and entry.name != "moeray":
                assert not (entry / "__init__.py").exists(), f"{entry} is a regular package at the root"
    assert "kernels" in installed, "transformers' `kernels` dependency is installed, so the check above means it"


def test_a_process_in_the_clone_imports_the_installed_kernels():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _installed(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.ray
def test_a_ray_worker_started_from_the_clone_imports_the_installed_kernels():
    done = subprocess.run([sys.executable, "-c", RAY_DRIVER, PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _installed(json.loads(done.stdout.strip().splitlines()[-1]))
