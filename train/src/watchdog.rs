//! A watchdog for the device exchanges of a multi-process run. An NCCL collective that waits for
//! a rank that died never returns: the host collectives name a silent rank after the timeout,
//! but a rank blocked on its GPU never gets that far. So each step is armed with a deadline
//! (the rank timeout); when it passes before the step disarms it, the watchdog's thread runs
//! the expiry action (the trainer aborts the NCCL communicator and ends the process with an
//! error naming this rank and the step), instead of a hang.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the watchdog's thread sees.
#[derive(Default)]
struct State {
    /// The deadline and what must finish by then, while armed.
    armed: Option<(Instant, String)>,
    /// Set when the watchdog is dropped.
    stopped: bool,
}

/// A deadline on the work between [`Watchdog::arm`] and [`Watchdog::disarm`].
pub struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// A watchdog that calls `on_expiry(what)` once, on its own thread, when armed work is not
    /// done within `timeout`.
    pub fn start(timeout: Duration, on_expiry: impl FnOnce(&str) + Send + 'static) -> Self {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let seen = shared.clone();
        let thread = std::thread::spawn(move || {
            let (lock, wake) = &*seen;
            let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if state.stopped {
                    return;
                }
                let Some((deadline, what)) = &state.armed else {
                    state = wake.wait(state).unwrap_or_else(|e| e.into_inner());
                    continue;
                };
                let now = Instant::now();
                if now >= *deadline {
                    let what = what.clone();
                    drop(state);
                    on_expiry(&what);
                    return;
                }
                let left = *deadline - now;
                state = wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        });
        Watchdog {
            shared,
            timeout,
            thread: Some(thread),
        }
    }

    /// Starts the deadline for `what` (replacing any running one).
    pub fn arm(&self, what: impl Into<String>) {
        self.set(Some((Instant::now() + self.timeout, what.into())));
    }

    /// Stops the deadline: the armed work is done.
    pub fn disarm(&self) {
        self.set(None);
    }

    fn set(&self, armed: Option<(Instant, String)>) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).armed = armed;
        wake.notify_one();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let (lock, wake) = &*self.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread ends at once unless it is running the expiry action.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Watchdog;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    #[test]
    fn armed_work_that_overruns_fires_once_and_finished_work_never_does() {
        let (fired, seen) = mpsc::channel();
        let dog = Watchdog::start(Duration::from_millis(1000), move |what| {
            fired.send((what.to_owned(), Instant::now())).unwrap();
        });
        // Disarmed in time, and re-armed before the deadline: the clock starts again.
        // (Margins of 400 ms for a busy machine.)
        dog.arm("step 1");
        std::thread::sleep(Duration::from_millis(600));
        dog.arm("step 2");
        std::thread::sleep(Duration::from_millis(600));
        dog.disarm();
        std::thread::sleep(Duration::from_millis(1200));
        assert!(seen.try_recv().is_err(), "fired for finished work");
        let armed = Instant::now();
        dog.arm("step 3");
        let (what, at) = seen.recv_timeout(Duration::from_secs(10)).expect("fired");
        assert_eq!(what, "step 3");
        assert!(at - armed >= Duration::from_millis(1000));
        drop(dog);
        assert!(seen.try_recv().is_err(), "fired twice");
    }
}
