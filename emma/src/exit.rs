//! How the command-line programs end: a user error is one message with its causes.

use std::process::ExitCode;

/// Runs `run`; an error is printed as `error: ...` with its causes on one line, without a
/// backtrace even when `RUST_BACKTRACE` is set (panics, real bugs, keep theirs).
pub fn report(run: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
