#!/usr/bin/env bash
# Prepares everything a lent GPU machine (no Rust toolchain) must run for this project, so that a
# short device lease is one call:
#   scripts/gpu_session.sh            # here: builds release binaries, stages them in .gpu/
#   device run, carry [".gpu"], command "bash .gpu/session.sh"
# On the GPU machine session.sh runs, with EMMA_REQUIRE_GPU=1 (a GPU test fails rather than
# skips): the GPU test suites (every op, the Mamba scans, the whole model and the HF-parity
# fixtures against the CPU), then the benchmarks (cuda kernels and GEMM, Mamba layers at the
# paper's shapes), and, when a mamba_ssm source tree was staged with MAMBA_SRC=DIR, its Triton
# SSD kernel at the same shape. Logs land in $OUT (gpu-tests.log, gpu-bench.log).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
rm -rf .gpu && mkdir -p .gpu/bin .gpu/tests

# Prints the executables cargo reports building (tests when $1 is "test", else programs).
executables() {
  python3 -c 'import json, sys
want_test = sys.argv[1] == "test"
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"] == want_test:
        print(m["executable"])' "$1"
}

# The GPU test suites (the tests crate holds them) and the cuda crate's own tests.
cargo test --release -p tests -p cuda --no-run --message-format=json 2>/dev/null |
  executables test | while read -r exe; do
    case "$(basename "$exe")" in
      gpu_ops-* | gpu_scans-* | gpu_attention-* | gpu_determinism-* | gpu_nccl-* | gpu_model-* | hf_parity-* | cuda-* | gpu_device-* | nvrtc_compile-*) cp "$exe" .gpu/tests/ ;;
    esac
  done
# The benchmarks (their executables are built like tests, with harness = false).
cargo bench -p cuda -p nn --no-run --message-format=json 2>/dev/null |
  executables test | while read -r exe; do
    case "$(basename "$exe")" in gpu-* | mamba_layers-*) cp "$exe" .gpu/bin/ ;; esac
  done
cp scripts/bench_mamba_ssm.py scripts/bench_sdpa.py scripts/cuda_timing.py .gpu/
if [ -n "${MAMBA_SRC:-}" ]; then cp -r "$MAMBA_SRC" .gpu/mamba_src; fi
strip .gpu/bin/* .gpu/tests/* 2>/dev/null || true

echo "build_root=$root" >.gpu/build_root
cat >.gpu/session.sh <<'EOF'
#!/usr/bin/env bash
# Runs on the GPU machine: every staged GPU test suite, then every benchmark (see
# scripts/gpu_session.sh in the project).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
libs=""
for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  $(python3 -c 'import nvidia, glob, os; print(" ".join(glob.glob(os.path.join(nvidia.__path__[0], "*", "lib"))))' 2>/dev/null); do
  [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export EMMA_REQUIRE_GPU=1
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu-tests.log"
# The HF-parity suite reads its fixtures from the checkout it was built in (a path compiled into
# it); point that path at this copy of the working tree (the command runs in its root).
. "$here/build_root"
if [ ! -d "$build_root/tests/fixtures" ]; then
  mkdir -p "$build_root/tests" && ln -sfn "$PWD/tests/fixtures" "$build_root/tests/fixtures"
fi
status=0
for t in "$here"/tests/*; do
  echo "== $(basename "$t")" | tee -a "$out/gpu-tests.log"
  "$t" --test-threads=1 >>"$out/gpu-tests.log" 2>&1
  rc=$?
  tail -n 2 "$out/gpu-tests.log"
  if [ $rc -ne 0 ]; then
    echo "FAILED: $(basename "$t") (exit $rc)" | tee -a "$out/gpu-tests.log"
    status=1
  fi
done
for b in "$here"/bin/*; do
  echo "== $(basename "$b")" | tee -a "$out/gpu-bench.log"
  "$b" 2>&1 | tee -a "$out/gpu-bench.log" || status=1
done
echo "== PyTorch SDPA reference" | tee -a "$out/gpu-bench.log"
python3 "$here/bench_sdpa.py" 2>&1 | tee -a "$out/gpu-bench.log" || status=1
if [ -d "$here/mamba_src" ]; then
  echo "== mamba_ssm reference" | tee -a "$out/gpu-bench.log"
  PYTHONPATH="$here/mamba_src" python3 "$here/bench_mamba_ssm.py" 2>&1 | tee -a "$out/gpu-bench.log" || status=1
fi
exit $status
EOF
du -sh .gpu
ls .gpu/tests .gpu/bin
echo 'now: device run, carry [".gpu"], command "bash .gpu/session.sh"'
