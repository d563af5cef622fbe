//! `emma`: run EMMA's building blocks from the command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use emma::commands;
use emma::device::{resolve, DeviceChoice};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "emma",
    version,
    about = "EMMA multimodal Mamba: run checkpoints from the command line"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints each component's parameter count (exact) and the total for a preset.
    Info {
        /// tiny, small, emma-v1-2.8b or emma-v2-2.7b.
        #[arg(long)]
        preset: String,
        /// Leave out multi-scale feature fusion.
        #[arg(long)]
        no_mff: bool,
        /// Leave out the pixel loss and its decoder.
        #[arg(long)]
        no_pixel_loss: bool,
    },
    /// Writes the logits [T, vocab] (f32, tensor `logits`) of a Mamba/Mamba-2 LM over token ids.
    Logits {
        /// A Hugging Face `save_pretrained` directory (model_type mamba or mamba2).
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda[:N] or auto.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Backpropagates the mean next-token cross-entropy and writes every parameter's gradient
    /// (f32) under its Hugging Face name, plus the loss as tensor `loss`.
    Grads {
        /// A Hugging Face `save_pretrained` directory (model_type mamba or mamba2).
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids (at least two).
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda[:N] or auto.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Runs a SigLIP or DINOv2 encoder on tensor `pixel_values` [B,3,H,W] and writes
    /// `last_hidden_state` and `penultimate_hidden_state`.
    Vision {
        /// A Hugging Face `save_pretrained` directory (siglip, siglip_vision_model, dinov2,
        /// dinov2_with_registers).
        #[arg(long)]
        model: PathBuf,
        /// A safetensors file holding `pixel_values`.
        #[arg(long)]
        pixels: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// cpu, cuda[:N] or auto.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Info {
            preset,
            no_mff,
            no_pixel_loss,
        } => {
            let mut cfg = emma::config::EmmaConfig::preset(&preset).with_context(|| {
                format!(
                    "unknown preset '{preset}' (known: {})",
                    emma::config::PRESETS.join(", ")
                )
            })?;
            cfg.alignment.mff &= !no_mff;
            cfg.alignment.pixel_loss &= !no_pixel_loss;
            println!(
                "EMMA preset {preset} (mff: {}, pixel loss: {})",
                cfg.alignment.mff, cfg.alignment.pixel_loss
            );
            for (component, n) in emma::info::parameter_counts(&cfg)? {
                println!("{component:<28} {n:>14}  ({:.1}M)", n as f64 / 1e6);
            }
        }
        Command::Logits {
            model,
            ids,
            out,
            device,
        } => {
            resolve(device)?;
            let logits = commands::logits(&model, &ids)?;
            commands::write_tensors(&out, &[("logits", &logits)])?;
            println!("wrote logits {:?} to {}", logits.shape(), out.display());
        }
        Command::Grads {
            model,
            ids,
            out,
            device,
        } => {
            resolve(device)?;
            let (loss, grads) = commands::grads(&model, &ids)?;
            let loss_t = tensor::Tensor::scalar(loss as f32);
            let mut named: Vec<(&str, &tensor::Tensor)> =
                grads.iter().map(|(k, v)| (k.as_str(), v)).collect();
            named.push(("loss", &loss_t));
            commands::write_tensors(&out, &named)?;
            println!(
                "loss {loss:.6}; wrote {} gradients to {}",
                grads.len(),
                out.display()
            );
        }
        Command::Vision {
            model,
            pixels,
            out,
            device,
        } => {
            resolve(device)?;
            let px = commands::read_tensor(&pixels, "pixel_values")
                .with_context(|| format!("reading pixel_values from {}", pixels.display()))?;
            let (last, penultimate) = commands::vision(&model, &px)?;
            commands::write_tensors(
                &out,
                &[
                    ("last_hidden_state", &last),
                    ("penultimate_hidden_state", &penultimate),
                ],
            )?;
            println!("wrote last_hidden_state {:?} to {}", last.shape(), out.display());
        }
    }
    Ok(())
}
