//! Compiles every kernel source for sm_90 with NVRTC when libnvrtc can be loaded (no GPU
//! needed); otherwise prints one line saying why it skipped. With `EMMA_REQUIRE_NVRTC=1` a
//! missing NVRTC is a failure. `scripts/nvrtc.sh cargo test -p cuda --test nvrtc_compile`
//! fetches NVRTC first.

use cuda::compile::{self, ALL_KERNELS};
use cuda::probe::{self, Library};

#[test]
fn every_kernel_compiles_for_sm_90() {
    if let Err(e) = probe::find(Library::Nvrtc) {
        if std::env::var("EMMA_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("EMMA_REQUIRE_NVRTC=1 but NVRTC is unavailable: {e}");
        }
        eprintln!("skipped: NVRTC unavailable ({e}); run under scripts/nvrtc.sh to compile the kernels");
        return;
    }
    let failures: Vec<String> = ALL_KERNELS
        .iter()
        .filter_map(|file| compile::compile(file, "sm_90").err().map(|e| e.to_string()))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_broken_kernel_reports_its_file_and_log() {
    if probe::find(Library::Nvrtc).is_err() {
        eprintln!("skipped: NVRTC unavailable");
        return;
    }
    let broken = compile::KernelFile {
        name: "broken.cu",
        source:
            "#include \"common.cuh\"\nextern \"C\" __global__ void k(float *x) { x[0] = undefined_name; }\n",
    };
    let err = compile::compile(&broken, "sm_90").unwrap_err().to_string();
    assert!(
        err.contains("broken.cu") && err.contains("undefined_name"),
        "{err}"
    );
}
