#!/usr/bin/env bash
# Fetches NVRTC 13.0 (the PyPI wheel `nvidia-cuda-nvrtc`, no CUDA toolkit needed) into a cache and
# puts its library directory on LD_LIBRARY_PATH, so that the `cuda` crate can compile kernels on a
# machine with no GPU.
#
#   source scripts/nvrtc.sh                                 # exports EMMA_NVRTC_LIB, LD_LIBRARY_PATH
#   scripts/nvrtc.sh cargo run -p cuda --bin nvrtc-check    # runs one command with them set
#
# The cache directory is ${EMMA_NVRTC_CACHE:-$HOME/.cache/emma-rs/nvrtc}; the wheel is downloaded
# and unpacked once.

emma_nvrtc_setup() {
    local cache="${EMMA_NVRTC_CACHE:-$HOME/.cache/emma-rs/nvrtc}"
    local unpacked="$cache/unpacked"
    if [ ! -f "$unpacked/.complete" ]; then
        mkdir -p "$cache/wheels" || return 1
        if ! ls "$cache"/wheels/nvidia_cuda_nvrtc-13.0.*.whl >/dev/null 2>&1; then
            echo "nvrtc.sh: downloading nvidia-cuda-nvrtc==13.0.* into $cache/wheels" >&2
            python3 -m pip download --quiet --no-deps --only-binary=:all: \
                -d "$cache/wheels" "nvidia-cuda-nvrtc==13.0.*" >&2 || {
                echo "nvrtc.sh: pip download of nvidia-cuda-nvrtc==13.0.* failed" >&2
                return 1
            }
        fi
        local wheel
        wheel="$(ls "$cache"/wheels/nvidia_cuda_nvrtc-13.0.*.whl | sort | tail -n 1)"
        rm -rf "$unpacked.tmp"
        python3 -m zipfile -e "$wheel" "$unpacked.tmp" || {
            echo "nvrtc.sh: could not unzip $wheel" >&2
            return 1
        }
        rm -rf "$unpacked"
        mv "$unpacked.tmp" "$unpacked" && touch "$unpacked/.complete" || return 1
    fi
    local lib
    lib="$(dirname "$(find "$unpacked" -name 'libnvrtc.so.*' -print | sort | head -n 1)")"
    if [ -z "$lib" ] || [ "$lib" = "." ]; then
        echo "nvrtc.sh: no libnvrtc.so.* under $unpacked" >&2
        return 1
    fi
    export EMMA_NVRTC_LIB="$lib"
    export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "nvrtc.sh: NVRTC library directory $lib" >&2
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: export into the calling shell, never exit it.
    emma_nvrtc_setup
else
    set -euo pipefail
    emma_nvrtc_setup
    if [ "$#" -gt 0 ]; then
        exec "$@"
    fi
    echo "$EMMA_NVRTC_LIB"
fi
