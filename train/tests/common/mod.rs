//! What several training test files share.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// Waits until `file` (a checkpoint's state) exists, then kills the run with SIGKILL and checks
/// that it had not finished: neither exited before nor left a `final` folder in `out`.
pub fn kill_at_checkpoint(child: &mut Child, file: &Path, out: &Path, limit: Duration) {
    let start = Instant::now();
    while !file.exists() {
        assert!(start.elapsed() < limit, "no checkpoint appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run finished before it could be killed");
    assert!(
        !out.join("final").exists(),
        "the killed run must not have finished"
    );
}
