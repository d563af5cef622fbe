"""Timing on a CUDA GPU for the benchmark scripts (bench_sdpa.py, bench_mamba_ssm.py)."""

import torch

ROUNDS = 10


def best_ms(fn):
    """The fastest of ROUNDS CUDA-event-timed calls of `fn`, after one warm-up call, in ms."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best
