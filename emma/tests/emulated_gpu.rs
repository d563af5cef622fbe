//! `emma generate` on the emulated GPU (`EMMA_GPU=emulate`, `--device cuda`) answers as on the
//! CPU: the same prompt, image, random weights and sampling seed give the same text.

use std::process::Command;

/// The answer on `device`, or `None` (after one line) when the emulator has no C++ compiler.
fn generate(device: &str, image: &std::path::Path) -> Option<String> {
    let run = Command::new(env!("CARGO_BIN_EXE_emma"))
        .args([
            "generate",
            "--preset",
            "tiny",
            "--seed",
            "3",
            "--temperature",
            "1",
        ])
        .args([
            "--prompt",
            "What colour is the shape?",
            "--max-new-tokens",
            "8",
            "--device",
            device,
        ])
        .arg("--image")
        .arg(image)
        .env("EMMA_GPU", "emulate")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() {
        if stderr.contains("no C++ compiler") {
            println!("skipped: {}", stderr.lines().last().unwrap_or(""));
            return None;
        }
        panic!("emma generate --device {device} failed:\n{stderr}");
    }
    Some(String::from_utf8_lossy(&run.stdout).into_owned())
}

#[test]
fn generate_on_the_emulated_gpu_answers_as_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gradient.png");
    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 128]))
        .save(&path)
        .unwrap();
    let Some(gpu) = generate("cuda", &path) else {
        return;
    };
    let cpu = generate("cpu", &path).unwrap();
    assert!(!cpu.trim().is_empty());
    assert_eq!(gpu, cpu);
}
