//! The rendezvous across real processes: `train rendezvous` started once per rank with torchrun's
//! variables, as a launcher (or a user on several machines) would start the workers.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free local port for rank 0.
fn free_port() -> u16 {
    train::rendezvous::free_local_port().expect("a free local port")
}

/// Starts rank `rank` of `world` against rank 0 at `port`.
fn start(rank: usize, world: usize, port: u16, timeout: u64, hold: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args([
            "rendezvous",
            "--timeout",
            &timeout.to_string(),
            "--hold",
            &hold.to_string(),
        ])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start train rendezvous")
}

/// Waits for `child` at most `limit`; its exit success and its stderr. Kills it past the limit.
fn finish(mut child: Child, limit: Duration) -> (bool, String) {
    let end = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (status.success(), err);
        }
        if Instant::now() >= end {
            child.kill().unwrap();
            panic!("a rank still ran after {limit:?}: the rendezvous hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the id line a rank prints once the rendezvous is done.
fn id_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

#[test]
fn three_processes_agree_on_one_id() {
    let port = free_port();
    // Rank 0 last: the others wait for it to listen.
    let mut ranks: Vec<Child> = [2, 1, 0].iter().map(|&r| start(r, 3, port, 30, 0)).collect();
    let ids: Vec<String> = ranks
        .iter_mut()
        .map(|c| {
            let line = id_line(c);
            line.split_once(": id ")
                .unwrap_or_else(|| panic!("no id in {line:?}"))
                .1
                .trim()
                .to_string()
        })
        .collect();
    assert_eq!(ids[0].len(), 256, "a 128-byte id in hex: {}", ids[0]);
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
    for child in ranks {
        let (ok, err) = finish(child, Duration::from_secs(30));
        assert!(ok, "{err}");
    }
}

#[test]
fn a_missing_worker_is_an_error_naming_it_on_the_others() {
    let port = free_port();
    let ranks: Vec<Child> = [0, 1].iter().map(|&r| start(r, 3, port, 2, 0)).collect();
    let started = Instant::now();
    for child in ranks {
        let (ok, err) = finish(child, Duration::from_secs(20));
        assert!(!ok, "a rank succeeded without rank 2");
        assert!(err.contains("rank(s) 2 of 3 did not arrive"), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn a_killed_worker_is_an_error_naming_it_on_the_others() {
    let port = free_port();
    let mut ranks: Vec<Child> = (0..3).map(|r| start(r, 3, port, 30, 60)).collect();
    for c in &mut ranks {
        assert!(id_line(c).contains(": id "));
    }
    let mut killed = ranks.remove(2);
    killed.kill().unwrap();
    killed.wait().unwrap();
    for child in ranks {
        let (ok, err) = finish(child, Duration::from_secs(20));
        assert!(
            !ok,
            "a rank finished its 60 s hold without noticing rank 2 was killed"
        );
        assert!(err.contains("rank 2 left the run"), "{err}");
    }
}
