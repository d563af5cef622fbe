"""Times numpy's (OpenBLAS) f32 matmul: the well-tuned BLAS that `cargo bench -p tensor` compares with.

Usage: python3 scripts/blas_reference.py N  ->  prints the best GFLOP/s of an N x N x N product.
"""
import sys
import time

import numpy as np

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
a @ b
best = min(
    (lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(10)
)
print(f"{2 * n**3 / best / 1e9:.1f}")
