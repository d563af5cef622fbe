//! How the command-line programs end: a user error is one message with its causes.

use std::process::ExitCode;

/// Runs `run`; an error is printed as `error: ...` with its causes on one line, without a
/// backtrace even when `RUST_BACKTRACE` is set (panics, real bugs, keep theirs).
pub fn report(run: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message already
/// holds (an error that names its source in its own text).
fn message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg = format!("{msg}: {cause}");
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::message;
    use anyhow::Context;

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let named = crate::error::EmmaError::Io {
            path: "a.png".into(),
            source: io,
        };
        let e = Err::<(), _>(named).context("loading the image").unwrap_err();
        assert_eq!(message(&e), "loading the image: a.png: no such file");
        let plain = Err::<(), _>(anyhow::anyhow!("root"))
            .context("outer")
            .unwrap_err();
        assert_eq!(message(&plain), "outer: root");
    }
}
