//! Exponential back-off with jitter, so that many agents restarting together do not hit the
//! control plane in lockstep.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Between tries of one call.
    pub const CALL: Backoff =
        Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(5) };
    /// Between start-up attempts to reach the control plane (goes on until it answers).
    pub const STARTUP: Backoff =
        Backoff { initial: Duration::from_millis(250), max: Duration::from_secs(5) };

    /// The ceiling for try `attempt` (0-based): `initial · 2^attempt`, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(30)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// "Equal jitter": half the ceiling fixed, the other half scaled by `unit` in [0, 1].
    pub fn delay_with(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The pause before try `attempt + 1`, with random jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, rand::rng().random_range(0.0..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };

    #[test]
    fn ceiling_doubles_then_stays_at_max() {
        let ms: Vec<u128> = (0..7).map(|a| B.ceiling(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(B.ceiling(u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_between_half_and_full_ceiling() {
        assert_eq!(B.delay_with(3, 0.0), Duration::from_millis(400));
        assert_eq!(B.delay_with(3, 1.0), Duration::from_millis(800));
        assert_eq!(B.delay_with(3, 7.0), Duration::from_millis(800), "clamped");
        let delays: Vec<Duration> = (0..200).map(|_| B.delay(2)).collect();
        for d in &delays {
            assert!(*d >= Duration::from_millis(200) && *d <= Duration::from_millis(400), "{d:?}");
        }
        let first = delays[0];
        assert!(delays.iter().any(|d| *d != first), "jitter varies");
    }
}
