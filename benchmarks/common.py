"""Shared helpers for the benchmark scripts: round-robin timing and a ratio table."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def round_robin(variants: dict, *, warmup: int = 3, rounds: int = 15) -> dict:
    """Median seconds per call of each variant, the variants alternated round by round.

    Alternating spreads the machine's noise over every variant instead of
    letting it land on whichever ran during a busy spell.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def table(medians: dict, baseline: str, title: str) -> str:
    base = medians[baseline]
    lines = [title, "", f"| variant | median ms | ratio to {baseline} |", "|---|---:|---:|"]
    for name, t in medians.items():
        lines.append(f"| {name} | {t * 1e3:.2f} | {t / base:.3f} |")
    return "\n".join(lines)
