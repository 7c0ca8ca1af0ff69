"""Shared helpers for the benchmark scripts: round-robin timing and a ratio table."""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import time

import torch


def arguments(doc: str, *, threads: int = 2, tiny: str = "a smoke-test size (seconds)") -> argparse.ArgumentParser:
    """A parser with the flags every benchmark takes: ``--tiny`` and ``--threads`` (torch's CPU threads);
    read it with :func:`parse`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help=tiny)
    parser.add_argument("--threads", type=int, default=threads)
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser.parse_args()``, with torch's thread count set from ``--threads``."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


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


# ---- resident memory (Linux): what the CPU memory benchmarks read


def rss_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (``VmHWM``) since start or the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> bool:
    """Return freed heap memory to the system (``malloc_trim``) and reset the high-water mark
    (``/proc/self/clear_refs``); False where either is not available."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak_rss_bytes()
        return True
    except OSError:
        return False
