#!/usr/bin/env python3
"""``make gpu-wheels``: the locked wheels that ``make gpu-check`` needs and a lent GPU machine's image lacks.

The GPU image has its own Python (3.12) with torch and triton but older transformers and no Hugging Face
``kernels``, and no network. This downloads, here, the versions requirements.lock pins for ``ROOTS`` and for
everything they need (read off the lock's ``# via`` lines), as wheels for that Python, each checked against the
lock's hashes, into ``.gpu-wheels/`` (ignored; a device run carries it). ``scripts/gpu_check.py`` installs them
from there before it starts (``install``): pip takes from the folder only what the image does not already satisfy.

    python3 scripts/gpu_wheels.py download      # here (make gpu-wheels)
    python3 scripts/gpu_wheels.py install       # there, before the checks (gpu_check.py calls it)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
WHEELS = ROOT / ".gpu-wheels"
ROOTS = ("transformers", "kernels", "safetensors", "tokenizers")  # what gpu_check imports beside torch and triton
NOT_CARRIED = ("torch", "triton")  # the image's own builds (CUDA) are the ones to test
# The GPU image's Python and the platforms its wheels may be built for (pip matches each exactly).
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
          *(arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                            "manylinux2014_x86_64", "manylinux1_x86_64") for arg in ("--platform", tag))]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(text: str) -> tuple[dict[str, str], dict[str, set[str]]]:
    """The lock's entries (canonical name -> its whole entry, pin and hashes) and each one's dependents (the
    packages its ``# via`` lines name)."""
    entries: dict[str, str] = {}
    via: dict[str, set[str]] = {}
    name = None
    for line in text.splitlines():
        pin = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==\S+", line)
        if pin:
            name = _canonical(pin.group(1))
            entries[name], via[name] = line + "\n", set()
        elif name and line.startswith("    --hash="):
            entries[name] += line + "\n"
        elif name and line.strip().startswith("#"):
            parent = re.match(r"^#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)", line.strip())
            if parent and parent.group(1) != "via":
                via[name].add(_canonical(parent.group(1)))
        elif not line.strip():
            name = None
    return entries, via


def closure(entries: dict[str, str], via: dict[str, set[str]], roots=ROOTS) -> list[str]:
    """``roots`` and every locked package one of them needs, directly or not."""
    needed = {_canonical(r) for r in roots}
    grew = True
    while grew:
        grew = False
        for name, parents in via.items():
            if name not in needed and parents & needed:
                needed.add(name)
                grew = True
    return sorted(needed & set(entries) - {_canonical(n) for n in NOT_CARRIED})


def download() -> int:
    entries, via = read_lock(LOCK.read_text())
    names = closure(entries, via)
    WHEELS.mkdir(exist_ok=True)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    wanted = WHEELS / "requirements.txt"  # the pins, with their hashes: what `install` asks pip for
    wanted.write_text("".join(entries[n] for n in names))
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                           *TARGET, "-d", str(WHEELS), "-r", str(wanted)])
    if done.returncode == 0:
        size = sum(f.stat().st_size for f in WHEELS.glob("*.whl"))
        print(f"gpu-wheels: {len(names)} wheels, {size / 2**20:.1f} MiB in {WHEELS.relative_to(ROOT)}/ "
              f"(carry it: `.gpu-wheels`)")
    return done.returncode


def install() -> int:
    """Into this Python, from the folder alone: what the image lacks or holds at another version."""
    wanted = WHEELS / "requirements.txt"
    if not wanted.exists():
        print(f"gpu-wheels: no {wanted.relative_to(ROOT)}: using the machine's own packages", file=sys.stderr)
        return 0
    pins = [line.split(" ")[0] for line in wanted.read_text().splitlines() if "==" in line]
    return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-compile",
                           "--find-links", str(WHEELS), *pins]).returncode


if __name__ == "__main__":
    if sys.argv[1:] not in (["download"], ["install"]):
        sys.exit(__doc__)
    sys.exit(download() if sys.argv[1] == "download" else install())
