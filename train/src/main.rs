//! `train`: trains EMMA. With no arguments, the `tiny` preset on easy-VQA (fetched on first use),
//! ending with its test accuracy per question type; see `train --help`.

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use emma::device::{resolve, DeviceChoice};
use std::path::{Path, PathBuf};
use std::time::Duration;
use train::data::{Dataset, ShapesData};
use train::easy_vqa::Split;
use train::options::{expand_config_file, TrainOptions};
use train::shapes::{write_llava, ShapesConfig};

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "Train EMMA (default: the tiny preset on the easy-VQA visual-question set)",
    args_override_self = true,
    args_conflicts_with_subcommands = true,
    after_help = "Several processes (one per GPU): train --nproc-per-node N [--nnodes M --node-rank K] \
                  [FLAGS | COMMAND]. Starts N workers of `train FLAGS` (or of the command) with \
                  RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set; with several \
                  machines, set MASTER_ADDR and MASTER_PORT to machine 0's address and a free port."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A TOML or JSON file of options (keys named like the flags); flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    train: TrainOptions,
}

#[derive(Subcommand)]
enum Command {
    /// Reports answer accuracy of a trained model on held-out data.
    Eval {
        /// A model directory (`OUT/final` or a checkpoint `OUT/checkpoints/step-N`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// `easy-vqa`, `shapes` (the held-out split of the built-in set) or a LLaVA-format JSON
        /// file.
        #[arg(long, default_value = "easy-vqa")]
        data: String,
        /// The easy-VQA split: `test` or `validation` (the training split's held-out images).
        #[arg(long, default_value = "test")]
        split: String,
        /// An existing easy-VQA data folder instead of the cached download.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// easy-VQA training images held out as the validation split (as trained with).
        #[arg(long, default_value_t = train::easy_vqa::DEFAULT_VAL_IMAGES)]
        val_images: usize,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Also write every answer as a JSON line (question, type, reference, answer, right) to
        /// this file.
        #[arg(long)]
        answers: Option<PathBuf>,
        /// Folder of the LLaVA images (default: the JSON file's folder).
        #[arg(long)]
        image_folder: Option<PathBuf>,
        /// Let image paths be absolute or lead outside the image folder (refused by default).
        #[arg(long)]
        images_anywhere: bool,
        /// Held-out shapes examples.
        #[arg(long, default_value_t = 500)]
        shapes_eval: u64,
        /// Seed of the shapes set (as trained with).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Count and skip bad records instead of failing.
        #[arg(long)]
        skip_bad_samples: bool,
        /// Most tokens generated per answer.
        #[arg(long, default_value_t = 16)]
        max_new_tokens: usize,
        /// cpu, cuda[:N] or auto.
        #[arg(long, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Draws RUN_DIR/loss.png (losses, learning rate, validation accuracy against step) from
    /// RUN_DIR/metrics.jsonl; works on a run that was killed.
    Plot {
        /// The run folder (train's --out).
        run_dir: PathBuf,
    },
    /// Joins the rendezvous of a multi-process run (torchrun's RANK, WORLD_SIZE, MASTER_ADDR and
    /// MASTER_PORT), prints the id every rank receives, then watches the other ranks for --hold
    /// seconds: a check that the processes (and machines) reach each other before a long run.
    Rendezvous {
        /// Seconds to wait for every rank to arrive.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Seconds to stay connected afterwards, failing as soon as a rank leaves.
        #[arg(long, default_value_t = 0)]
        hold: u64,
    },
    /// Writes examples of the shapes set in LLaVA format (data.json + images/).
    Shapes {
        /// The output directory.
        #[arg(long)]
        out: PathBuf,
        /// Number of examples.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Index of the first example (the held-out split starts at 2^40).
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// Seed of the set.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Runs the command (see [`emma::exit::report`]).
fn main() -> std::process::ExitCode {
    tensor::host_memory::keep_freed_memory();
    emma::exit::report(run)
}

/// The command line's work.
fn run() -> anyhow::Result<()> {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some((launch, rest)) = train::launch::Launch::split(raw.get(1..).unwrap_or_default())? {
        let program = std::env::current_exe().context("locating this program to start the workers")?;
        launch.run(&program, &rest)?;
        return Ok(());
    }
    let known: Vec<String> = Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let args = expand_config_file(std::env::args().collect(), &known)?;
    let matches = Cli::command().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        None => run_training(&cli.train),
        Some(Command::Eval {
            checkpoint,
            data,
            split,
            data_dir,
            val_images,
            report,
            answers,
            image_folder,
            images_anywhere,
            shapes_eval,
            seed,
            skip_bad_samples,
            max_new_tokens,
            device,
        }) => {
            for file in report.iter().chain(&answers) {
                emma::commands::check_output(file, &[checkpoint.as_path()])?;
            }
            let model = emma::checkpoint::load(&checkpoint, false, resolve(device)?)?;
            let source = emma::commands::ModelSource::Dir(&checkpoint);
            let (tok, which) = emma::commands::tokenizer_for(&source, None, model.config().lm.vocab)?;
            eprintln!("using the {which}");
            let dataset: Box<dyn Dataset> = if data == "easy-vqa" {
                let split: Split = split.parse().map_err(anyhow::Error::msg)?;
                let d =
                    train::trainer::open_easy_vqa(data_dir.as_deref(), split, val_images, skip_bad_samples)?;
                Box::new(d)
            } else if data == "shapes" {
                Box::new(ShapesData {
                    config: ShapesConfig { image_size: 32, seed },
                    first: train::trainer::SHAPES_EVAL_FIRST,
                    count: shapes_eval as usize,
                })
            } else {
                let images = (image_folder.as_deref(), images_anywhere);
                let d = train::trainer::open_llava(Path::new(&data), images, skip_bad_samples)?;
                Box::new(d)
            };
            let bar = indicatif::ProgressBar::new(dataset.len() as u64);
            let result = train::eval::evaluate(&model, &tok, dataset.as_ref(), max_new_tokens, Some(&bar))?;
            bar.finish_and_clear();
            print_report(&result);
            if let Some(file) = &report {
                result.save(file)?;
                println!("report written to {}", file.display());
            }
            if let Some(file) = &answers {
                result.save_answers(file)?;
                println!("answers written to {}", file.display());
            }
            Ok(())
        }
        Some(Command::Plot { run_dir }) => {
            let png = train::loss_plot::draw_loss_png(&run_dir)?;
            println!("drew {}", png.display());
            Ok(())
        }
        Some(Command::Rendezvous { timeout, hold }) => {
            let env = |k: &str| std::env::var(k).ok();
            let peer = train::rendezvous::Peer::from_vars(env, Duration::from_secs(timeout))?
                .context("WORLD_SIZE is not set: set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")?;
            // The size of an NCCL unique id.
            let watch = peer
                .join(|| (0..128).map(|_| rand::random::<u8>()).collect())?
                .watch();
            let hex: String = watch.id.iter().map(|b| format!("{b:02x}")).collect();
            println!(
                "rank {} of {} (pid {}): id {hex}",
                watch.rank,
                watch.world,
                std::process::id()
            );
            watch.hold(Duration::from_secs(hold), Duration::from_millis(100))?;
            Ok(())
        }
        Some(Command::Shapes {
            out,
            count,
            first,
            seed,
        }) => {
            let cfg = ShapesConfig { image_size: 32, seed };
            let json = write_llava(&cfg, first, count, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {count} examples to {}", json.display());
            Ok(())
        }
    }
}

fn run_training(opts: &TrainOptions) -> anyhow::Result<()> {
    if opts.plan {
        opts.validate()?;
        println!("{}", train::plan::report(opts)?);
        return Ok(());
    }
    let summary = train::trainer::train(opts)?;
    if summary.rank != 0 {
        // One worker of a multi-process run: rank 0 reports.
        return Ok(());
    }
    if !summary.skipped.is_empty() {
        println!("skipped {} bad training sample(s)", summary.skipped.len());
    }
    println!(
        "trained {} steps (from step {}); final loss {:.4}; model saved to {}",
        summary.steps,
        summary.resumed_from,
        summary.final_loss,
        summary.final_model.display()
    );
    if let Some((report, file)) = &summary.eval {
        print_report(report);
        println!("report written to {}", file.display());
        println!(
            "answers written to {}",
            file.with_file_name("answers.jsonl").display()
        );
    }
    Ok(())
}

/// Prints a few sample answers, the accuracy per question type and the summary line.
fn print_report(report: &train::eval::EvalReport) {
    for (q, want, got) in &report.samples {
        println!("  {q:?}: expected {want:?}, answered {got:?}");
    }
    print!("{}", report.breakdown());
    println!("{}", report.summary());
}
