"""``make gpu-check``'s engine section (scripts/gpu_check_engine.py) run on the CPU at toy sizes, as
``gpu_check.py --interpret --section engine`` runs it: known to work before a GPU is at hand, and without Ray or
OpenTelemetry (the script keeps both out of its process, as the GPU machines lack them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def test_engine_section_passes_on_cpu(demo_home):
    env = {**os.environ, "MOERAY_HOME": str(demo_home)}  # the session's demo checkpoint, built once
    proc = subprocess.run([sys.executable, str(SCRIPT), "--interpret", "--section", "engine"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = proc.stdout.split("check ", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("engine ")]
    greedy = [r for r in rows if r.startswith("engine greedy == transformers")]
    timed = [r for r in rows if r.startswith(("engine decode", "engine prefill"))]
    assert len(greedy) == 7 and all(" PASS " in r and "checkpoint cached" in r for r in greedy[:1]), table
    assert all(" PASS " in r for r in greedy), table
    assert len(timed) == 2 and all(" TIME " in r and "tok/s" in r for r in timed), table
    assert "9 rows, 0 failed" in proc.stdout
