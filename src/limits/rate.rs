//! Requests and tokens per minute, per key (`--rpm`, `--tpm`): a sliding minute of one-second buckets.
//!
//! A request is admitted while the key's last 60 seconds hold fewer than `rpm` requests
//! and fewer than `tpm` tokens; tokens are added when a response ends (its real usage).
//! Each gateway instance counts its own traffic here: with several instances, the shared
//! store (`shared`) counts them exactly, and these windows are the fallback (where a key
//! gets up to N × its limits from N instances).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const BUCKETS: usize = 60;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    requests: u32,
    tokens: u64,
}

#[derive(Debug, Clone)]
struct Window {
    buckets: [Bucket; BUCKETS],
}

impl Default for Window {
    fn default() -> Self {
        Self {
            buckets: [Bucket::default(); BUCKETS],
        }
    }
}

impl Window {
    fn live(&self, now: u64) -> impl Iterator<Item = &Bucket> {
        self.buckets.iter().filter(move |b| {
            b.second + (BUCKETS as u64) > now && b.second <= now && (b.requests > 0 || b.tokens > 0)
        })
    }

    fn bucket(&mut self, now: u64) -> &mut Bucket {
        let b = &mut self.buckets[(now % BUCKETS as u64) as usize];
        if b.second != now {
            *b = Bucket {
                second: now,
                ..Bucket::default()
            };
        }
        b
    }

    /// Seconds until enough of the window has expired that `used - freed < limit`.
    fn wait(&self, now: u64, limit: u64, of: impl Fn(&Bucket) -> u64) -> u64 {
        let mut live: Vec<&Bucket> = self.live(now).collect();
        live.sort_by_key(|b| b.second);
        let mut used: u64 = live.iter().map(|b| of(b)).sum();
        for b in live {
            if used < limit {
                break;
            }
            used -= of(b);
            if used < limit {
                return (b.second + BUCKETS as u64).saturating_sub(now).max(1);
            }
        }
        1
    }
}

/// A key's limits and what is left of them, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub rpm: u32,
    pub tpm: u64,
    pub requests_left: u64,
    pub tokens_left: u64,
    /// Until the oldest counted request / token leaves the window.
    pub requests_reset: Duration,
    pub tokens_reset: Duration,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub what: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
    pub standing: Standing,
}

/// All keys' windows. Sharded so that concurrent requests of different keys rarely wait
/// for one another.
#[derive(Debug)]
pub struct Limiter {
    shards: Vec<Mutex<HashMap<String, Window>>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            shards: (0..32).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Limiter {
    fn shard(&self, key: &str) -> &Mutex<HashMap<String, Window>> {
        let h = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        &self.shards[(h % self.shards.len() as u64) as usize]
    }

    /// Admits one request of `key` at `now` (unix seconds) and counts it, or refuses it.
    /// A key without limits (0, 0) is always admitted and nothing is kept for it.
    pub fn admit(
        &self,
        key: &str,
        rpm: u32,
        tpm: u64,
        now: u64,
    ) -> Result<Option<Standing>, Exceeded> {
        if rpm == 0 && tpm == 0 {
            return Ok(None);
        }
        let mut shard = self.shard(key).lock().expect("limiter lock");
        let w = shard.entry(key.to_owned()).or_default();
        let requests: u64 = w.live(now).map(|b| u64::from(b.requests)).sum();
        let tokens: u64 = w.live(now).map(|b| b.tokens).sum();
        let standing = |requests: u64| Standing {
            rpm,
            tpm,
            requests_left: u64::from(rpm).saturating_sub(requests),
            tokens_left: tpm.saturating_sub(tokens),
            requests_reset: Duration::from_secs(if requests > 0 {
                w.wait(now, 1, |b| u64::from(b.requests))
            } else {
                0
            }),
            tokens_reset: Duration::from_secs(if tokens > 0 {
                w.wait(now, 1, |b| b.tokens)
            } else {
                0
            }),
        };
        if rpm > 0 && requests >= u64::from(rpm) {
            return Err(Exceeded {
                what: "requests",
                limit: u64::from(rpm),
                retry_after: Duration::from_secs(
                    w.wait(now, u64::from(rpm), |b| u64::from(b.requests)),
                ),
                standing: standing(requests),
            });
        }
        if tpm > 0 && tokens >= tpm {
            return Err(Exceeded {
                what: "tokens",
                limit: tpm,
                retry_after: Duration::from_secs(w.wait(now, tpm, |b| b.tokens)),
                standing: standing(requests),
            });
        }
        let s = standing(requests + 1);
        w.bucket(now).requests += 1;
        Ok(Some(s))
    }

    /// Adds a finished request's tokens to its key's window.
    pub fn add_tokens(&self, key: &str, tokens: u64, now: u64) {
        if tokens == 0 {
            return;
        }
        let mut shard = self.shard(key).lock().expect("limiter lock");
        if let Some(w) = shard.get_mut(key) {
            w.bucket(now).tokens += tokens;
        }
    }

    /// Forgets keys idle for a minute (called now and then).
    pub fn sweep(&self, now: u64) {
        for s in &self.shards {
            s.lock()
                .expect("limiter lock")
                .retain(|_, w| w.live(now).next().is_some());
        }
    }

    pub fn tracked_keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("limiter lock").len())
            .sum()
    }
}

/// `1s`, `6m0s`, `20ms`, as OpenAI writes its reset durations.
pub fn openai_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.subsec_millis());
    }
    if secs < 60 {
        return format!("{secs}s");
    }
    format!("{}m{}s", secs / 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_slide() {
        let l = Limiter::default();
        let t0 = 1_000_000;
        for i in 0..3 {
            let s = l.admit("k", 3, 0, t0 + i).unwrap().unwrap();
            assert_eq!(s.requests_left, 2 - i);
        }
        let e = l.admit("k", 3, 0, t0 + 10).unwrap_err();
        assert_eq!(e.what, "requests");
        // The first request leaves the window at t0 + 60: 50 s from t0 + 10.
        assert_eq!(e.retry_after, Duration::from_secs(50));
        assert!(l.admit("k", 3, 0, t0 + 59).is_err());
        assert!(l.admit("k", 3, 0, t0 + 60).is_ok());
        // Another key is not affected.
        assert!(l.admit("other", 3, 0, t0 + 10).is_ok());
    }

    #[test]
    fn tokens_per_minute_count_finished_requests() {
        let l = Limiter::default();
        let t0 = 5_000;
        l.admit("k", 0, 100, t0).unwrap();
        l.add_tokens("k", 60, t0);
        l.admit("k", 0, 100, t0 + 1).unwrap();
        l.add_tokens("k", 50, t0 + 1);
        let e = l.admit("k", 0, 100, t0 + 2).unwrap_err();
        assert_eq!(e.what, "tokens");
        // Dropping the first second's 60 tokens leaves 50 < 100: at t0 + 60.
        assert_eq!(e.retry_after, Duration::from_secs(58));
        assert!(l.admit("k", 0, 100, t0 + 60).is_ok());
    }

    #[test]
    fn unlimited_keys_cost_nothing_and_idle_keys_are_forgotten() {
        let l = Limiter::default();
        for i in 0..1000 {
            assert_eq!(l.admit(&format!("k{i}"), 0, 0, 1).unwrap(), None);
        }
        assert_eq!(l.tracked_keys(), 0);
        l.admit("a", 10, 0, 100).unwrap();
        assert_eq!(l.tracked_keys(), 1);
        l.sweep(159);
        assert_eq!(l.tracked_keys(), 1);
        l.sweep(160);
        assert_eq!(l.tracked_keys(), 0);
    }

    #[test]
    fn durations_look_like_openais() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
    }
}
