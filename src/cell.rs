//! The token cell: one writer (the refresher), any number of lock-free readers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwapOption, Guard};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::token::IamToken;

/// What the refresher last did, for status reports (systemd `STATUS=`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshStatus {
    pub attempts: u64,
    /// The last failure, cleared by a success.
    pub last_error: Option<String>,
}

/// Holds the current token. Readers never wait on the network: they load the current value and
/// answer from memory.
pub struct TokenCell {
    current: ArcSwapOption<IamToken>,
    /// Wakes requests waiting for the first token.
    stored: Notify,
    /// Raised by a reader that found the token lapsed on the wall clock only.
    lapsed: Notify,
    /// Set with `lapsed`, cleared when a new token is stored, so stale nudges can be told apart.
    lapse_reported: AtomicBool,
    /// False while the refresher is in a failure streak.
    healthy: AtomicBool,
    status: watch::Sender<RefreshStatus>,
    /// Distinct tokens this process obtained that may still be valid (for revocation).
    obtained: Mutex<Vec<Arc<IamToken>>>,
}

impl Default for TokenCell {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenCell {
    pub fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            stored: Notify::new(),
            lapsed: Notify::new(),
            lapse_reported: AtomicBool::new(false),
            healthy: AtomicBool::new(false),
            status: watch::Sender::new(RefreshStatus::default()),
            obtained: Mutex::new(Vec::new()),
        }
    }

    /// Replaces the token. Only the refresher calls this.
    pub fn store(&self, token: Arc<IamToken>) {
        {
            let mut obtained = self.obtained.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            obtained.retain(|t| t.valid_until() > now);
            if !obtained.iter().any(|t| t.same_secret(&token)) {
                obtained.push(Arc::clone(&token));
            }
        }
        self.current.store(Some(token));
        self.lapse_reported.store(false, Ordering::Relaxed);
        self.stored.notify_waiters();
    }

    /// The current token, servable or not.
    pub fn load(&self) -> Guard<Option<Arc<IamToken>>> {
        self.current.load()
    }

    /// The current token as an owned handle.
    pub fn current(&self) -> Option<Arc<IamToken>> {
        self.current.load_full()
    }

    /// The current token and its time left, if it may be served now.
    pub fn servable(&self) -> Option<(Arc<IamToken>, Duration)> {
        self.servable_at(Instant::now(), SystemTime::now())
    }

    /// As [`TokenCell::servable`], at the given clock readings.
    pub fn servable_at(
        &self,
        mono_now: Instant,
        wall_now: SystemTime,
    ) -> Option<(Arc<IamToken>, Duration)> {
        self.with_servable(mono_now, wall_now, |token, left| (Arc::clone(token), left))
    }

    /// Calls `serve` with the current token and its time left, if it may be served at the given
    /// clock readings. The token is borrowed, not cloned: the request hot path touches no
    /// reference count shared between threads.
    pub fn with_servable<R>(
        &self,
        mono_now: Instant,
        wall_now: SystemTime,
        serve: impl FnOnce(&Arc<IamToken>, Duration) -> R,
    ) -> Option<R> {
        let guard = self.current.load();
        let token = guard.as_ref()?;
        match token.servable_for(mono_now, wall_now) {
            Some(left) => Some(serve(token, left)),
            None => {
                // Expired on the wall clock while the monotonic deadline is still ahead: the
                // machine was suspended or the clock moved. Ask the refresher to renew now.
                if token.valid_until() > mono_now + token.margin() {
                    self.lapse_reported.store(true, Ordering::Relaxed);
                    self.lapsed.notify_one();
                }
                None
            }
        }
    }

    /// Like [`TokenCell::servable`], but waits up to `max_wait` for the first token to arrive.
    /// Once any token has been stored it answers at once. `wall_clock` reads the wall clock
    /// (`SystemTime::now` in production, a skewed clock in tests).
    pub async fn wait_servable(
        &self,
        max_wait: Duration,
        wall_clock: fn() -> SystemTime,
    ) -> Option<(Arc<IamToken>, Duration)> {
        let now = || self.servable_at(Instant::now(), wall_clock());
        let first = now();
        if first.is_some() || max_wait.is_zero() || self.current.load().is_some() {
            return first;
        }
        let deadline = Instant::now() + max_wait;
        loop {
            let stored = self.stored.notified();
            tokio::pin!(stored);
            stored.as_mut().enable();
            if self.current.load().is_some() {
                return now();
            }
            if tokio::time::timeout_at(deadline, stored).await.is_err() {
                return now();
            }
        }
    }

    /// Resolves when a reader reports a wall-clock lapse.
    pub async fn lapsed(&self) {
        self.lapsed.notified().await;
    }

    /// True if a reader reported the current token lapsed since it was stored.
    pub fn lapse_reported(&self) -> bool {
        self.lapse_reported.load(Ordering::Relaxed)
    }

    /// Tokens obtained by this process that have not expired yet.
    pub fn obtained(&self) -> Vec<Arc<IamToken>> {
        let now = Instant::now();
        let obtained = self.obtained.lock().unwrap_or_else(|p| p.into_inner());
        obtained
            .iter()
            .filter(|t| t.valid_until() > now)
            .cloned()
            .collect()
    }

    /// Publishes the refresher's latest status.
    pub fn report(&self, status: RefreshStatus) {
        self.status.send_replace(status);
    }

    /// Follows the refresher's status.
    pub fn subscribe(&self) -> watch::Receiver<RefreshStatus> {
        self.status.subscribe()
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// True after a successful refresh until the next failure.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(lifetime: Duration) -> Arc<IamToken> {
        let wall = SystemTime::now();
        let (token, _) = IamToken::accept(
            "t1.cell".into(),
            Some(wall + lifetime),
            Instant::now(),
            wall,
            Duration::from_secs(1),
        )
        .unwrap();
        Arc::new(token)
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_reader_gets_the_first_token() {
        let cell = Arc::new(TokenCell::new());
        let writer = Arc::clone(&cell);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            writer.store(token(Duration::from_secs(60)));
        });
        let got = cell
            .wait_servable(Duration::from_secs(1), SystemTime::now)
            .await;
        assert_eq!(got.unwrap().0.expose_secret(), "t1.cell");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_reader_gives_up_after_the_limit() {
        let cell = TokenCell::new();
        let started = Instant::now();
        assert!(
            cell.wait_servable(Duration::from_millis(300), SystemTime::now)
                .await
                .is_none()
        );
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn wall_clock_lapse_nudges_the_refresher() {
        let cell = TokenCell::new();
        cell.store(token(Duration::from_secs(3600)));
        let later = SystemTime::now() + Duration::from_secs(7200);
        assert!(cell.servable_at(Instant::now(), later).is_none());
        // The permit is stored, so the refresher sees it even if it was not waiting yet.
        tokio::time::timeout(Duration::from_millis(1), cell.lapsed())
            .await
            .expect("nudged");
    }
}
