//! Choosing where a command runs: `--device cpu|cuda[:N]|auto`.

use std::fmt;
use std::str::FromStr;

/// A device request from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CPU backend.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
    /// A GPU if one is usable, else the CPU with a notice.
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("unknown device '{s}' (cpu, cuda, cuda:N or auto)")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Auto => f.write_str("auto"),
        }
    }
}

/// Resolves a request to the device that will run it. This build has only the CPU backend,
/// so `cuda` is an error and `auto` falls back to the CPU with a one-line notice (an error
/// when `EMMA_REQUIRE_GPU=1`).
pub fn resolve(choice: DeviceChoice) -> anyhow::Result<tensor::Device> {
    let require_gpu = std::env::var("EMMA_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match choice {
        DeviceChoice::Cpu => Ok(tensor::Device::Cpu),
        DeviceChoice::Cuda(n) => {
            anyhow::bail!("--device cuda:{n}: this build has no CUDA backend yet; use --device cpu")
        }
        DeviceChoice::Auto if require_gpu => {
            anyhow::bail!("EMMA_REQUIRE_GPU=1 but this build has no CUDA backend")
        }
        DeviceChoice::Auto => {
            eprintln!("note: no CUDA backend in this build; running on the CPU");
            Ok(tensor::Device::Cpu)
        }
    }
}
