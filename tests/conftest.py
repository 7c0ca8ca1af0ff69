"""Hypothesis profiles: `ci` (the default; derandomised, no deadline) and `dev` (more examples, random).

Choose with HYPOTHESIS_PROFILE=dev. Torch is limited to one thread per test
process: the tensors here are tiny and threads only add noise.
"""
import os

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
