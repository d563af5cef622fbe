//! `train --nproc-per-node N [--nnodes M --node-rank K] ARGS...`: starts N worker processes
//! of `train ARGS...` on this machine, one per GPU, with torchrun's variables set (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and waits for
//! them. When a worker fails, the others stop on their own (they name the rank that left); any
//! still running after a grace period are killed, and the launcher fails naming every rank that
//! failed and how.

use crate::rendezvous::free_local_port;
use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long the other workers get to stop on their own after one fails.
pub const GRACE: Duration = Duration::from_secs(30);

/// The launcher's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Workers on this machine.
    pub nproc_per_node: usize,
    /// Machines.
    pub nnodes: usize,
    /// This machine's index, from 0 (machine 0 runs rank 0).
    pub node_rank: usize,
}

/// What went wrong launching or running the workers.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A launcher flag is missing its value or out of range.
    #[error("{0}")]
    Usage(String),
    /// A worker could not be started.
    #[error("cannot start worker rank {rank} ({program}): {source}")]
    Spawn {
        /// The worker's rank.
        rank: usize,
        /// The program run.
        program: String,
        /// The system's reason.
        source: std::io::Error,
    },
    /// Workers failed.
    #[error("{}", failures.join("; "))]
    Failed {
        /// One line per failed worker, the first failure first.
        failures: Vec<String>,
    },
}

impl Launch {
    /// The launcher's flags at the front of `args` (which start after the program name), and
    /// the rest: `None` when `args` do not start with `--nproc-per-node`. The flags take
    /// `--flag value` or `--flag=value`.
    pub fn split(args: &[OsString]) -> Result<Option<(Launch, Vec<OsString>)>, LaunchError> {
        let flag = |a: &OsString| a.to_str().map(|s| s.split('=').next().unwrap_or(s).to_owned());
        if args.first().and_then(flag).as_deref() != Some("--nproc-per-node") {
            return Ok(None);
        }
        let mut launch = Launch {
            nproc_per_node: 0,
            nnodes: 1,
            node_rank: 0,
        };
        let mut i = 0;
        while let Some(name) = args.get(i).and_then(flag) {
            let slot = match name.as_str() {
                "--nproc-per-node" => &mut launch.nproc_per_node,
                "--nnodes" => &mut launch.nnodes,
                "--node-rank" => &mut launch.node_rank,
                _ => break,
            };
            let text = args[i].to_str().unwrap_or_default();
            let value = match text.split_once('=') {
                Some((_, v)) => v.to_owned(),
                None => {
                    i += 1;
                    args.get(i)
                        .and_then(|v| v.to_str())
                        .ok_or_else(|| LaunchError::Usage(format!("{name} needs a number")))?
                        .to_owned()
                }
            };
            *slot = value
                .parse()
                .map_err(|_| LaunchError::Usage(format!("{name} {value}: not a number")))?;
            i += 1;
        }
        if launch.nproc_per_node == 0 || launch.nnodes == 0 {
            return Err(LaunchError::Usage(
                "--nproc-per-node and --nnodes must be at least 1".into(),
            ));
        }
        if launch.node_rank >= launch.nnodes {
            return Err(LaunchError::Usage(format!(
                "--node-rank {} must be below --nnodes {}",
                launch.node_rank, launch.nnodes
            )));
        }
        Ok(Some((launch, args[i..].to_vec())))
    }

    /// All ranks of the run.
    pub fn world(&self) -> usize {
        self.nnodes * self.nproc_per_node
    }

    /// Rank 0's address: `MASTER_ADDR` and `MASTER_PORT` as read through `var`; on one machine
    /// they default to 127.0.0.1 and a free port.
    pub fn master(&self, var: impl Fn(&str) -> Option<String>) -> Result<(String, String), LaunchError> {
        match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(addr), Some(port)) => Ok((addr, port)),
            (addr, port) if self.nnodes == 1 => {
                let port = match port {
                    Some(p) => p,
                    None => free_local_port()
                        .map_err(|e| {
                            LaunchError::Usage(format!("no free local port for the rendezvous: {e}"))
                        })?
                        .to_string(),
                };
                Ok((addr.unwrap_or_else(|| "127.0.0.1".into()), port))
            }
            _ => Err(LaunchError::Usage(format!(
                "--nnodes {}: set MASTER_ADDR and MASTER_PORT to machine 0's address and a free \
                 port, the same on every machine",
                self.nnodes
            ))),
        }
    }

    /// Starts the workers of this machine running `program args`, waits for them, and returns
    /// Ok when every one succeeded. Progress and errors go to stderr.
    pub fn run(&self, program: &std::path::Path, args: &[OsString]) -> Result<(), LaunchError> {
        let (addr, port) = self.master(|k| std::env::var(k).ok())?;
        let first = self.node_rank * self.nproc_per_node;
        eprintln!(
            "launching {} worker(s): ranks {first}-{} of {}, rendezvous at {addr}:{port}",
            self.nproc_per_node,
            first + self.nproc_per_node - 1,
            self.world()
        );
        let mut running: Vec<(usize, Child)> = Vec::new();
        for local in 0..self.nproc_per_node {
            let rank = first + local;
            let child = Command::new(program)
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", self.world().to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string())
                .env("MASTER_ADDR", &addr)
                .env("MASTER_PORT", &port)
                .stdin(Stdio::null())
                .spawn();
            match child {
                Ok(child) => running.push((rank, child)),
                Err(source) => {
                    stop(&mut running);
                    return Err(LaunchError::Spawn {
                        rank,
                        program: program.display().to_string(),
                        source,
                    });
                }
            }
        }
        let failures = watch(running, GRACE);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(LaunchError::Failed { failures })
        }
    }
}

/// Waits for every worker; after the first failure the others get `grace` to end before they
/// are killed. Returns one line per failed worker, in the order the failures were seen.
fn watch(mut running: Vec<(usize, Child)>, grace: Duration) -> Vec<String> {
    let mut failures = Vec::new();
    let mut deadline: Option<Instant> = None;
    while !running.is_empty() {
        let mut i = 0;
        while i < running.len() {
            let (rank, child) = &mut running[i];
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        failures.push(format!("rank {rank} (pid {}) {}", child.id(), describe(status)));
                        deadline.get_or_insert_with(|| Instant::now() + grace);
                    }
                    running.swap_remove(i);
                }
                Ok(None) => i += 1,
                Err(e) => {
                    failures.push(format!(
                        "rank {rank} (pid {}): cannot wait for it: {e}",
                        child.id()
                    ));
                    let _ = child.kill();
                    running.swap_remove(i);
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            for (rank, child) in &running {
                failures.push(format!(
                    "rank {rank} (pid {}) was still running {grace:?} after the first failure and was killed",
                    child.id()
                ));
            }
            stop(&mut running);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    failures
}

/// Kills and reaps the workers still running.
fn stop(running: &mut Vec<(usize, Child)>) {
    for (_, child) in running.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    running.clear();
}

/// "exited with status 1", "was killed by signal 9".
fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("ended: {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{Launch, LaunchError};
    use std::ffi::OsString;

    fn split(args: &[&str]) -> Result<Option<(Launch, Vec<OsString>)>, LaunchError> {
        Launch::split(&args.iter().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn the_launcher_flags_come_first_and_the_rest_is_the_workers() {
        assert!(split(&["--data", "shapes"]).unwrap().is_none());
        let (launch, rest) = split(&[
            "--nproc-per-node",
            "4",
            "--nnodes=2",
            "--node-rank",
            "1",
            "--data",
            "shapes",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            launch,
            Launch {
                nproc_per_node: 4,
                nnodes: 2,
                node_rank: 1
            }
        );
        assert_eq!(launch.world(), 8);
        assert_eq!(rest, vec![OsString::from("--data"), OsString::from("shapes")]);
        for bad in [
            &["--nproc-per-node"][..],
            &["--nproc-per-node", "two"],
            &["--nproc-per-node", "0"],
            &["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2"],
        ] {
            assert!(split(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn several_machines_need_rank_zero_s_address() {
        let two = Launch {
            nproc_per_node: 1,
            nnodes: 2,
            node_rank: 0,
        };
        let err = two.master(|_| None).unwrap_err().to_string();
        assert!(err.contains("MASTER_ADDR"), "{err}");
        let env = |k: &str| {
            (k == "MASTER_ADDR")
                .then(|| "10.0.0.1".to_owned())
                .or((k == "MASTER_PORT").then(|| "29500".to_owned()))
        };
        assert_eq!(two.master(env).unwrap(), ("10.0.0.1".into(), "29500".into()));
        let one = Launch { nnodes: 1, ..two };
        let (addr, port) = one.master(|_| None).unwrap();
        assert_eq!(addr, "127.0.0.1");
        assert!(port.parse::<u16>().unwrap() > 0);
    }
}
