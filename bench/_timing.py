"""Wall time and peak GPU memory of one call (torch only, so GPU-machine benches can import it)."""

from __future__ import annotations

import time

import torch


def timed(fn, device):
    """(fn(), seconds, peak GPU GiB or nan off CUDA); CUDA is synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return out, time.perf_counter() - t0, peak
