//! `emma`: run EMMA's building blocks from the command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use emma::commands::{self, ModelSource};
use emma::device::{resolve, DeviceChoice};
use emma::generate::{generate_streaming, GenerateOptions};
use emma::prompt::Conversation;
use emma::sampling::Sampling;
use std::io::Write as _;
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
    /// Answers a question about an image: prefill of the image and prompt, then recurrent
    /// decoding until end-of-text or --max-new-tokens.
    Generate {
        /// A model directory written by `emma`/`train` (config.json + model.safetensors).
        #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
        model: Option<PathBuf>,
        /// A preset with random weights instead (tiny, small, emma-v1-2.8b, emma-v2-2.7b).
        #[arg(long)]
        preset: Option<String>,
        /// The image (PNG or JPEG).
        #[arg(long)]
        image: PathBuf,
        /// The question.
        #[arg(long)]
        prompt: String,
        /// The most tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 picks the most likely token (greedy).
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        temperature: f64,
        /// Nucleus mass for sampling (with --temperature > 0).
        #[arg(long, default_value_t = 0.9, allow_hyphen_values = true)]
        top_p: f64,
        /// Seed of the sampling (and of a preset's random weights).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A tokenizer.json; default: the one saved with the model, else the built-in one.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// cpu, cuda[:N] or auto.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Draws the paper's Figure 1 for one image and prompt: per model, the norm of each image
    /// token's hidden state after chosen LM layers as heat maps over the patch grid, the image
    /// with the strongest patches outlined, and the model's answer.
    Visualize {
        /// A model directory (`train`'s `OUT/final` or a checkpoint); repeat for side-by-side rows.
        #[arg(long, required = true)]
        model: Vec<PathBuf>,
        /// The image (PNG or JPEG).
        #[arg(long)]
        image: PathBuf,
        /// The question the models answer.
        #[arg(long)]
        prompt: String,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// LM layers to draw, comma-separated, from 0 (default: up to 8 spread over the depth,
        /// the last included).
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<usize>>,
        /// Patches outlined per layer.
        #[arg(long, default_value_t = 3)]
        top: usize,
        /// The most tokens of each answer.
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// A tokenizer.json (default: the one saved with each model).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
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

/// Runs the command (see [`emma::exit::report`]).
fn main() -> std::process::ExitCode {
    tensor::host_memory::keep_freed_memory();
    emma::exit::report(run)
}

/// The command line's work.
fn run() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Info {
            preset,
            no_mff,
            no_pixel_loss,
        } => {
            let mut cfg = emma::config::EmmaConfig::named(&preset)?;
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
            commands::check_output(&out, &[&model])?;
            let device = resolve(device)?;
            let logits = commands::logits(&model, &ids, device)?;
            commands::write_tensors(&out, &[("logits", &logits)])?;
            println!("wrote logits {:?} to {}", logits.shape(), out.display());
        }
        Command::Grads {
            model,
            ids,
            out,
            device,
        } => {
            commands::check_output(&out, &[&model])?;
            let device = resolve(device)?;
            let (loss, grads) = commands::grads(&model, &ids, device)?;
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
        Command::Generate {
            model,
            preset,
            image,
            prompt,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            tokenizer,
            device,
        } => {
            if !(temperature.is_finite() && (0.0..=100.0).contains(&temperature)) {
                anyhow::bail!("--temperature {temperature}: must be in [0, 100] (0: greedy)");
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                anyhow::bail!("--top-p {top_p}: must be in (0, 1]");
            }
            if max_new_tokens == 0 {
                anyhow::bail!("--max-new-tokens 0: must be a positive count");
            }
            let device = resolve(device)?;
            let sampling = if temperature == 0.0 {
                Sampling::Greedy
            } else {
                Sampling::TopP { temperature, top_p }
            };
            let source = match (&model, &preset) {
                (Some(dir), None) => ModelSource::Dir(dir),
                (None, Some(name)) => ModelSource::Preset { name, seed },
                _ => anyhow::bail!("give exactly one of --model DIR or --preset NAME"),
            };
            let img = emma::image::load_image(&image)?;
            let emma = commands::load_model(&source, device)?;
            let (tok, which) =
                commands::tokenizer_for(&source, tokenizer.as_deref(), emma.config().lm.vocab)?;
            eprintln!("using the {which}");
            let opts = GenerateOptions {
                max_new_tokens,
                sampling,
                seed,
            };
            let stdout = std::io::stdout();
            let out = generate_streaming(
                &emma,
                &tok,
                Some(&img),
                &Conversation::single(prompt, None),
                &opts,
                &mut |piece| {
                    let mut w = stdout.lock();
                    let _ = w.write_all(piece.as_bytes()).and_then(|()| w.flush());
                },
            )?;
            println!();
            eprintln!(
                "{} prompt tokens + {} image tokens; generated {} tokens ({})",
                out.prompt_tokens,
                emma.config().vision.tokens(),
                out.ids.len(),
                if out.finished {
                    "end of text"
                } else {
                    "token limit"
                }
            );
        }
        Command::Visualize {
            model,
            image,
            prompt,
            out,
            layers,
            top,
            max_new_tokens,
            tokenizer,
            device,
        } => {
            let mut inputs: Vec<&std::path::Path> = model.iter().map(PathBuf::as_path).collect();
            inputs.push(&image);
            commands::check_output(&out, &inputs)?;
            if max_new_tokens == 0 {
                anyhow::bail!("--max-new-tokens 0: must be a positive count");
            }
            let device = resolve(device)?;
            let img = emma::image::load_image(&image)?;
            let rows = model
                .iter()
                .map(|dir| {
                    commands::visualize_row(
                        dir,
                        &img,
                        &prompt,
                        layers.as_deref(),
                        max_new_tokens,
                        tokenizer.as_deref(),
                        device,
                    )
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            emma::visualize::draw_maps(&out, &img, &rows, top)?;
            for r in &rows {
                eprintln!("{}: answered {:?}", r.name, r.answer);
            }
            println!("drew {}", out.display());
        }
        Command::Vision {
            model,
            pixels,
            out,
            device,
        } => {
            commands::check_output(&out, &[&model, &pixels])?;
            let device = resolve(device)?;
            let px = commands::read_tensor(&pixels, "pixel_values")
                .with_context(|| format!("reading pixel_values from {}", pixels.display()))?;
            let (last, penultimate) = commands::vision(&model, &px, device)?;
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
