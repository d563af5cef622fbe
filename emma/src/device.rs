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

/// Whether `EMMA_REQUIRE_GPU=1` is set: a missing GPU is then an error, never a fallback.
fn gpu_required() -> bool {
    std::env::var("EMMA_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Resolves a request to the device that will run it, opening the GPU (the probe) when one is
/// asked for. `cuda[:N]` without a usable GPU is an error naming what is missing; `auto` takes
/// CUDA device 0 when it is usable and otherwise falls back to the CPU with a one-line notice,
/// or fails when `EMMA_REQUIRE_GPU=1`.
pub fn resolve(choice: DeviceChoice) -> anyhow::Result<tensor::Device> {
    match choice {
        DeviceChoice::Cpu => Ok(tensor::Device::Cpu),
        DeviceChoice::Cuda(n) => match tensor::cuda_device(n) {
            Ok(_) => Ok(tensor::Device::Cuda(n)),
            Err(e) => anyhow::bail!("--device cuda:{n}: no usable GPU: {e}"),
        },
        DeviceChoice::Auto => match tensor::cuda_device(0) {
            Ok(_) => Ok(tensor::Device::Cuda(0)),
            Err(e) if gpu_required() => anyhow::bail!("EMMA_REQUIRE_GPU=1 but no usable GPU: {e}"),
            Err(e) => {
                eprintln!("note: no usable GPU ({e}); running on the CPU");
                Ok(tensor::Device::Cpu)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{resolve, DeviceChoice};

    #[test]
    fn parses_every_form() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn cuda_resolves_to_the_device_or_names_what_is_missing() {
        assert_eq!(resolve(DeviceChoice::Cpu).unwrap(), tensor::Device::Cpu);
        match resolve(DeviceChoice::Cuda(0)) {
            Ok(device) => assert_eq!(device, tensor::Device::Cuda(0)),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("cuda:0") && msg.contains("no usable GPU"), "{msg}");
            }
        }
        // A device ordinal no machine has is never usable.
        let err = resolve(DeviceChoice::Cuda(1 << 20)).unwrap_err().to_string();
        assert!(err.contains("cuda:1048576"), "{err}");
    }
}
