"""Times PyTorch's scaled_dot_product_attention on the shapes of `cargo bench -p cuda`'s
attention rows, for the ratio against our fused kernels (run both on the same GPU in one
session: scripts/gpu_session.sh does).

bf16, forward and backward (dq, dk, dv for a given output gradient), the best of 10 timed rounds
after a warm-up; TFLOP/s counts 4 (forward) and 10 (backward) flops per visible score entry and
channel, as the Rust benchmark does. Causal masks use `is_causal`; the pixel decoder's
block-causal mask is an explicit boolean mask (SDPA then cannot use its flash kernel, which the
table says). Needs a CUDA GPU and PyTorch (tested with 2.15).

    python3 scripts/bench_sdpa.py
"""

import sys

import torch
import torch.nn.functional as F

from cuda_timing import best_ms


def shapes():
    out = []
    for b in (1, 16):
        out.append(("SigLIP", b, 16, 729, 72, "full"))
        out.append(("DINOv2", b, 16, 734, 64, "full"))
        out.append(("decoder", b, 40, 729, 64, "block27"))
    for b, t in ((8, 2048), (2, 8192)):
        for mask in ("full", "causal"):
            out.append(("FA reference", b, 16, t, 128, mask))
    return out


def visible(t, mask):
    if mask == "full":
        return t * t
    if mask == "causal":
        return t * (t + 1) // 2
    width = 27
    return sum(min((i // width + 1) * width, t) for i in range(t))


def main():
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU for PyTorch")
        return 0
    print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    print("| SDPA | result |")
    print("|---|---|")
    for name, b, h, t, d, mask in shapes():
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        kwargs = {"is_causal": mask == "causal"}
        if mask.startswith("block"):
            rows = torch.arange(t, device="cuda") // 27
            kwargs = {"attn_mask": rows[None, :] <= rows[:, None]}
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        fwd = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, **kwargs))
        bwd = best_ms(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True))
        entries = b * h * d * visible(t, mask)
        for pass_, flop, ms in (("fwd", 4 * entries, fwd), ("bwd", 10 * entries, bwd)):
            tflops = flop / (ms * 1e-3) / 1e12
            print(f"| sdpa {pass_} {name} {mask} B={b} H={h} T={t}x{t} D={d} | {tflops:.1} TFLOP/s ({ms:.3} ms) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
