"""Times the reference Mamba kernels of `mamba_ssm` at the shapes `cargo bench -p cuda` uses, so
that BENCHMARKS.md can give our kernels' time as a ratio to theirs.

Needs PyTorch with CUDA and Triton, and the `mamba_ssm` source tree on PYTHONPATH (its Triton SSD
kernels need no build step; its CUDA selective-scan extension is timed only when it was built).
Shapes: the Mamba2-2.7B SSD (80 heads of 64, d_state 128, one group, chunk 256, D and dt bias,
softplus) and the Mamba-2.8B selective scan (d_inner 5120, d_state 16, D, z, delta bias,
softplus), bf16, length 2048, batch 1, 4 and 16; the forward pass, and the backward pass alone
(gradients of every input from a recorded forward). A time is the best of several
CUDA-event-timed rounds after a warm-up. GB/s counts the bytes each pass must read and write
once, with the same formulas as the Rust benchmark.
"""

import torch

from cuda_timing import best_ms

E = 2  # bytes per bf16 element


def row(name, nbytes, ms):
    print(f"{name:<60} {ms:9.3f} ms  {nbytes / (ms * 1e-3) / 1e9:8.1f} GB/s")


def ssd(batch, length=2048, heads=80, head_dim=64, state=128, groups=1):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    dev, dt16 = "cuda", torch.bfloat16
    x = torch.randn(batch, length, heads, head_dim, device=dev, dtype=dt16, requires_grad=True)
    dt = torch.randn(batch, length, heads, device=dev, dtype=dt16, requires_grad=True)
    a = -torch.rand(heads, device=dev, dtype=torch.float32).add(0.5).requires_grad_()
    b = torch.randn(batch, length, groups, state, device=dev, dtype=dt16, requires_grad=True)
    c = torch.randn(batch, length, groups, state, device=dev, dtype=dt16, requires_grad=True)
    d = torch.ones(heads, device=dev, dtype=torch.float32, requires_grad=True)
    bias = torch.full((heads,), 0.1, device=dev, dtype=torch.float32, requires_grad=True)

    def forward():
        return mamba_chunk_scan_combined(x, dt, a, b, c, chunk_size=256, D=d, dt_bias=bias,
                                         dt_softplus=True)

    grad = torch.randn(batch, length, heads, head_dim, device=dev, dtype=dt16)
    xs, dts, bcs = x.numel(), dt.numel(), b.numel()
    states = batch * heads * head_dim * state
    shape = f"B={batch} H={heads} P={head_dim} L={length} N={state}"
    with torch.no_grad():
        row(f"mamba_ssm ssd fwd bf16 {shape}", (2 * xs + dts + 2 * bcs + states + 3 * heads) * E,
            best_ms(forward))
    out, inputs = forward(), (x, dt, a, b, c, d, bias)
    row(f"mamba_ssm ssd bwd bf16 {shape}", (4 * xs + 2 * dts + 4 * bcs + 6 * heads) * E,
        best_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)))


def selective_scan(batch, length=2048, dim=5120, state=16):
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        import selective_scan_cuda  # noqa: F401  (the built CUDA extension)
    except ImportError as e:
        print(f"mamba_ssm selective scan: not timed ({e}); build mamba_ssm's CUDA extension for it")
        return
    dev, dt16 = "cuda", torch.bfloat16
    u = torch.randn(batch, dim, length, device=dev, dtype=dt16, requires_grad=True)
    delta = torch.randn(batch, dim, length, device=dev, dtype=dt16, requires_grad=True)
    a = -torch.rand(dim, state, device=dev, dtype=torch.float32).add(0.5).requires_grad_()
    b = torch.randn(batch, state, length, device=dev, dtype=dt16, requires_grad=True)
    c = torch.randn(batch, state, length, device=dev, dtype=dt16, requires_grad=True)
    d = torch.ones(dim, device=dev, dtype=torch.float32, requires_grad=True)
    z = torch.randn(batch, dim, length, device=dev, dtype=dt16, requires_grad=True)
    bias = torch.full((dim,), 0.1, device=dev, dtype=torch.float32, requires_grad=True)

    def forward():
        return selective_scan_fn(u, delta, a, b, c, d, z, bias, delta_softplus=True)

    grad = torch.randn(batch, dim, length, device=dev, dtype=dt16)
    seq, bcs = u.numel(), b.numel()
    small = (dim * state + 2 * dim) * E
    shape = f"B={batch} D={dim} L={length} N={state}"
    with torch.no_grad():
        row(f"mamba_ssm selective_scan fwd bf16 {shape}",
            (4 * seq + 2 * bcs + batch * dim * state) * E + small, best_ms(forward))
    out, inputs = forward(), (u, delta, a, b, c, d, z, bias)
    row(f"mamba_ssm selective_scan bwd bf16 {shape}", (7 * seq + 4 * bcs) * E + 2 * small,
        best_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)))


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for batch in (1, 4, 16):
        ssd(batch)
        selective_scan(batch)
