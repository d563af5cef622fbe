#!/usr/bin/env python3
"""Generate the Hugging Face parity fixtures in tests/fixtures/ (deterministic, CPU, float32).

Usage (in a venv OUTSIDE the repository, versions pinned in scripts/requirements-fixtures.txt):

    python3 -m venv /work/venv-fixtures
    /work/venv-fixtures/bin/pip install -r scripts/requirements-fixtures.txt
    /work/venv-fixtures/bin/python scripts/make_fixtures.py [--out tests/fixtures]

Generated with transformers 5.23.0, torch 2.15.0, safetensors 0.8.0, numpy 2.4.6. Everything runs
on CPU in float32 with torch.manual_seed, torch.use_deterministic_algorithms(True) and one thread;
two runs give byte-identical files. The script refuses to run if mamba_ssm, causal_conv1d or
kernels is importable (those would route Mamba through fused kernels).

=====================================================================================================
WHAT IS IN tests/fixtures/ AND HOW THE RUST TESTS USE IT
=====================================================================================================
Each fixture is a folder tests/fixtures/<name>/ with
  config.json          the model's `save_pretrained` config (what a hub checkpoint ships)
  model.safetensors    the model's `save_pretrained(safe_serialization=True)` weights (F32),
                       under the exact names a hub checkpoint uses
  reference.safetensors inputs and expected outputs, all F32 except token ids (U32); the
                       `__metadata__` holds transformers_version, torch_version, safetensors_version,
                       numpy_version, a `description` of the tensors, and fixture-specific notes.
The Rust tests load config.json + model.safetensors through the normal pretrained-loading code,
run the same inputs, and compare with the reference tensors (relative error ~1e-4 at most; the
stored values are float32 PyTorch results). Every model is tiny and randomly initialised, then
EVERY parameter is perturbed by 0.1*N(0,1) (norm weights, biases, A_log, D, dt biases, layer
scales, conv biases, ... are therefore never exact 0/1), so a wrong formula cannot hide behind a
trivial initial value.

mamba/  MambaForCausalLM: vocab 64, hidden 16, state 8, 2 layers, expand 2 (intermediate 32),
        conv_kernel 4, time_step_rank 4, use_bias False, use_conv_bias True, tied embeddings,
        residual_in_fp32 True, layer_norm_epsilon 1e-5.
        reference: input_ids U32 [13]; logits [13, 64]; loss (0-d scalar) =
        F.cross_entropy(logits[:-1], input_ids[1:]) (mean over the 12 next-token predictions; equals
        the model's own `labels=input_ids` loss); grad.<name> = d loss / d parameter for every entry of
        model.named_parameters() (the tied lm_head is covered by grad.backbone.embeddings.weight,
        lm_head.weight is neither a separate parameter nor stored in model.safetensors);
        hidden_states.<i> [13, 16] = output_hidden_states[i]: i = 0..L-1 the residual stream after block
        i, i = L the output of norm_f (Mamba's tuple has NO embeddings entry).
mamba2/ Mamba2ForCausalLM: vocab 64, hidden 32, state 8, num_heads 8, head_dim 8, expand 2
        (intermediate 64), n_groups 2, chunk_size 8, conv_kernel 4, 2 layers, use_bias False,
        use_conv_bias True, tied embeddings, layer_norm_epsilon 1e-5, time_step_limit (0, inf).
        reference: as for mamba with the 13-token input (13 is NOT a multiple of chunk_size 8, so the
        chunked scan pads), plus input_ids_16 / logits_16 / loss_16 (16 = 2 full chunks, no grads).
siglip/ SiglipVisionModel (model_type siglip_vision_model): hidden 32, intermediate 64, 3 layers,
        4 heads, image 28, patch 7 (4x4 = 16 positions), layer_norm_eps 1e-6, gelu_pytorch_tanh.
        vision_use_head defaults to True in this version, so the checkpoint HAS the attention-pooling
        head (head.probe, head.attention.in_proj_weight/in_proj_bias/out_proj.*, head.layernorm.*,
        head.mlp.fc1/fc2.*) and pooler_output is stored too.
dinov2/ Dinov2Model: hidden 32, 3 layers, 4 heads, mlp_ratio 2, image 28, patch 7, layerscale 1.0
        (then perturbed), layer_norm_eps 1e-6, hidden_act gelu (exact erf).
dinov2_registers/ Dinov2WithRegistersModel (model_type dinov2_with_registers): same sizes,
        num_register_tokens 2.
Vision reference tensors, for each suffix s in ["", "_42", "_21x35"]:
  pixel_values{s}              [2,3,28,28] / [1,3,42,42] / [1,3,21,35], N(0,1)
  last_hidden_state{s}         [B, tokens, 32], after the final layernorm
  penultimate_hidden_state{s}  output_hidden_states[-2] = raw output of block L-2 (no final norm)
  embeddings{s}                output of the embeddings module = output_hidden_states[0]
  pooler_output{s}             [B, 32] (SigLIP: attention-pooling head; Dinov2: last_hidden_state[:,0])
  In this version output_hidden_states = (embeddings, block 0 out, ..., block L-1 out); the last entry
  is NOT the final-normed last_hidden_state (capture_outputs(tie_last_hidden_states=False)).
  SigLIP "" uses interpolate_pos_encoding=False (default); "_42" and "_21x35" pass
  interpolate_pos_encoding=True. Dinov2 models always interpolate when the grid differs.
  "_42" -> 6x6 grid (upsampling 4->6); "_21x35" -> 3x5 grid (down 4->3 in H, up 4->5 in W, non-square).
  Tokens: SigLIP = 16/36/15 patches; Dinov2 = CLS + patches; registers = CLS + 2 registers + patches.
Attention: references use attn_implementation="eager"; the default SDPA is checked to agree < 1e-5.

Checkpoint names. Mamba/Mamba2: backbone.embeddings.weight, backbone.layers.{i}.norm.weight,
backbone.layers.{i}.mixer.{in_proj.weight, conv1d.weight [C,1,K], conv1d.bias, out_proj.weight, A_log,
D, (mamba) x_proj.weight, dt_proj.weight, dt_proj.bias, (mamba2) dt_bias, norm.weight},
backbone.norm_f.weight. Dinov2: save_pretrained REVERSES transformers 5's internal renaming, so the
file has the legacy hub names encoder.layer.{i}.attention.attention.{query,key,value}.{weight,bias},
encoder.layer.{i}.attention.output.dense.*, norm1/norm2, mlp.fc1/fc2, layer_scale1/2.lambda1,
embeddings.{cls_token [1,1,D], mask_token [1,D], position_embeddings [1,1+N,D],
patch_embeddings.projection.*, register_tokens [1,R,D]}, layernorm.* -- while named_parameters() in
memory says attention.q_proj/k_proj/v_proj/o_proj. SigLIP: embeddings.patch_embedding.*,
embeddings.position_embedding.weight [N,D], encoder.layers.{i}.{layer_norm1, self_attn.{q,k,v,out}_proj,
layer_norm2, mlp.fc1, mlp.fc2}, post_layernorm, head.*.
config.json quirk: transformers 5 writes non-finite floats as objects, e.g. mamba2's
  "time_step_limit": [0.0, {"__float__": "Infinity"}]   (also "-Infinity", "NaN").
mamba2/config.json also carries norm_before_gate=false and rms_norm=true (as real Mamba-2 checkpoints
do); transformers 5.23 ignores both keys (the behaviour below is hard-coded), and time_step_rank
("auto" -> 2) is unused by Mamba-2.

=====================================================================================================
EXACT COMPUTATIONS IN transformers 5.23 (each is re-implemented in float64 NumPy below and checked
against the fixture, so these notes are verified, not recalled)
=====================================================================================================
Notation: one sequence, T tokens, D = hidden_size, I = expand*D, N = state_size, K = conv_kernel.
RMSNorm(x; w, eps) = w * (x * rsqrt(mean(x^2 over last dim) + eps))     (weight * normed, NOT (1+w))
silu(x) = x * sigmoid(x).  softplus = F.softplus(beta=1, threshold=20): x if x > 20 else log1p(exp(x)).
Causal depthwise conv (Conv1d groups=C, padding K-1, keep the first T outputs), weight [C,1,K]:
  conv(x)[t,c] = bias[c] + sum_{k=0}^{K-1} w[c,0,k] * x[t-(K-1)+k, c]      (x at negative t = 0)

Model (both Mamba versions): h = embeddings[ids]; for each block: h = h + mixer(RMSNorm(h; block
norm.weight, layer_norm_epsilon)) (residual kept in fp32); h = RMSNorm(h; norm_f.weight);
logits = h @ embeddings.weight^T (tied lm_head), returned as float32.

Mamba-1 mixer. There is no `slow_forward` method any more in transformers 5.x: MambaMixer.forward
calls module-level functions (mamba_inner_fn, causal_conv1d_fn, mamba_selective_scan) that are
hub-kernel/mamba_ssm hooks falling back to PyTorch reference code; on CPU without those packages
the reference code runs (the fused mamba_inner_fn fallback returns None, and in eval mode it is not
even called). The script counts the calls to make sure. The computation (R = time_step_rank):
  xz = in_proj(x)                     [T, 2I] (+ bias if use_bias)
  x_in = xz[:, :I], z = xz[:, I:]     (chunk(2): FIRST half is the conv/SSM input, SECOND the gate)
  u = silu(conv(x_in))                conv1d.weight [I,1,K], conv1d.bias [I]
  x_dbl = x_proj(u)                   [T, R + 2N], no bias; split IN THIS ORDER: dt_low [R], B [N], C [N]
  dt = softplus(dt_low @ dt_proj.weight^T + dt_proj.bias)     [T, I]  (bias added before softplus)
  A = -exp(A_log)                     [I, N]
  s_0 = 0 [I, N];  s_t = exp(dt_t[:,None] * A) * s_{t-1} + (dt_t * u_t)[:,None] * B_t[None,:]
  y_t = s_t @ C_t                     [I]   (sequential loop; float32)
  y = y + u * D                       (D [I]; skip uses u = conv output after silu)
  y = y * silu(z)
  out = out_proj(y)                   [T, D] (+ bias if use_bias)

Mamba-2 mixer (the chunked "torch_forward" path is now the module-level mamba2_chunk_scan reference
function; the fused mamba2_split_conv1d_scan_combined fallback returns None; both checked). With
H = num_heads, P = head_dim (H*P = I), G = n_groups, conv_dim = I + 2*G*N:
  proj = in_proj(x)                   [T, I + conv_dim + H]; split IN THIS ORDER:
        z = proj[:, :I] (gate), xBC = proj[:, I:I+conv_dim], dt = proj[:, I+conv_dim:] [T, H]
        (no extra MLP slice in this version)
  xBC = silu(conv(xBC))               conv1d.weight [conv_dim,1,K], conv1d.bias [conv_dim]
  x = xBC[:, :I] -> [T, H, P] (head h = channels h*P .. h*P+P-1); B = xBC[:, I:I+G*N] -> [T, G, N];
  C = xBC[:, I+G*N:] -> [T, G, N]. Head h uses group g = h // (H/G) (repeat_interleave).
  dt = clamp(softplus(dt + dt_bias), time_step_limit[0], time_step_limit[1])   [T, H]
        (the clamp is always applied; the default (0.0, inf) makes it a no-op)
  A = -exp(A_log)                     [H] (one scalar per head)
  Per head h, state S [P, N], S_0 = 0:
        S_t = exp(dt_t,h * A_h) * S_{t-1} + dt_t,h * outer(x_t,h, B_t,g)
        y_t,h = S_t @ C_t,g + D_h * x_t,h        (D [H]; skip uses x BEFORE the dt scaling)
  HF evaluates this with the chunked SSD algorithm (chunk_size, zero-padding of the sequence at the
  END up to a multiple of chunk_size, exp(segment_sum) with -inf masking); it equals the sequential
  recurrence above (checked at T=13 and T=16 against a sequential float64 implementation).
  y -> [T, I]
  Gated RMSNorm (MambaRMSNormGated; gate FIRST, then norm, i.e. norm_before_gate=False), in fp32:
        g = y * silu(z);  split g into G groups of size I/G along the last dim (here 2 x 32);
        g = g * rsqrt(mean(g^2 over the group) + layer_norm_epsilon);  out = norm.weight [I] * g
        -> the normalisation is PER GROUP of I/n_groups, not over the whole intermediate dim
           (some older transformers releases normalised over all of I).
  out = out_proj(out)

Vision embeddings.
  Patchify: Conv2d(3, D, kernel=stride=patch, no padding, with bias) -> flatten -> tokens in row-major
  grid order (token = row*grid_w + col); gh = H // patch, gw = W // patch (remainders dropped).
  SigLIP: embeddings = patches + pos, pos = embeddings.position_embedding.weight [N, D] (no CLS).
    interpolate_pos_encoding=False: the table is added as is (needs exactly N patches).
    interpolate_pos_encoding=True: if num_patches == N and H == W the table is used as is; otherwise
    table -> [1, n, n, D] (n = sqrt(N)) -> NCHW -> F.interpolate(size=(gh, gw), mode="bicubic",
    align_corners=False) (antialias False, no float32 upcast, no scale_factor, no +0.1 offset)
    -> back to [gh*gw, D] row-major.
  Dinov2: embeddings = cat(cls_token, patches) + pos (dropout p=0). If num_patches == N and H == W,
    pos = position_embeddings as is; otherwise the CLS row pos[:, :1] is kept separately and
    untouched, the patch rows pos[:, 1:] are reshaped [1, n, n, D] -> NCHW, cast to float32,
    F.interpolate(size=(gh, gw), mode="bicubic", align_corners=False, antialias=False), cast back,
    flattened row-major and concatenated after the CLS row.
    This version uses size=(gh, gw) -- NOT the scale_factor=((gh+0.1)/n, (gw+0.1)/n) "+0.1 offset
    trick" of older transformers releases / the original DINOv2 code, whose source coordinates
    (scaled by 1/scale_factor) differ slightly.
  Dinov2WithRegisters: as Dinov2 but F.interpolate(..., antialias=True), and the register tokens
    (embeddings.register_tokens [1, R, D], NO position embedding) are inserted AFTER the positions
    were added: sequence = [cls + pos_cls, reg_0 .. reg_{R-1}, patches + pos_patches]. The
    "no interpolation" shortcut is decided before the registers are inserted (as for Dinov2).
  Plain bicubic (antialias=False), separable, per axis with in -> out (the order of the two 1D
  passes only changes float rounding):
    scale = in/out; src = scale*(o + 0.5) - 0.5 (NOT clamped to >= 0 for cubic); i0 = floor(src);
    t = src - i0; taps i0-1, i0, i0+1, i0+2, each index clamped to [0, in-1] (edge replicate);
    weights [c2(t+1), c1(t), c1(1-t), c2(2-t)] with A = -0.75,
    c1(x) = ((A+2)x - (A+3))x^2 + 1,  c2(x) = ((Ax - 5A)x + 8A)x - 4A.
    (in == out gives the identity.)
  Antialiased bicubic (antialias=True; PIL-style, used by the registers model EVEN WHEN UPSAMPLING,
  where it still differs from the plain kernel): per axis, scale = in/out,
    support = 2*scale if scale >= 1 else 2;  invscale = 1/scale if scale >= 1 else 1;
    center = scale*(o + 0.5); xmin = max(int(center - support + 0.5), 0);
    xmax = min(int(center + support + 0.5), in)   (int() truncates toward zero);
    w_j = k((xmin + j - center + 0.5) * invscale) for j in [0, xmax - xmin), then w /= sum(w);
    k(x) = ((a+2)|x| - (a+3))|x|^2 + 1 for |x| < 1, (((|x| - 5)|x| + 8)|x| - 4)*a for 1 <= |x| < 2,
    0 otherwise, with a = -0.5. Taps outside [0, in) are dropped (renormalised), not replicated.
  Both weight formulas are checked against torch in float64 (max rel err < 1e-12) by
  check_interpolation_description(); np_bicubic_weights / np_bicubic_aa_weights give them as
  [out, in] matrices: grid_out = W_h @ grid @ W_w^T per channel.
Vision encoder blocks (pre-LN, eps = layer_norm_eps):
  SigLIP:  x = x + out_proj(MHA(layer_norm1(x)));  x = x + fc2(gelu_tanh(fc1(layer_norm2(x))));
           last_hidden_state = post_layernorm(x). Attention: q/k/v/out Linear with bias, heads of
           D/heads, softmax(q k^T * head_dim^-0.5) v. Head (vision_use_head): torch
           nn.MultiheadAttention(batch_first) with packed in_proj_weight [3D, D] (rows q | k | v),
           in_proj_bias [3D], query = probe [1,1,D], key = value = last_hidden_state; then
           h = attn + mlp(head.layernorm(attn)); pooler_output = h[:, 0].
  Dinov2(+registers): x = x + lambda1 * attn(norm1(x)); x = x + lambda2 * fc2(gelu(fc1(norm2(x))))
           (gelu = exact erf GELU, mlp hidden = mlp_ratio*D, qkv_bias True);
           last_hidden_state = layernorm(x); pooler_output = last_hidden_state[:, 0].
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import safetensors
import safetensors.numpy
import torch
import torch.nn.functional as F
import transformers
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

try:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
except ImportError:  # pragma: no cover - reported, fixture skipped
    Dinov2WithRegistersConfig = Dinov2WithRegistersModel = None

import transformers.models.mamba.modeling_mamba as hf_mamba
import transformers.models.mamba2.modeling_mamba2 as hf_mamba2

MAX_FIXTURE_BYTES = 300 * 1024
MAX_TOTAL_BYTES = 2 * 1024 * 1024

# --------------------------------------------------------------------------------------------
# Setup and small helpers
# --------------------------------------------------------------------------------------------


def setup_determinism() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def assert_no_fast_kernels() -> None:
    """The fixtures must come from the pure-PyTorch reference code paths."""
    for pkg in ("mamba_ssm", "causal_conv1d", "kernels"):
        if importlib.util.find_spec(pkg) is not None:
            raise SystemExit(
                f"package `{pkg}` is installed: transformers could route Mamba through fused kernels. "
                "Generate the fixtures in an environment without it."
            )


def perturb_(model: torch.nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """Adds scale*N(0,1) noise to every parameter so that no value is a trivial 0/1 init."""
    with torch.no_grad():
        for _, p in model.named_parameters():  # tied parameters are listed once
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def f32(t: torch.Tensor) -> np.ndarray:
    # np.array (not np.ascontiguousarray, which turns a 0-d scalar into shape [1]) keeps scalars 0-d
    return np.array(t.detach().to(torch.float32).cpu().numpy(), dtype=np.float32, order="C")


def u32(t: torch.Tensor) -> np.ndarray:
    a = t.detach().cpu().numpy()
    assert a.min() >= 0 and a.max() < 2**32
    return np.array(a, dtype=np.uint32, order="C")


def base_metadata(name: str, description: str, **extra: str) -> dict[str, str]:
    md = {
        "fixture": name,
        "description": description,
        "generator": "scripts/make_fixtures.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "safetensors_version": safetensors.__version__,
        "numpy_version": np.__version__,
        "dtype": "float32",
        "device": "cpu",
    }
    md.update({k: str(v) for k, v in extra.items()})
    return md


def save_model(model: torch.nn.Module, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in out_dir.iterdir():
        f.chmod(0o644)
    # keep only what the Rust side consumes (save_pretrained may add generation_config.json)
    for extra in sorted(out_dir.iterdir()):
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()


def write_safetensors_sorted(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Byte-reproducible safetensors writer (the safetensors library orders `__metadata__` keys
    arbitrarily, so two runs would differ byte-wise). Names and metadata keys are sorted, data is
    laid out in name order, the header is space-padded to a multiple of 8 bytes, little-endian."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.uint32): "U32"}
    header: dict = {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = tensors[name]  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for b in blobs:
            f.write(b)


def save_reference(out_dir: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    for k, v in tensors.items():
        assert v.dtype in (np.float32, np.uint32), (k, v.dtype)
    path = out_dir / "reference.safetensors"
    write_safetensors_sorted(path, tensors, metadata)
    # round-trip through the official reader
    back = safetensors.numpy.load_file(str(path))
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k]), k
    with safetensors.safe_open(str(path), "np") as f:
        assert f.metadata() == metadata


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def check_close(what: str, got, want, tol: float) -> None:
    e = rel_err(got, want)
    if not e <= tol:
        raise AssertionError(f"{what}: relative error {e:.3e} > {tol:.1e}")
    print(f"    ok  {what}: rel err {e:.2e}")


class CallCounter:
    """Wraps a module-level function of a transformers modeling file and counts calls."""

    def __init__(self, module, name: str):
        self.module, self.name = module, name
        self.orig = getattr(module, name)
        self.calls = 0
        self.returned_none = 0

        def wrapper(*args, **kwargs):
            self.calls += 1
            r = self.orig(*args, **kwargs)
            if r is None:
                self.returned_none += 1
            return r

        setattr(module, name, wrapper)

    def restore(self) -> None:
        setattr(self.module, self.name, self.orig)


# --------------------------------------------------------------------------------------------
# Independent float64 NumPy re-implementations of the documented computations. They exist to
# prove that the header comments describe exactly what transformers computes: every fixture is
# checked against them, so the Rust side can follow the comments (and these functions).
# --------------------------------------------------------------------------------------------


def np_silu(x):
    return x / (1.0 + np.exp(-x))


def np_softplus(x):  # torch.nn.functional.softplus(beta=1, threshold=20)
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def np_rmsnorm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def np_causal_depthwise_conv(x, w, b):
    """x [T, C], w [C, 1, K] (torch Conv1d weight), b [C] or None -> [T, C].
    out[t, c] = b[c] + sum_k w[c, 0, k] * x[t - (K-1) + k, c]   (x[negative] = 0)."""
    T, C = x.shape
    K = w.shape[-1]
    xp = np.concatenate([np.zeros((K - 1, C)), x], axis=0)
    out = np.zeros((T, C)) if b is None else np.tile(b[None, :], (T, 1)).astype(np.float64)
    for k in range(K):
        out = out + w[None, :, 0, k] * xp[k : k + T]
    return out


def np_mamba1_mixer(x, p, cfg):
    I, N, R = cfg.intermediate_size, cfg.state_size, cfg.time_step_rank
    xz = x @ p["in_proj.weight"].T
    if "in_proj.bias" in p:
        xz = xz + p["in_proj.bias"]
    xi, z = xz[:, :I], xz[:, I:]
    u = np_silu(np_causal_depthwise_conv(xi, p["conv1d.weight"], p.get("conv1d.bias")))
    xdbl = u @ p["x_proj.weight"].T
    dt_low, B, C = xdbl[:, :R], xdbl[:, R : R + N], xdbl[:, R + N :]
    dt = np_softplus(dt_low @ p["dt_proj.weight"].T + p["dt_proj.bias"])  # [T, I]
    A = -np.exp(p["A_log"])  # [I, N]
    s = np.zeros((I, N))
    ys = []
    for t in range(x.shape[0]):
        s = np.exp(dt[t][:, None] * A) * s + (dt[t] * u[t])[:, None] * B[t][None, :]
        ys.append(s @ C[t])
    y = np.stack(ys) + u * p["D"]
    y = y * np_silu(z)
    out = y @ p["out_proj.weight"].T
    if "out_proj.bias" in p:
        out = out + p["out_proj.bias"]
    return out


def np_mamba2_mixer(x, p, cfg):
    T = x.shape[0]
    I = cfg.expand * cfg.hidden_size
    G, N, H, P = cfg.n_groups, cfg.state_size, cfg.num_heads, cfg.head_dim
    conv_dim = I + 2 * G * N
    proj = x @ p["in_proj.weight"].T
    if "in_proj.bias" in p:
        proj = proj + p["in_proj.bias"]
    z, xbc, dt_raw = proj[:, :I], proj[:, I : I + conv_dim], proj[:, I + conv_dim :]
    assert dt_raw.shape[1] == H
    xbc = np_silu(np_causal_depthwise_conv(xbc, p["conv1d.weight"], p.get("conv1d.bias")))
    xs = xbc[:, :I].reshape(T, H, P)
    B = xbc[:, I : I + G * N].reshape(T, G, N)
    C = xbc[:, I + G * N :].reshape(T, G, N)
    lo, hi = cfg.time_step_limit
    dt = np.clip(np_softplus(dt_raw + p["dt_bias"]), lo, hi)  # [T, H]
    A = -np.exp(p["A_log"])  # [H]
    y = np.zeros((T, H, P))
    heads_per_group = H // G
    for h in range(H):
        g = h // heads_per_group
        S = np.zeros((P, N))
        for t in range(T):
            S = np.exp(dt[t, h] * A[h]) * S + dt[t, h] * np.outer(xs[t, h], B[t, g])
            y[t, h] = S @ C[t, g] + p["D"][h] * xs[t, h]
    y = y.reshape(T, I)
    gated = y * np_silu(z)
    gs = gated.reshape(T, G, I // G)
    gs = gs / np.sqrt(np.mean(gs * gs, axis=-1, keepdims=True) + cfg.layer_norm_epsilon)
    out = p["norm.weight"] * gs.reshape(T, I)
    out = out @ p["out_proj.weight"].T
    if "out_proj.bias" in p:
        out = out + p["out_proj.bias"]
    return out


def np_mamba_lm(model, ids, mixer_fn):
    """Full causal-LM forward (batch 1) in float64: embeddings -> L x [x + mixer(RMSNorm(x))]
    -> RMSNorm(norm_f) -> tied lm_head (logits = h @ embeddings.T)."""
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    E = sd["backbone.embeddings.weight"]
    h = E[ids]
    for l in range(cfg.num_hidden_layers):
        pre = f"backbone.layers.{l}."
        p = {k[len(pre) + len("mixer.") :]: v for k, v in sd.items() if k.startswith(pre + "mixer.")}
        h = h + mixer_fn(np_rmsnorm(h, sd[pre + "norm.weight"], cfg.layer_norm_epsilon), p, cfg)
    h = np_rmsnorm(h, sd["backbone.norm_f.weight"], cfg.layer_norm_epsilon)
    W = sd.get("lm_head.weight", E)
    return h @ W.T


def np_cross_entropy(logits, targets):
    m = logits.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(len(targets)), targets]))


# ---- bicubic interpolation (torch.nn.functional.interpolate, align_corners=False, size=...) ----


def np_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weight matrix of torch's plain bicubic (antialias=False) along one axis."""
    Acoef = -0.75
    scale = in_size / out_size  # `size=` given -> scale is in/out (not 1/scale_factor)
    W = np.zeros((out_size, in_size))
    for o in range(out_size):
        src = scale * (o + 0.5) - 0.5  # NOT clamped at 0 for cubic
        i0 = math.floor(src)
        t = src - i0

        def c1(x):  # |x| <= 1
            return ((Acoef + 2) * x - (Acoef + 3)) * x * x + 1

        def c2(x):  # 1 < |x| < 2
            return ((Acoef * x - 5 * Acoef) * x + 8 * Acoef) * x - 4 * Acoef

        coeffs = [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
        for k, c in enumerate(coeffs):
            idx = min(max(i0 - 1 + k, 0), in_size - 1)  # border replicate
            W[o, idx] += c
    return W


def np_bicubic_aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weight matrix of torch's antialiased bicubic (antialias=True) along one axis."""
    a = -0.5  # the AA path uses the PIL / Keys a=-0.5 kernel, not -0.75

    def filt(x):
        x = abs(x)
        if x < 1.0:
            return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if x < 2.0:
            return (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return 0.0

    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    W = np.zeros((out_size, in_size))
    for o in range(out_size):
        center = scale * (o + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        w = np.array([filt((j + xmin - center + 0.5) * invscale) for j in range(xmax - xmin)])
        total = w.sum()
        if total != 0.0:
            w = w / total
        W[o, xmin:xmax] = w
    return W


def np_interpolate_grid(grid, out_h, out_w, antialias: bool):
    """grid [gh, gw, D] -> [out_h, out_w, D] (separable; W_h @ grid @ W_w^T per channel)."""
    wfn = np_bicubic_aa_weights if antialias else np_bicubic_weights
    Wh = wfn(grid.shape[0], out_h)
    Ww = wfn(grid.shape[1], out_w)
    return np.einsum("oh,hwd,pw->opd", Wh, grid, Ww)


def check_interpolation_description() -> None:
    """Proves the bicubic descriptions in the header against torch (float64, ~exact)."""
    g = torch.Generator().manual_seed(1234)
    for antialias in (False, True):
        for (ih, iw, oh, ow) in [(4, 4, 6, 6), (4, 4, 3, 5), (4, 4, 4, 4), (5, 3, 9, 2), (16, 16, 37, 7)]:
            x = torch.randn(1, 3, ih, iw, generator=g, dtype=torch.float64)
            want = F.interpolate(x, size=(oh, ow), mode="bicubic", align_corners=False, antialias=antialias)
            got = np_interpolate_grid(x[0].permute(1, 2, 0).numpy(), oh, ow, antialias)
            e = rel_err(got, want[0].permute(1, 2, 0).numpy())
            assert e < 1e-12, (antialias, ih, iw, oh, ow, e)
    print("    ok  bicubic (plain and antialias) weight descriptions match torch in float64")


# --------------------------------------------------------------------------------------------
# Mamba-1
# --------------------------------------------------------------------------------------------


def mamba_config() -> MambaConfig:
    return MambaConfig(
        vocab_size=64,
        hidden_size=16,
        state_size=8,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=4,
        time_step_rank=4,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        residual_in_fp32=True,
        layer_norm_epsilon=1e-5,
        hidden_act="silu",
    )


def lm_forward_with_grads(model, ids: torch.Tensor):
    """ids [1, T]. Returns logits [T, V], loss (scalar), {param name: grad} and per-block hidden states."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    logits = out.logits[0]
    loss = F.cross_entropy(logits[:-1], ids[0, 1:])
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    # the built-in shifted loss must agree with the explicit one
    with torch.no_grad():
        hf_loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    check_close("HF labels= loss vs F.cross_entropy(logits[:-1], ids[1:])", hf_loss.item(), loss.item(), 1e-6)
    hidden = [h[0].detach() for h in out.hidden_states]
    return logits.detach(), loss.detach(), grads, hidden


def make_mamba(out: Path) -> None:
    name = "mamba"
    print(f"[{name}]")
    torch.manual_seed(0)
    cfg = mamba_config()
    model = MambaForCausalLM(cfg).eval()
    perturb_(model, torch.Generator().manual_seed(100))
    assert model.lm_head.weight is model.backbone.embeddings.weight, "embeddings must be tied"

    ids = torch.randint(0, cfg.vocab_size, (1, 13), generator=torch.Generator().manual_seed(200))

    scan = CallCounter(hf_mamba, "mamba_selective_scan")
    fused = CallCounter(hf_mamba, "mamba_inner_fn")
    try:
        logits, loss, grads, hidden = lm_forward_with_grads(model, ids)
    finally:
        scan.restore()
        fused.restore()
    assert scan.calls > 0, "reference selective scan was not used"
    assert fused.calls == fused.returned_none, "a fused Mamba kernel produced the output"
    assert scan.orig.__module__ == hf_mamba.__name__

    ref_logits = np_mamba_lm(model, ids[0].numpy(), np_mamba1_mixer)
    check_close("logits vs float64 NumPy re-implementation of the header description", f32(logits), ref_logits, 1e-4)
    check_close("loss vs NumPy", loss.item(), np_cross_entropy(ref_logits[:-1], ids[0, 1:].numpy()), 1e-4)

    out_dir = out / name
    save_model(model, out_dir)
    tensors = {"input_ids": u32(ids[0]), "logits": f32(logits), "loss": f32(loss)}
    for i, h in enumerate(hidden):
        tensors[f"hidden_states.{i}"] = f32(h)
    for n, g in grads.items():
        tensors[f"grad.{n}"] = f32(g)
    md = base_metadata(
        name,
        "MambaForCausalLM tiny random (perturbed) model. input_ids U32 [13]; logits [13,64]; "
        "loss = mean CE of logits[t] vs input_ids[t+1], t=0..11; grad.<param> = d loss / d param "
        "(tied lm_head covered by grad.backbone.embeddings.weight); hidden_states.i = output_hidden_states[i] "
        "(i<L: residual stream after block i, i=L: after norm_f).",
        num_hidden_states=len(hidden),
    )
    save_reference(out_dir, tensors, md)


# --------------------------------------------------------------------------------------------
# Mamba-2
# --------------------------------------------------------------------------------------------


def mamba2_config() -> Mamba2Config:
    return Mamba2Config(
        vocab_size=64,
        hidden_size=32,
        state_size=8,
        num_heads=8,
        head_dim=8,
        expand=2,
        n_groups=2,
        chunk_size=8,
        conv_kernel=4,
        num_hidden_layers=2,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        residual_in_fp32=True,
        layer_norm_epsilon=1e-5,
        hidden_act="silu",
        # Not read by transformers 5.23 (gate-then-grouped-norm is hard-coded); kept because real
        # Mamba-2 checkpoints (e.g. Mamba-Codestral) carry them and they describe what is computed.
        norm_before_gate=False,
        rms_norm=True,
    )


def make_mamba2(out: Path) -> None:
    name = "mamba2"
    print(f"[{name}]")
    torch.manual_seed(1)
    cfg = mamba2_config()
    model = Mamba2ForCausalLM(cfg).eval()
    perturb_(model, torch.Generator().manual_seed(101))
    assert model.lm_head.weight is model.backbone.embeddings.weight, "embeddings must be tied"
    mixer = model.backbone.layers[0].mixer
    assert mixer.norm.group_size == mixer.intermediate_size // cfg.n_groups

    gen = torch.Generator().manual_seed(201)
    ids13 = torch.randint(0, cfg.vocab_size, (1, 13), generator=gen)
    ids16 = torch.randint(0, cfg.vocab_size, (1, 16), generator=gen)
    assert 13 % cfg.chunk_size != 0 and 16 % cfg.chunk_size == 0

    chunk = CallCounter(hf_mamba2, "mamba2_chunk_scan")
    fused = CallCounter(hf_mamba2, "mamba2_split_conv1d_scan_combined")
    step = CallCounter(hf_mamba2, "mamba2_selective_state_update")
    try:
        logits, loss, grads, hidden = lm_forward_with_grads(model, ids13)
        with torch.no_grad():
            out16 = model(input_ids=ids16, use_cache=False, output_hidden_states=True)
        logits16 = out16.logits[0]
        loss16 = F.cross_entropy(logits16[:-1], ids16[0, 1:])
    finally:
        chunk.restore()
        fused.restore()
        step.restore()
    assert chunk.calls > 0, "torch chunked scan (mamba2_chunk_scan reference) was not used"
    assert fused.calls == fused.returned_none, "a fused Mamba-2 kernel produced the output"
    assert step.calls == 0
    assert chunk.orig.__module__ == hf_mamba2.__name__

    for tag, i, lg in (("13", ids13, logits), ("16", ids16, logits16)):
        ref = np_mamba_lm(model, i[0].numpy(), np_mamba2_mixer)
        check_close(f"logits(len {tag}) vs float64 NumPy sequential-recurrence re-implementation", f32(lg), ref, 1e-4)

    out_dir = out / name
    save_model(model, out_dir)
    tensors = {
        "input_ids": u32(ids13[0]),
        "logits": f32(logits),
        "loss": f32(loss),
        "input_ids_16": u32(ids16[0]),
        "logits_16": f32(logits16),
        "loss_16": f32(loss16),
    }
    for i, h in enumerate(hidden):
        tensors[f"hidden_states.{i}"] = f32(h)
    for n, g in grads.items():
        tensors[f"grad.{n}"] = f32(g)
    md = base_metadata(
        name,
        "Mamba2ForCausalLM tiny random (perturbed) model, chunk_size 8. input_ids U32 [13] (not a multiple "
        "of chunk_size); logits [13,64]; loss = mean CE of logits[t] vs input_ids[t+1]; grad.<param> for "
        "the 13-token loss; input_ids_16/logits_16/loss_16 for an exact multiple of chunk_size (no grads); "
        "hidden_states.i as for mamba (13-token input).",
        num_hidden_states=len(hidden),
        gated_norm="gate-then-RMSNorm per group of intermediate_size/n_groups",
    )
    save_reference(out_dir, tensors, md)


# --------------------------------------------------------------------------------------------
# Vision encoders
# --------------------------------------------------------------------------------------------

VISION_INPUTS = {
    # suffix: (batch, height, width)
    "": (2, 28, 28),
    "_42": (1, 42, 42),
    "_21x35": (1, 21, 35),
}


def capture_layer_outputs(layers):
    store: list[torch.Tensor] = []
    hooks = [l.register_forward_hook(lambda m, i, o: store.append(o[0] if isinstance(o, tuple) else o)) for l in layers]
    return store, hooks


def vision_forward(model, pixel_values, layers, embeddings_module, **kwargs):
    store, hooks = capture_layer_outputs(layers)
    emb_store: list[torch.Tensor] = []
    hooks.append(embeddings_module.register_forward_hook(lambda m, i, o: emb_store.append(o)))
    try:
        with torch.no_grad():
            out = model(pixel_values=pixel_values, output_hidden_states=True, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    hs = out.hidden_states
    # Document / verify what hidden_states holds in this transformers version:
    # (embeddings output, block 0 output, ..., block L-1 output); the last entry is the raw output of
    # the last block, i.e. BEFORE the final layernorm; penultimate = hidden_states[-2] = block L-2 output.
    assert len(hs) == len(layers) + 1, len(hs)
    assert torch.equal(hs[0], emb_store[0])
    for i, t in enumerate(store):
        assert torch.equal(hs[i + 1], t), i
    assert not torch.allclose(hs[-1], out.last_hidden_state)
    return out, emb_store[0]


def np_patch_embed(pixel_values, conv_w, conv_b):
    """Conv2d(kernel=stride=patch, no padding) -> tokens [B, gh*gw, D], row-major over the grid."""
    Bn, Cc, Hh, Ww = pixel_values.shape
    D, _, p, _ = conv_w.shape
    gh, gw = Hh // p, Ww // p
    x = pixel_values[:, :, : gh * p, : gw * p].reshape(Bn, Cc, gh, p, gw, p)
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(Bn, gh * gw, Cc * p * p)
    return x @ conv_w.reshape(D, -1).T + conv_b, gh, gw


def make_vision(out: Path, name: str) -> None:
    print(f"[{name}]")
    seed = {"siglip": 2, "dinov2": 3, "dinov2_registers": 4}[name]
    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        layer_norm_eps=1e-6,
    )
    if name == "siglip":
        cfg = SiglipVisionConfig(intermediate_size=64, hidden_act="gelu_pytorch_tanh", **common)
        model_cls = SiglipVisionModel
    elif name == "dinov2":
        cfg = Dinov2Config(mlp_ratio=2, layerscale_value=1.0, **common)
        model_cls = Dinov2Model
    else:
        cfg = Dinov2WithRegistersConfig(mlp_ratio=2, layerscale_value=1.0, num_register_tokens=2, **common)
        model_cls = Dinov2WithRegistersModel

    model = model_cls(cfg).eval()
    perturb_(model, torch.Generator().manual_seed(100 + seed))
    # references use the eager (explicit softmax) attention; SDPA (the default) is cross-checked below
    model.set_attn_implementation("eager")

    if name == "siglip":
        layers = model.encoder.layers
        emb_mod = model.embeddings
        extra = dict(vision_use_head=str(cfg.vision_use_head))
    else:
        layers = model.encoder.layer
        emb_mod = model.embeddings
        extra = {}

    gen = torch.Generator().manual_seed(300 + seed)
    tensors: dict[str, np.ndarray] = {}
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    for suffix, (b, h, w) in VISION_INPUTS.items():
        px = torch.randn(b, 3, h, w, generator=gen)
        kwargs = {}
        if name == "siglip" and suffix:
            kwargs["interpolate_pos_encoding"] = True
        out_e, emb = vision_forward(model, px, layers, emb_mod, **kwargs)

        # cross-check the default SDPA attention
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            out_s = model(pixel_values=px, **kwargs)
        model.set_attn_implementation("eager")
        check_close(f"{suffix or '_28'}: eager vs sdpa last_hidden_state", f32(out_s.last_hidden_state), f32(out_e.last_hidden_state), 1e-5)

        # check the documented embedding construction (patchify + position interpolation + tokens)
        pv = px.double().numpy()
        if name == "siglip":
            tok, gh, gw = np_patch_embed(pv, sd["embeddings.patch_embedding.weight"], sd["embeddings.patch_embedding.bias"])
            pos = sd["embeddings.position_embedding.weight"]  # [16, D]
            n = int(round(math.sqrt(pos.shape[0])))
            if kwargs.get("interpolate_pos_encoding") and not (gh * gw == pos.shape[0] and h == w):
                pos = np_interpolate_grid(pos.reshape(n, n, -1), gh, gw, antialias=False).reshape(gh * gw, -1)
            ref_emb = tok + pos[None]
        else:
            tok, gh, gw = np_patch_embed(
                pv, sd["embeddings.patch_embeddings.projection.weight"], sd["embeddings.patch_embeddings.projection.bias"]
            )
            pos = sd["embeddings.position_embeddings"][0]  # [1 + 16, D]; row 0 belongs to CLS
            cls_pos, patch_pos = pos[:1], pos[1:]
            n = int(round(math.sqrt(patch_pos.shape[0])))
            if not (gh * gw == patch_pos.shape[0] and h == w):
                patch_pos = np_interpolate_grid(
                    patch_pos.reshape(n, n, -1), gh, gw, antialias=(name == "dinov2_registers")
                ).reshape(gh * gw, -1)
            cls = sd["embeddings.cls_token"][0] + cls_pos  # [1, D]
            seq = np.concatenate([np.broadcast_to(cls, (b, 1, cls.shape[-1])), tok + patch_pos[None]], axis=1)
            if name == "dinov2_registers":
                reg = np.broadcast_to(sd["embeddings.register_tokens"], (b,) + sd["embeddings.register_tokens"].shape[1:])
                seq = np.concatenate([seq[:, :1], reg, seq[:, 1:]], axis=1)  # registers get NO position embedding
            ref_emb = seq
        check_close(f"{suffix or '_28'}: embeddings vs NumPy (patchify + bicubic pos interpolation)", f32(emb), ref_emb, 1e-5)

        tensors[f"pixel_values{suffix}"] = f32(px)
        tensors[f"last_hidden_state{suffix}"] = f32(out_e.last_hidden_state)
        tensors[f"penultimate_hidden_state{suffix}"] = f32(out_e.hidden_states[-2])
        tensors[f"embeddings{suffix}"] = f32(emb)
        if out_e.pooler_output is not None:
            tensors[f"pooler_output{suffix}"] = f32(out_e.pooler_output)

    out_dir = out / name
    save_model(model, out_dir)
    reg = f" + {cfg.num_register_tokens} registers" if name == "dinov2_registers" else ""
    cls_note = "" if name == "siglip" else f" Token order: CLS{reg} then patches (row-major)."
    md = base_metadata(
        name,
        f"{model_cls.__name__} tiny random (perturbed) model. For each suffix in ['', '_42', '_21x35']: "
        "pixel_values{s} [B,3,H,W] ([2,3,28,28], [1,3,42,42], [1,3,21,35]); last_hidden_state{s} (after the "
        "final layernorm); penultimate_hidden_state{s} = output_hidden_states[-2] (output of block L-2, no "
        "final norm); embeddings{s} = embeddings module output (= hidden_states[0]); pooler_output{s}."
        + cls_note
        + (" SigLIP '_42'/'_21x35' use interpolate_pos_encoding=True; '' uses the default False." if name == "siglip" else " Position embeddings always interpolated when the grid differs."),
        attn_implementation="eager (sdpa cross-checked < 1e-5)",
        **extra,
    )
    save_reference(out_dir, tensors, md)


# --------------------------------------------------------------------------------------------
# Verification: every fixture reloads with from_pretrained and reproduces its reference
# --------------------------------------------------------------------------------------------


def verify(out: Path, names: list[str]) -> None:
    print("[verify] reloading every fixture with from_pretrained")
    classes = {
        "mamba": MambaForCausalLM,
        "mamba2": Mamba2ForCausalLM,
        "siglip": SiglipVisionModel,
        "dinov2": Dinov2Model,
        "dinov2_registers": Dinov2WithRegistersModel,
    }
    total = 0
    for name in names:
        d = out / name
        size = sum(f.stat().st_size for f in d.iterdir())
        total += size
        assert size < MAX_FIXTURE_BYTES, f"{name} is {size} bytes"
        ref = safetensors.numpy.load_file(str(d / "reference.safetensors"))
        model = classes[name].from_pretrained(d, attn_implementation="eager" if name not in ("mamba", "mamba2") else None).eval()
        if name in ("mamba", "mamba2"):
            ids = torch.from_numpy(ref["input_ids"].astype(np.int64))[None]
            logits, loss, grads, hidden = lm_forward_with_grads(model, ids)
            assert np.array_equal(f32(logits), ref["logits"]), name
            assert np.array_equal(f32(loss), ref["loss"]), name
            for n, g in grads.items():
                assert np.array_equal(f32(g), ref[f"grad.{n}"]), (name, n)
            assert len(grads) == sum(k.startswith("grad.") for k in ref)
            if name == "mamba2":
                ids16 = torch.from_numpy(ref["input_ids_16"].astype(np.int64))[None]
                with torch.no_grad():
                    l16 = model(input_ids=ids16, use_cache=False).logits[0]
                assert np.array_equal(f32(l16), ref["logits_16"])
        else:
            for suffix in VISION_INPUTS:
                kwargs = {"interpolate_pos_encoding": True} if (name == "siglip" and suffix) else {}
                with torch.no_grad():
                    o = model(pixel_values=torch.from_numpy(ref[f"pixel_values{suffix}"]), output_hidden_states=True, **kwargs)
                assert np.array_equal(f32(o.last_hidden_state), ref[f"last_hidden_state{suffix}"]), (name, suffix)
                assert np.array_equal(f32(o.hidden_states[-2]), ref[f"penultimate_hidden_state{suffix}"]), (name, suffix)
        print(f"    ok  {name}: reloaded, outputs bit-identical, {size} bytes")
    assert total < MAX_TOTAL_BYTES, total
    print(f"    total {total} bytes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    setup_determinism()
    assert_no_fast_kernels()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, safetensors {safetensors.__version__}, numpy {np.__version__}")
    check_interpolation_description()

    names = ["mamba", "mamba2", "siglip", "dinov2"]
    make_mamba(out)
    make_mamba2(out)
    make_vision(out, "siglip")
    make_vision(out, "dinov2")
    if Dinov2WithRegistersModel is None:
        print("!! Dinov2WithRegistersModel is missing from this transformers; fixture dinov2_registers skipped")
    else:
        make_vision(out, "dinov2_registers")
        names.append("dinov2_registers")
    verify(out, names)
    (out / "README.md").write_text(
        "# Hugging Face parity fixtures\n\n"
        "Generated by `scripts/make_fixtures.py` (pinned versions in `scripts/requirements-fixtures.txt`);\n"
        "do not edit by hand. Each `<name>/` holds `config.json` + `model.safetensors` (the model's\n"
        "`save_pretrained` output) and `reference.safetensors` (inputs and expected outputs; F32, ids U32;\n"
        "versions in its `__metadata__`). The script's header documents every tensor and the exact\n"
        "computations (Mamba-1/2 mixers, gated norm, position-embedding interpolation) the Rust side\n"
        "must reproduce.\n\n"
        "Fixtures: " + ", ".join(f"`{n}`" for n in names) + ".\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
