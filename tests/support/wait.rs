//! Waiting for a condition: the one poll loop of the test suite. A test that waits for
//! something to happen says what, how long at most and how often to look; at the deadline it
//! fails naming what it waited for and what it saw last.
//!
//! A fixed sleep is only for a window in which something must *not* happen (or must keep
//! happening); such a sleep says so where it is.

use std::fmt::Display;
use std::time::{Duration, Instant};

/// One look at a condition: done (with the value the wait returns) or not yet, with what was
/// seen instead (for the message at the deadline).
pub trait Probe<T> {
    fn look(self) -> Result<T, Option<String>>;
}

/// `true` is done; `false` has nothing more to say.
impl Probe<()> for bool {
    fn look(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

/// `Some(value)` is done.
impl<T> Probe<T> for Option<T> {
    fn look(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

/// `Ok(value)` is done; `Err(seen)` is what was seen instead.
impl<T, S: Display> Probe<T> for Result<T, S> {
    fn look(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(seen.to_string()))
    }
}

fn timed_out(what: &dyn Display, limit: Duration, seen: Option<String>) -> ! {
    match seen {
        Some(seen) => panic!("timed out after {limit:?} waiting for {what}; last seen: {seen}"),
        None => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Calls `probe` every `every` until it is done and returns its value; panics once `limit` has
/// passed without. The probe runs at least once, and once more at the deadline.
pub async fn wait_until<T, P: Probe<T>>(
    what: impl Display,
    limit: Duration,
    every: Duration,
    mut probe: impl AsyncFnMut() -> P,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let seen = match probe().await.look() {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            timed_out(&what, limit, seen);
        }
        tokio::time::sleep(every.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// [`wait_until`] for code that blocks (sync tests, plain threads).
pub fn wait_until_blocking<T, P: Probe<T>>(
    what: impl Display,
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> P,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let seen = match probe().look() {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            timed_out(&what, limit, seen);
        }
        std::thread::sleep(every.min(deadline.saturating_duration_since(Instant::now())));
    }
}
