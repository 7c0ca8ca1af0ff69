"""Smoke tests: each benchmark script runs at a tiny size and prints its table."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["optimizer.py", "train_step.py", "ensemble.py", "dpo_step.py", "memory.py", "lora.py",
                                    "accumulation.py", "grpo_step.py", "data.py", "optimizers_race.py"])
def test_benchmark_script_runs_at_tiny_size(script):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "| variant |" in out and "ratio to" in out
