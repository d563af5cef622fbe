//! Test-only kernels with deliberate faults, and what the emulator reports for each; and the
//! tensor-core mma against a plain product.

use crate::compile::KernelFile;
use crate::launch::{launch, Arg, Grid};
use crate::{CudaError, GpuDevice};

/// Kernels that each get one thing wrong (and two that get it right).
const FAULTS: KernelFile = KernelFile {
    name: "emulator_faults.cu",
    source: r#"
#include "common.cuh"

// Off by one: thread n writes one element past the end.
extern "C" __global__ void write_past_end(float *out, u64 n) {
    for (u64 i = global_thread(); i <= n; i += grid_threads()) out[i] = 1.f;
}

// A block sum whose barrier between the writes and thread 0's reads is missing.
extern "C" __global__ void racy_sum(const float *x, float *out) {
    __shared__ float part[64];
    part[threadIdx.x] = x[threadIdx.x];
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int i = 0; i < 64; ++i) s += part[i];
        out[0] = s;
    }
}

// The same with the barrier: correct.
extern "C" __global__ void synced_sum(const float *x, float *out) {
    __shared__ float part[64];
    part[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int i = 0; i < 64; ++i) s += part[i];
        out[0] = s;
    }
}

// Thread 0 leaves before the barrier the others wait at.
extern "C" __global__ void early_exit(float *out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1.f;
}

// Lanes 0..15 shuffle from lane 20, which is not in their mask.
extern "C" __global__ void shuffle_outside_mask(float *out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, (float)threadIdx.x, 20);
}

// Reverses a block's values through dynamic shared memory.
extern "C" __global__ void reverse_dynamic(const float *x, float *y) {
    DYNAMIC_SHARED(float, buf);
    buf[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// One m16n8k16 product D += A B: A 16 x 16 and B 16 x 8 row-major f32 (rounded to bf16 on the
// way in), D 16 x 8 row-major f32; fragments as the PTX ISA lays them out.
extern "C" __global__ void mma_tile(const float *A, const float *B, float *D) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const u32 a[4] = {
        pack_bf16x2(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]),
        pack_bf16x2(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]),
        pack_bf16x2(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]),
        pack_bf16x2(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]),
    };
    const u32 b[2] = {
        pack_bf16x2(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]),
        pack_bf16x2(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]),
    };
    float d[4] = {D[g * 8 + 2 * t], D[g * 8 + 2 * t + 1], D[(g + 8) * 8 + 2 * t], D[(g + 8) * 8 + 2 * t + 1]};
    mma_bf16_16816(d, a, b);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}
"#,
};

/// An emulated device, or `None` (after one line) when there is no host compiler.
fn device() -> Option<GpuDevice> {
    match GpuDevice::open_emulated(0) {
        Ok(dev) => Some(dev),
        Err(e @ CudaError::NoHostCompiler { .. }) => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("the emulator did not open: {e}"),
    }
}

/// The emulator's message for a failed launch.
fn fault(result: crate::Result<()>) -> String {
    match result {
        Err(CudaError::Emulator { kernel, detail }) => format!("{kernel}: {detail}"),
        other => panic!("expected an emulator error, got {other:?}"),
    }
}

#[test]
fn an_out_of_bounds_write_is_stopped_and_named() {
    let Some(dev) = device() else { return };
    let out = dev.alloc::<f32>(100).unwrap();
    let msg = fault(launch(
        &dev,
        &FAULTS,
        "write_past_end",
        Grid::blocks(1, 128),
        &[Arg::buf(&out), Arg::size(100)],
    ));
    assert!(msg.contains("write_past_end"), "{msg}");
    assert!(msg.contains("thread (100, 0, 0)"), "{msg}");
    assert!(msg.contains("out-of-bounds global write of 4 bytes"), "{msg}");
    assert!(msg.contains("400-byte buffer of argument 0"), "{msg}");
}

#[test]
fn a_shared_memory_race_is_reported_with_both_threads() {
    let Some(dev) = device() else { return };
    let x = dev.upload(&[1f32; 64]).unwrap();
    let mut out = dev.alloc::<f32>(1).unwrap();
    let msg = fault(launch(
        &dev,
        &FAULTS,
        "racy_sum",
        Grid::blocks(1, 64),
        &[Arg::buf(&x), Arg::buf(&out)],
    ));
    assert!(msg.contains("racy_sum"), "{msg}");
    assert!(msg.contains("shared-memory race at byte offset"), "{msg}");
    assert!(msg.contains("thread 0 read it and thread 1 wrote it"), "{msg}");
    launch(
        &dev,
        &FAULTS,
        "synced_sum",
        Grid::blocks(1, 64),
        &[Arg::buf(&x), Arg::buf(&out)],
    )
    .unwrap();
    let mut host = [0f32];
    dev.copy_to_host(&out, &mut host).unwrap();
    assert_eq!(host[0], 64.0);
    dev.fill(&mut out, 0.0).unwrap();
}

#[test]
fn a_thread_that_misses_a_barrier_is_reported_not_a_hang() {
    let Some(dev) = device() else { return };
    let out = dev.alloc::<f32>(64).unwrap();
    let msg = fault(launch(
        &dev,
        &FAULTS,
        "early_exit",
        Grid::blocks(1, 64),
        &[Arg::buf(&out)],
    ));
    assert!(msg.contains("early_exit"), "{msg}");
    assert!(
        msg.contains("thread 0 exited without reaching the __syncthreads"),
        "{msg}"
    );
}

#[test]
fn a_shuffle_from_outside_its_mask_is_reported() {
    let Some(dev) = device() else { return };
    let out = dev.alloc::<f32>(16).unwrap();
    let msg = fault(launch(
        &dev,
        &FAULTS,
        "shuffle_outside_mask",
        Grid::blocks(1, 32),
        &[Arg::buf(&out)],
    ));
    assert!(
        msg.contains("shuffles from lane 20, which is not in the mask 0xffff"),
        "{msg}"
    );
}

#[test]
fn launch_arguments_are_checked_against_the_kernel() {
    let Some(dev) = device() else { return };
    let out = dev.alloc::<f32>(4).unwrap();
    let too_few = fault(launch(
        &dev,
        &FAULTS,
        "write_past_end",
        Grid::blocks(1, 32),
        &[Arg::buf(&out)],
    ));
    assert!(
        too_few.contains("takes 2 parameters, launched with 1"),
        "{too_few}"
    );
    let wrong_size = fault(launch(
        &dev,
        &FAULTS,
        "write_past_end",
        Grid::blocks(1, 32),
        &[Arg::buf(&out), Arg::I32(4)],
    ));
    assert!(wrong_size.contains("parameter 1 is 8 bytes"), "{wrong_size}");
    let dangling = fault(launch(
        &dev,
        &FAULTS,
        "write_past_end",
        Grid::blocks(1, 32),
        &[Arg::Ptr(8), Arg::size(4)],
    ));
    assert!(dangling.contains("pointer argument 0"), "{dangling}");
}

#[test]
fn dynamic_shared_memory_is_sized_by_the_launch() {
    let Some(dev) = device() else { return };
    let values: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let x = dev.upload(&values).unwrap();
    let y = dev.alloc::<f32>(64).unwrap();
    let args = [Arg::buf(&x), Arg::buf(&y)];
    let grid = Grid::blocks(1, 64);
    launch(&dev, &FAULTS, "reverse_dynamic", grid.with_shared(256), &args).unwrap();
    let reversed: Vec<f32> = values.iter().rev().copied().collect();
    assert_eq!(dev.download(&y).unwrap(), reversed);
    let msg = fault(launch(
        &dev,
        &FAULTS,
        "reverse_dynamic",
        grid.with_shared(128),
        &args,
    ));
    assert!(
        msg.contains("thread (32, 0, 0): out-of-bounds dynamic shared-memory write"),
        "{msg}"
    );
}

#[test]
fn events_time_and_the_allocator_counts() {
    let Some(dev) = device() else { return };
    let (start, end) = (dev.event().unwrap(), dev.event().unwrap());
    start.record().unwrap();
    let buf = dev.zeros::<f32>(1000).unwrap();
    end.record().unwrap();
    end.synchronize().unwrap();
    assert!(start.elapsed_ms(&end).unwrap() >= 0.0);
    assert!(dev.memory_stats().in_use >= 4000);
    drop(buf);
    assert!(dev.memory_stats().cached >= 4000);
    dev.empty_cache().unwrap();
    assert_eq!(dev.memory_stats().cached, 0);
}

#[test]
fn fresh_buffers_are_poisoned_with_nan() {
    let Some(dev) = device() else { return };
    let buf = dev.alloc::<f32>(7).unwrap();
    assert!(dev.download(&buf).unwrap().iter().all(|v| v.is_nan()));
    let half = dev.alloc::<half::bf16>(5).unwrap();
    assert!(dev.download(&half).unwrap().iter().all(|v| v.is_nan()));
}

#[test]
fn mma_matches_a_plain_product_of_the_rounded_operands() {
    let Some(dev) = device() else { return };
    let mut state = 0x9e37_79b9_u32;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state as f32 / u32::MAX as f32) * 2.0 - 1.0
    };
    let a: Vec<f32> = (0..256).map(|_| next()).collect();
    let b: Vec<f32> = (0..128).map(|_| next()).collect();
    let c: Vec<f32> = (0..128).map(|_| next()).collect();
    let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
    let dd = dev.upload(&c).unwrap();
    launch(
        &dev,
        &FAULTS,
        "mma_tile",
        Grid::blocks(1, 32),
        &[Arg::buf(&da), Arg::buf(&db), Arg::buf(&dd)],
    )
    .unwrap();
    let d = dev.download(&dd).unwrap();
    let round = |v: f32| f64::from(half::bf16::from_f32(v).to_f32());
    for r in 0..16 {
        for col in 0..8 {
            let want: f64 = f64::from(c[r * 8 + col])
                + (0..16)
                    .map(|k| round(a[r * 16 + k]) * round(b[k * 8 + col]))
                    .sum::<f64>();
            let got = f64::from(d[r * 8 + col]);
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "D[{r}][{col}] = {got}, want {want}"
            );
        }
    }
}
