#!/usr/bin/env python3
"""Fits the polynomial of `Real::exp_nonpositive` (tensor/src/dtype.rs).

e^r on [-ln2/2, ln2/2] as 1 + c1 r + c2 r^2 + ... + c5 r^5, with c1..c5 chosen for the least
largest relative error (Lawson's iteration: weighted least squares whose weights grow where the
error is largest, converging to the minimax fit on a dense grid). Prints the coefficients
rounded to f32 and the largest relative error of their f32 Horner evaluation.

Needs numpy: `python3 -m pip install numpy`, then `python3 scripts/fit_exp_polynomial.py`.
"""
import numpy as np

DEGREE = 5
HALF_LN2 = np.log(2.0) / 2
r = np.linspace(-HALF_LN2, HALF_LN2, 20001)
exact = np.exp(r)
powers = np.vstack([r ** (k + 1) for k in range(DEGREE)]).T
weights = np.full(r.shape, 1.0 / r.size)
for _ in range(3000):
    scale = np.sqrt(weights) / exact
    coef, *_ = np.linalg.lstsq(powers * scale[:, None], (exact - 1.0) * scale, rcond=None)
    err = np.abs(powers @ coef - (exact - 1.0)) / exact
    weights = weights * err
    weights /= weights.sum()

c32 = coef.astype(np.float32)
r32 = r.astype(np.float32)
p = np.float32(c32[-1])
for c in c32[-2::-1]:
    p = p * r32 + c
p = p * r32 + np.float32(1.0)
exact32 = np.exp(r32.astype(np.float64))
print("coefficients c1..c5 (f32):", ", ".join(repr(float(c)) for c in c32))
print(f"minimax relative error {err.max():.3e}, f32 Horner {np.max(np.abs(p - exact32) / exact32):.3e}")
