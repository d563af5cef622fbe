#!/usr/bin/env python3
"""The CPU race: emma-rs against PyTorch + transformers on the same work, in one run.

Usage (a venv OUTSIDE the repository, versions pinned in scripts/requirements-race.txt):

    python3 -m venv /work/venv-race
    /work/venv-race/bin/pip install -r scripts/requirements-race.txt
    cargo build --release -p emma --bench race          # or let this script run cargo
    /work/venv-race/bin/python scripts/race_pytorch.py [--work /tmp/emma-race] [--threads 2]

What it does:
1. Builds random models with transformers (seed 0) and saves them with `save_pretrained`:
   two 84M-parameter LMs, 768 wide, 12 layers, vocabulary 50280 (Mamba-1 with state 16;
   Mamba-2 with 24 heads of 64, state 128, chunk 256), and the `small` preset's SigLIP and
   DINOv2 towers (64x64 images, patch 8, 128 wide, 4 layers, 4 heads). Inputs are random token
   ids (batch 1) and random pixels (batch 32).
2. For every case, runs a fresh PyTorch worker process and a fresh emma-rs worker process (the
   `race` bench of the emma crate) on the same files. Each loads the model, runs the case once
   to warm up, then times `--rounds` rounds and keeps the best. Each reports its best time and
   its peak resident memory: of the whole process, and above what it held once the model was
   loaded (the memory the work itself needs).
3. Compares the two outputs (logits or hidden states for a forward; the loss and the gradient of
   the first layer's input projection for forward+backward) and prints one row per case with
   the ratio ours / PyTorch time. A table in Markdown is written to <work>/race.md.

Both sides run in f32 with the same number of threads (torch.set_num_threads, RAYON_NUM_THREADS).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import race_tiny_emma  # noqa: E402  (the tiny EMMA twin, beside this script)

LM_LENGTHS = (512, 1024)
TOWER_BATCH = 32


def cases():
    """Every case: (name, model folder, kind, input name). PyTorch skips the Mamba-1 backward by
    default: transformers runs that scan as a Python loop (about a minute per round at 512)."""
    out = []
    for lm in ("mamba1", "mamba2"):
        for length in LM_LENGTHS:
            out.append((f"{lm}-forward-{length}", lm, "forward", f"ids_{length}"))
            out.append((f"{lm}-forward-backward-{length}", lm, "forward-backward", f"ids_{length}"))
    for tower in ("siglip", "dinov2"):
        out.append((f"{tower}-forward-b{TOWER_BATCH}", tower, "forward", "pixels"))
        out.append((f"{tower}-forward-backward-b{TOWER_BATCH}", tower, "forward-backward", "pixels"))
    out.append((f"tiny-emma-train-step-b{race_tiny_emma.BATCH}", "tiny-emma", "train-step", "emma"))
    return out


def status_mb(field: str) -> float:
    """A field of /proc/self/status in MB: VmHWM (peak resident; unlike getrusage's ru_maxrss it
    is not inherited from the parent across exec) or VmRSS (resident now)."""
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024.0


# ----------------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------------


def configs():
    import transformers as tf

    common_lm = dict(vocab_size=50280, hidden_size=768, num_hidden_layers=12, tie_word_embeddings=True,
                     residual_in_fp32=True, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True)
    tower = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 image_size=64, patch_size=8, layer_norm_eps=1e-6)
    return {
        "mamba1": (tf.MambaForCausalLM, tf.MambaConfig(state_size=16, expand=2, conv_kernel=4,
                                                         time_step_rank=48, **common_lm)),
        "mamba2": (tf.Mamba2ForCausalLM, tf.Mamba2Config(state_size=128, num_heads=24, head_dim=64, expand=2,
                                                          n_groups=1, chunk_size=256, conv_kernel=4, **common_lm)),
        "siglip": (tf.SiglipVisionModel, tf.SiglipVisionConfig(hidden_act="gelu_pytorch_tanh", **tower)),
        "dinov2": (tf.Dinov2WithRegistersModel, tf.Dinov2WithRegistersConfig(
            hidden_size=128, mlp_ratio=4, num_hidden_layers=4, num_attention_heads=4, image_size=64,
            patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", num_register_tokens=2)),
    }


def prepare(work: Path) -> None:
    """Writes every model folder and inputs.safetensors (once; a complete work folder is reused)."""
    import torch
    from safetensors.numpy import save_file

    race_tiny_emma.prepare(work / "tiny-emma")
    stamp = work / "prepared.json"
    if stamp.exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    for name, (cls, cfg) in configs().items():
        torch.manual_seed(0)
        model = cls(cfg).eval()
        out = work / name
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out, safe_serialization=True)
        for extra in out.iterdir():
            if extra.name not in ("config.json", "model.safetensors"):
                extra.unlink()
    rng = np.random.default_rng(0)
    inputs = {f"ids_{n}": rng.integers(0, 50280, size=n, dtype=np.uint32) for n in LM_LENGTHS}
    inputs["pixels"] = rng.standard_normal((TOWER_BATCH, 3, 64, 64), dtype=np.float32)
    # A tower's backward starts from loss = sum(last_hidden_state * weights): a random direction,
    # since a plain norm of a LayerNorm's output barely depends on the early layers.
    for tower, tokens in (("siglip", 64), ("dinov2", 64 + 1 + 2)):
        inputs[f"{tower}_weights"] = rng.standard_normal((TOWER_BATCH, tokens, 128), dtype=np.float32)
    save_file(inputs, str(work / "inputs.safetensors"))
    stamp.write_text(json.dumps({"torch": torch.__version__}))


# ----------------------------------------------------------------------------------------------
# The PyTorch worker: one case in this process
# ----------------------------------------------------------------------------------------------


def torch_worker(work: Path, case: str, rounds: int, threads: int) -> None:
    import torch
    from safetensors.numpy import load_file, save_file

    torch.set_num_threads(threads)
    name, model_dir, kind, input_name = next(c for c in cases() if c[0] == case)
    if kind == "train-step":
        return tiny_emma_worker(work, case, rounds)
    cls, _ = configs()[model_dir]
    model = cls.from_pretrained(work / model_dir, dtype=torch.float32).eval()
    files = load_file(str(work / "inputs.safetensors"))
    raw = files[input_name]
    is_lm = input_name.startswith("ids")
    x = torch.from_numpy(raw.astype(np.int64))[None] if is_lm else torch.from_numpy(raw)
    with torch.no_grad():  # weights may be memory-mapped: touch them so they count as loaded
        for p in model.parameters():
            p.sum()
    loaded_mb = status_mb("VmRSS")

    def forward():
        with torch.no_grad():
            out = model(input_ids=x, use_cache=False) if is_lm else model(pixel_values=x)
        return out.logits[0] if is_lm else out.last_hidden_state

    def forward_backward():
        model.zero_grad(set_to_none=True)
        if is_lm:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        else:
            weights = torch.from_numpy(files[f"{model_dir}_weights"])
            loss = (model(pixel_values=x).last_hidden_state * weights).sum()
        loss.backward()
        return loss

    run = forward if kind == "forward" else forward_backward
    result = run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    if kind == "forward":
        outputs = {"out": result.float().numpy()}
    else:
        grad = first_weight(model, model_dir).grad
        outputs = {"loss": np.array(result.item(), dtype=np.float32), "grad": grad.numpy()}
    save_file(outputs, str(work / "out" / f"{case}.torch.safetensors"))
    print(json.dumps({"ms": best * 1e3, "peak_mb": status_mb("VmHWM"), "loaded_mb": loaded_mb}))


def tiny_emma_worker(work: Path, case: str, rounds: int) -> None:
    """One training step of the tiny EMMA twin: timed over `rounds` steps after a first one,
    whose losses and gradients (from the initial weights, as on our side) are compared."""
    from safetensors.numpy import load_file, save_file

    files = load_file(str(work / "tiny-emma" / "inputs.safetensors"))
    step = race_tiny_emma.train_step_runner(files)
    loaded_mb = status_mb("VmRSS")
    (total, text, pixel), grads = step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    outputs = {k: np.array(v.item(), dtype=np.float32) for k, v in
               (("loss", total), ("text_loss", text), ("pixel_loss", pixel))}
    outputs.update({k: g.numpy() for k, g in grads.items()})
    save_file(outputs, str(work / "out" / f"{case}.torch.safetensors"))
    print(json.dumps({"ms": best * 1e3, "peak_mb": status_mb("VmHWM"), "loaded_mb": loaded_mb}))


def first_weight(model, model_dir: str):
    """The parameter whose gradient both sides compare: the first layer's input projection."""
    return {
        "mamba1": lambda: model.backbone.layers[0].mixer.in_proj.weight,
        "mamba2": lambda: model.backbone.layers[0].mixer.in_proj.weight,
        "siglip": lambda: model.encoder.layers[0].self_attn.q_proj.weight,
        "dinov2": lambda: model.encoder.layer[0].attention.q_proj.weight,
    }[model_dir]()


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.shape != b.shape or not np.all(np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_json(cmd, env) -> dict:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rust_binary(repo: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    out = subprocess.run(["cargo", "bench", "-p", "emma", "--bench", "race", "--no-run",
                          "--message-format=json"], cwd=repo, capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "race" and msg.get("executable"):
            return Path(msg["executable"])
    sys.exit("cargo built no `race` bench executable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/emma-race"), help="models, inputs and outputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per case (the best counts)")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--rust-bin", help="the built `race` bench (default: build it with cargo)")
    ap.add_argument("--torch-mamba1-backward", action="store_true",
                    help="also time transformers' Mamba-1 backward (a Python loop: minutes)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch_worker(args.work, args.worker, args.rounds, args.threads)
        return

    known = [c[0] for c in cases()]
    asked = [name for name in args.cases.split(",") if name] if args.cases else known
    unknown = [name for name in asked if name not in known]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [c for c in cases() if c[0] in asked]

    import torch
    import transformers

    repo = Path(__file__).resolve().parent.parent
    prepare(args.work)
    (args.work / "out").mkdir(exist_ok=True)
    binary = rust_binary(repo, args.rust_bin)
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    header = (f"{time.strftime('%Y-%m-%d')}, {cpu}, {args.threads} threads each, f32; torch {torch.__version__}, "
              f"transformers {transformers.__version__}; best of {args.rounds} rounds after a warm-up")
    print(header)
    rows = ["| case | PyTorch ms | ours ms | ours / PyTorch | peak MB PyTorch / ours (work only) | agreement |",
            "|---|---|---|---|---|---|"]
    for name, _, kind, _ in chosen:
        skip_torch = name.startswith("mamba1-forward-backward") and not args.torch_mamba1_backward
        ours = run_json([binary, "--work", args.work, "--case", name, "--rounds", str(args.rounds)], env)
        theirs = None if skip_torch else run_json(
            [sys.executable, __file__, "--work", args.work, "--worker", name, "--rounds", str(args.rounds),
             "--threads", str(args.threads)], env)
        agreement = "not compared"
        if theirs:
            from safetensors.numpy import load_file
            a = load_file(str(args.work / "out" / f"{name}.ours.safetensors"))
            b = load_file(str(args.work / "out" / f"{name}.torch.safetensors"))
            agreement = ", ".join(f"{k} {rel_err(a[k], b[k]):.1e}" for k in sorted(b))
        t_ms = f"{theirs['ms']:.1f}" if theirs else "—"
        ratio = f"{ours['ms'] / theirs['ms']:.2f}" if theirs else "—"
        mem = (f"{theirs['peak_mb']:.0f} / {ours['peak_mb']:.0f} "
               f"({theirs['peak_mb'] - theirs['loaded_mb']:.0f} / {ours['peak_mb'] - ours['loaded_mb']:.0f})"
               if theirs else f"— / {ours['peak_mb']:.0f} (— / {ours['peak_mb'] - ours['loaded_mb']:.0f})")
        row = f"| {name} | {t_ms} | {ours['ms']:.1f} | {ratio} | {mem} | {agreement} |"
        print(row, flush=True)
        rows.append(row)
    (args.work / "race.md").write_text(header + "\n\n" + "\n".join(rows) + "\n")
    print(f"table written to {args.work / 'race.md'}")


if __name__ == "__main__":
    main()
