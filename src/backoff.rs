//! Exponential back-off with jitter and a cap, shared by everything that
//! retries (broker connections, subsystem restarts, enrollment).
#![warn(missing_docs)]

use rand::Rng;
use std::time::Duration;

/// Exponential back-off with jitter between attempts of one thing.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, doubles per attempt, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The delay before the next attempt: `base * 2^n`, capped, with up to
    /// ±20 % jitter so a fleet restarted together does not retry in step.
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.base, self.cap, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Jumps to the cap (permanent refusals: no point asking soon).
    pub fn to_cap(&mut self) {
        self.attempt = 32;
    }

    /// Starts over at `base` (after a success, or a long healthy run).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// The jittered delay for attempt `n` (0-based).
pub fn delay(base: Duration, cap: Duration, n: u32) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(n.min(31)));
    let d = exp.min(cap);
    let jitter = rand::rng().random_range(0.8..=1.2);
    d.mul_f64(jitter).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stays_under_the_cap() {
        let cap = Duration::from_secs(30);
        let mut b = Backoff::new(Duration::from_secs(1), cap);
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
        for _ in 0..40 {
            assert!(b.next_delay() <= cap);
        }
        b.reset();
        b.to_cap();
        assert!(b.next_delay() >= cap.mul_f64(0.8));
    }
}
