"""Hypothesis profiles: `ci` (the default; derandomised, no deadline) and `dev` (more examples, random).

Choose with HYPOTHESIS_PROFILE=dev. Torch is limited to one thread per test
process: the tensors here are tiny and threads only add noise.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", deadline=None, max_examples=100,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """``tmp_path / "tiny"``: a tiny random Llama folder with a chat tokenizer, written by
    ``examples/hf_tiny_model.py`` in its own process (as a user would make one)."""
    script = Path(__file__).resolve().parents[1] / "examples" / "hf_tiny_model.py"
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "tiny")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return tmp_path / "tiny"
