"""benchmarks/gpu.py runs end to end with --tiny (on CPU, in CI) and prints its table."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_benchmark_runs_with_tiny_settings():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    rows = [line.split() for line in lines[header + 1 :] if line.strip()]
    assert [(r[0], r[1], int(r[2])) for r in rows] == [
        ("native:tiny", "float32", 15),
        ("native:tiny", "bfloat16", 15),
        ("llama-shape-tiny", "bfloat16", 10),  # 2 layers x (4 heads + MLP)
    ]
    for row in rows:
        figures = [float(x) for x in row[3:]]  # tokens, rows/s, rows/s, s/prompt, GiB
        assert len(figures) == 5 and all(math.isfinite(x) and x > 0 for x in figures), row
