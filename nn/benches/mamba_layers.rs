//! One Mamba-1 and one Mamba-2 mixer layer, forward and backward, timed:
//! `cargo bench -p nn --bench mamba_layers`.
//!
//! On a GPU (`cuda:0`) the layers have the shapes of the paper's LMs, Mamba-2.8B (width 2560,
//! inner 5120, state 16, dt rank 160) and Mamba2-2.7B (width 2560, 80 heads of 64, state 128,
//! one group, chunk 256), in bf16, on sequences of 2048 tokens. Without a GPU the same code runs
//! on the CPU, in f32, at a width and length eight times smaller (a smoke figure, not the
//! paper's shape), and says so. Parameters are drawn by the layers' own initialisers; the
//! backward pass takes a random output gradient and computes the gradients of every parameter
//! and of the input. A time is the best of several rounds after a warm-up, each round ending
//! when the device has finished.

use autograd::Var;
use nn::mamba1::{Mamba1Dims, Mamba1Mixer};
use nn::mamba2::{Mamba2Dims, Mamba2Mixer};
use nn::ParamStore;
use std::time::Instant;
use tensor::{DType, Device, Tensor};

/// Timed rounds per measurement; the best counts.
const ROUNDS: usize = 5;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Where the layers run and how large they are.
struct Setup {
    device: Device,
    dtype: DType,
    /// Width, length and the batch sizes to time.
    hidden: usize,
    len: usize,
    batches: &'static [usize],
    /// Divides every width of the paper's shapes (1 on a GPU).
    shrink: usize,
}

/// Waits for the device to finish its queued work.
fn finish(device: Device) -> BenchResult<()> {
    if let Device::Cuda(n) = device {
        tensor::cuda_device(n)?.synchronize()?;
    }
    Ok(())
}

/// Best milliseconds of `f` over [`ROUNDS`] rounds after one warm-up round.
fn best_ms(device: Device, mut f: impl FnMut() -> BenchResult<()>) -> BenchResult<f64> {
    f()?;
    finish(device)?;
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        f()?;
        finish(device)?;
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// Times `forward` alone and forward + backward from a random output gradient, on inputs
/// `[batch, len, hidden]`, for every batch size; prints one line each.
fn time_layer(name: &str, s: &Setup, forward: impl Fn(&Var) -> nn::Result<Var>) -> BenchResult<()> {
    let mut rng = tensor::seeded_rng(7);
    for &batch in s.batches {
        let shape = [batch, s.len, s.hidden];
        let x = Tensor::randn(&shape, s.dtype, 0.0, 1.0, &mut rng)?.to_device(s.device)?;
        let grad = Tensor::randn(&shape, s.dtype, 0.0, 1.0, &mut rng)?.to_device(s.device)?;
        let fwd = best_ms(s.device, || {
            forward(&Var::constant(x.clone()))?;
            Ok(())
        })?;
        let fwd_bwd = best_ms(s.device, || {
            let input = Var::parameter(x.clone());
            forward(&input)?.backward_with(grad.clone())?;
            Ok(())
        })?;
        let tokens = (batch * s.len) as f64;
        println!(
            "{name:<8} batch {batch:>2} x {} tokens: forward {fwd:>9.2} ms, forward+backward {fwd_bwd:>9.2} ms \
             ({:.0} tokens/s training)",
            s.len,
            tokens / (fwd_bwd * 1e-3)
        );
    }
    Ok(())
}

fn main() -> BenchResult<()> {
    tensor::host_memory::keep_freed_memory();
    let setup = match tensor::cuda_device(0) {
        Ok(dev) if dev.is_emulated() => {
            println!(
                "refused: {} is emulated; its timings mean nothing (unset EMMA_GPU)",
                dev.info().name
            );
            return Ok(());
        }
        Ok(dev) => {
            println!("{} ({}), bf16, paper shapes", dev.info().name, dev.info().arch());
            Setup {
                device: Device::Cuda(0),
                dtype: DType::BF16,
                hidden: 2560,
                len: 2048,
                batches: &[1, 4, 16],
                shrink: 1,
            }
        }
        Err(e) => {
            println!("no GPU ({e}): the CPU, f32, widths and length / 8");
            Setup {
                device: Device::Cpu,
                dtype: DType::F32,
                hidden: 2560 / 8,
                len: 2048 / 8,
                batches: &[1],
                shrink: 8,
            }
        }
    };
    let store = |seed| {
        let store = ParamStore::random(tensor::seeded_rng(seed), setup.dtype, true, "bench");
        store.set_device(setup.device);
        store
    };

    let inner = 2 * setup.hidden;
    let mamba1 = Mamba1Mixer::new(
        &store(1),
        "mixer",
        Mamba1Dims {
            hidden: setup.hidden,
            inner,
            state: 16,
            conv_kernel: 4,
            dt_rank: 160 / setup.shrink,
            bias: false,
            conv_bias: true,
        },
    )?;
    time_layer("Mamba-1", &setup, |x| mamba1.forward(x))?;

    let mamba2 = Mamba2Mixer::new(
        &store(2),
        "mixer",
        Mamba2Dims {
            hidden: setup.hidden,
            inner,
            heads: inner / 64,
            head_dim: 64,
            groups: 1,
            state: 128,
            conv_kernel: 4,
            chunk: 256 / setup.shrink,
            bias: false,
            conv_bias: true,
            norm_eps: 1e-5,
        },
    )?;
    time_layer("Mamba-2", &setup, |x| mamba2.forward(x))?;
    Ok(())
}
