//! A per-peer token bucket and a writer that obeys it: background replication never takes
//! more than its share of a link, whatever the number of VMs replicating to that peer.

use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;

/// Tokens are bytes. `rate == 0` means no limit. The rate can change while writers use
/// the bucket (`roam peer set-limit`).
#[derive(Debug)]
pub struct Bucket {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

fn sane(bytes_per_s: f64) -> f64 {
    if bytes_per_s.is_finite() && bytes_per_s > 0.0 {
        bytes_per_s
    } else {
        0.0
    }
}

/// The smallest grant for a large write, bytes.
const QUANTUM: f64 = 16.0 * 1024.0;

/// A tenth of a second of burst, at least one chunk frame.
fn burst_of(rate: f64) -> f64 {
    (rate / 10.0).max(80.0 * 1024.0)
}

impl Bucket {
    pub fn new(bytes_per_s: f64) -> Bucket {
        let rate = sane(bytes_per_s);
        let burst = burst_of(rate);
        Bucket {
            state: Mutex::new(State {
                rate,
                burst,
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the rate (bytes/s; 0 = no limit) from now on.
    pub fn set_rate(&self, bytes_per_s: f64) {
        let mut s = self.lock();
        s.rate = sane(bytes_per_s);
        s.burst = burst_of(s.rate);
        s.tokens = s.tokens.min(s.burst);
        s.last = Instant::now();
    }

    /// The limit, bytes/s; 0 = none.
    pub fn rate(&self) -> f64 {
        self.lock().rate
    }

    /// Take up to `want` bytes now; `Err(wait)` if none are available yet.
    pub fn take(&self, want: usize, now: Instant) -> Result<usize, Duration> {
        let mut s = self.lock();
        if s.rate == 0.0 {
            return Ok(want);
        }
        let tokens =
            (s.tokens + now.saturating_duration_since(s.last).as_secs_f64() * s.rate).min(s.burst);
        s.last = now;
        // Grant a useful amount or nothing: handing out the trickle that accumulated since
        // the last call (a few bytes per microsecond) turns one large write into thousands
        // of tiny ones, and their per-call cost, not the limit, then sets the rate.
        let need = (want as f64).min(s.burst / 2.0).clamp(1.0, QUANTUM);
        if tokens < need {
            s.tokens = tokens;
            return Err(Duration::from_secs_f64((need - tokens) / s.rate));
        }
        let n = (tokens as usize).min(want);
        s.tokens = tokens - n as f64;
        Ok(n)
    }

    /// Give back what was taken but not written.
    pub fn refund(&self, n: usize) {
        let mut s = self.lock();
        if s.rate == 0.0 || n == 0 {
            return;
        }
        s.tokens = (s.tokens + n as f64).min(s.burst);
    }
}

/// `inner`, paced by `bucket`.
pub struct Throttled<'a, W> {
    pub inner: W,
    bucket: &'a Bucket,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<'a, W> Throttled<'a, W> {
    pub fn new(inner: W, bucket: &'a Bucket) -> Self {
        Throttled {
            inner,
            bucket,
            sleep: None,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Throttled<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        loop {
            if let Some(s) = this.sleep.as_mut() {
                if s.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            match this.bucket.take(buf.len(), Instant::now()) {
                Ok(n) => {
                    let r = Pin::new(&mut this.inner).poll_write(cx, &buf[..n]);
                    match &r {
                        Poll::Ready(Ok(w)) => this.bucket.refund(n - w),
                        _ => this.bucket.refund(n),
                    }
                    return r;
                }
                Err(wait) => {
                    this.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                }
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use std::future::Future;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn bucket_refills_at_its_rate_and_caps_at_its_burst() {
        let b = Bucket::new(1_000_000.0);
        let t0 = Instant::now();
        let first = b.take(10_000_000, t0).unwrap();
        assert_eq!(first, 100_000); // the burst
        assert!(b.take(10, t0).is_err());
        let later = b.take(10_000_000, t0 + Duration::from_millis(50)).unwrap();
        assert!((49_000..=51_000).contains(&later), "{later}");
        assert!(Bucket::new(0.0).take(usize::MAX, t0).is_ok());
    }

    #[test]
    fn large_writes_get_useful_grants_not_a_trickle() {
        let b = Bucket::new(5_000_000.0);
        let t0 = Instant::now();
        assert!(b.take(10_000_000, t0).is_ok()); // the burst
                                                 // 1 µs later about 5 bytes accumulated: wait for a quantum instead.
        let wait = b.take(65536, t0 + Duration::from_micros(1)).unwrap_err();
        assert!(wait >= Duration::from_millis(3), "{wait:?}");
        let n = b.take(65536, t0 + Duration::from_millis(4)).unwrap();
        assert!(n >= 16 * 1024, "{n}");
        // Small writes still go through as soon as their bytes are there.
        assert!(b.take(50, t0 + Duration::from_millis(5)).is_ok());
    }

    #[test]
    fn the_rate_changes_while_in_use() {
        let b = Bucket::new(0.0);
        let t0 = Instant::now();
        assert_eq!(b.take(5_000_000, t0), Ok(5_000_000));
        b.set_rate(1_000_000.0);
        assert_eq!(b.rate(), 1_000_000.0);
        let t1 = Instant::now();
        let first = b.take(10_000_000, t1).unwrap();
        assert!(first <= 100_000, "{first}");
        assert!(b.take(200_000, t1).is_err());
        b.set_rate(0.0);
        assert_eq!(b.take(7, t1), Ok(7));
    }

    #[tokio::test]
    async fn throttled_writer_keeps_to_the_rate() {
        let b = Bucket::new(4_000_000.0); // 4 MB/s, burst 400 kB
        let mut w = Throttled::new(tokio::io::sink(), &b);
        let t0 = Instant::now();
        let data = vec![1u8; 1_200_000];
        w.write_all(&data).await.unwrap();
        let took = t0.elapsed().as_secs_f64();
        // (1.2 MB − 0.4 MB burst) / 4 MB/s = 0.2 s.
        assert!((0.17..0.5).contains(&took), "{took}");
    }
}
