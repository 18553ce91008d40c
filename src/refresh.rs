//! The refresher: the only writer of the token cell. It renews the token on a schedule derived
//! from `expires_at`, and on failure keeps the old token while backing off.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::cell::{RefreshStatus, TokenCell};
use crate::credentials::Credentials;
use crate::iam::{IamApi, IamError};
use crate::metrics::{Metrics, code_name};
use crate::sink::FileSink;
use crate::token::IamToken;

/// When to renew and how to retry. Defaults and their reasons are in `config.example.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefreshPolicy {
    /// Renew at least this often. Yandex advises a new token about every hour.
    pub max_age: Duration,
    /// Renew after this fraction of the remaining lifetime, if that comes before `max_age`.
    pub renew_fraction: f64,
    /// Up to this fraction of the planned wait is taken off at random, so a fleet started
    /// together does not renew together.
    pub jitter: f64,
    /// Never renew sooner than this after a success, whatever IAM returns.
    pub min_interval: Duration,
    /// Stop serving a token this long before it expires (a tenth of the lifetime for short-lived
    /// tokens). Google's client libraries treat a token with under 225 s left as expired.
    pub serve_margin: Duration,
    /// First retry delay after a failure; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest retry delay, and the delay used for permanent errors.
    pub backoff_max: Duration,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(3600),
            renew_fraction: 0.5,
            jitter: 0.1,
            min_interval: Duration::from_secs(5),
            serve_margin: Duration::from_secs(300),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// How long after receiving a token with `remaining` life to renew it: `renew_fraction` of the
/// remaining life but at most `max_age`, minus up to `jitter` of that, and never under
/// `min_interval`. `random` is uniform in `[0, 1)`.
pub fn refresh_in(remaining: Duration, policy: &RefreshPolicy, random: f64) -> Duration {
    let planned = remaining.mul_f64(policy.renew_fraction).min(policy.max_age);
    let jittered = planned.saturating_sub(planned.mul_f64(policy.jitter * random.clamp(0.0, 1.0)));
    jittered.max(policy.min_interval)
}

/// How long to wait after the `failures`-th consecutive failure (1-based): exponential from
/// `backoff_initial` up to `backoff_max`, the upper half jittered; permanent errors wait the
/// maximum. `random` is uniform in `[0, 1)`.
pub fn retry_in(failures: u32, permanent: bool, policy: &RefreshPolicy, random: f64) -> Duration {
    let base = if permanent {
        policy.backoff_max
    } else {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(30));
        policy
            .backoff_initial
            .saturating_mul(factor)
            .min(policy.backoff_max)
    };
    base / 2 + (base / 2).mul_f64(random.clamp(0.0, 1.0))
}

/// A successful refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    /// IAM handed out the token already held (normal; it may do so until near expiry).
    pub same_token: bool,
}

/// A request to switch to new credentials (SIGHUP). The new credentials must fetch a token
/// before they are adopted; until then, and if they fail, the old ones stay in force.
pub struct Reload<C> {
    pub credentials: Arc<Credentials>,
    pub policy: RefreshPolicy,
    pub iam: C,
    /// Told whether the reload took effect.
    pub done: oneshot::Sender<Result<(), IamError>>,
}

/// Why the refresher woke up.
enum Wake<C> {
    Due,
    Reload(Reload<C>),
}

/// Renews the token in `cell` with `credentials` through `iam`.
pub struct Refresher<C> {
    iam: C,
    credentials: Arc<Credentials>,
    cell: Arc<TokenCell>,
    policy: RefreshPolicy,
    /// Source of jitter, uniform in `[0, 1)`; fixed in tests.
    random: fn() -> f64,
    metrics: Option<Arc<Metrics>>,
    sink: Option<Arc<FileSink>>,
    reloads: Option<mpsc::Receiver<Reload<C>>>,
}

impl<C: IamApi> Refresher<C> {
    pub fn new(
        iam: C,
        credentials: Arc<Credentials>,
        cell: Arc<TokenCell>,
        policy: RefreshPolicy,
    ) -> Self {
        Self {
            iam,
            credentials,
            cell,
            policy,
            random: rand::random::<f64>,
            metrics: None,
            sink: None,
            reloads: None,
        }
    }

    /// Replaces the jitter source (tests use a constant).
    pub fn with_random(mut self, random: fn() -> f64) -> Self {
        self.random = random;
        self
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Writes every new token to `sink` before it is stored (and so before readiness).
    pub fn with_sink(mut self, sink: Arc<FileSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    pub fn with_reloads(mut self, reloads: mpsc::Receiver<Reload<C>>) -> Self {
        self.reloads = Some(reloads);
        self
    }

    /// Fetches one token with the current credentials and stores it. Does not sleep or retry.
    pub async fn refresh_once(&self) -> Result<Renewed, IamError> {
        let token = self.fetch(&self.iam, &self.credentials).await?;
        Ok(self.adopt(token).await)
    }

    /// One Create call, validated, not yet stored.
    async fn fetch(&self, iam: &C, credentials: &Credentials) -> Result<IamToken, IamError> {
        let started = Instant::now();
        let result = self.fetch_unrecorded(iam, credentials).await;
        if let Some(metrics) = &self.metrics {
            let code = match &result {
                Ok(_) => "OK",
                Err(IamError::BadAnswer { .. }) => "BAD_ANSWER",
                Err(IamError::Credentials(_)) => "CREDENTIALS",
                Err(e) => e.code().map_or("UNKNOWN", code_name),
            };
            let called_iam = !matches!(result, Err(IamError::Credentials(_)));
            metrics.refresh_attempt(result.is_ok(), code, called_iam.then(|| started.elapsed()));
        }
        result
    }

    async fn fetch_unrecorded(
        &self,
        iam: &C,
        credentials: &Credentials,
    ) -> Result<IamToken, IamError> {
        let identity = credentials.identity(SystemTime::now())?;
        let issued = iam.create(identity).await?;
        let (token, capped) = IamToken::accept(
            issued.iam_token,
            issued.expires_at,
            Instant::now(),
            SystemTime::now(),
            self.policy.serve_margin,
        )
        .map_err(|error| IamError::BadAnswer {
            error,
            request_id: issued.request_id.clone(),
        })?;
        if capped {
            tracing::warn!(
                request_id = issued.request_id.as_deref().unwrap_or("-"),
                "IAM returned an expires_at more than 12 hours away; treating the token as valid \
                 for 12 hours"
            );
        }
        Ok(token)
    }

    /// Writes the token to the sink (if any), then stores it.
    async fn adopt(&self, token: IamToken) -> Renewed {
        let token = Arc::new(token);
        let same_token = self
            .cell
            .current()
            .is_some_and(|current| current.same_secret(&token));
        if let Some(sink) = &self.sink
            && !same_token
        {
            let (writer, written) = (Arc::clone(sink), Arc::clone(&token));
            let result = tokio::task::spawn_blocking(move || writer.write(&written)).await;
            match result {
                Ok(Ok(())) => {
                    tracing::debug!(path = %sink.path().display(), "token file written");
                    if let Err(error) = sink.notify_consumers().await {
                        tracing::warn!(%error, "token file consumer notification failed");
                    }
                }
                Ok(Err(error)) => tracing::error!(%error, "token file not updated"),
                Err(error) => tracing::error!(%error, "token file writer failed"),
            }
        }
        self.cell.store(token);
        Renewed { same_token }
    }

    /// Runs until `stop` resolves, then hands the refresher back (for revocation).
    pub async fn run_until(mut self, stop: impl Future<Output = ()>) -> Self {
        {
            let running = self.run_loop();
            tokio::pin!(running);
            tokio::select! {
                _ = &mut running => {}
                _ = stop => {}
            }
        }
        self
    }

    /// Runs forever. Cancel by dropping.
    pub async fn run(mut self) {
        self.run_loop().await;
    }

    /// Revokes every still-valid token this process obtained, within `limit` in all, and logs
    /// the outcome. Clients still holding those tokens lose access: this is opt-in.
    pub async fn revoke_obtained(&self, limit: Duration) {
        let tokens = self.cell.obtained();
        if tokens.is_empty() {
            return;
        }
        let total = tokens.len();
        let revoking = async {
            let mut revoked = 0;
            for token in &tokens {
                match self.iam.revoke(token.expose_secret()).await {
                    Ok(()) => revoked += 1,
                    Err(error) => tracing::warn!(
                        %error,
                        expires_at = %humantime::format_rfc3339_seconds(token.expires_at()),
                        "revoking an IAM token failed"
                    ),
                }
            }
            revoked
        };
        match tokio::time::timeout(limit, revoking).await {
            Ok(revoked) => tracing::info!(
                revoked,
                total,
                "revoked the IAM tokens this process obtained"
            ),
            Err(_) => tracing::warn!(
                total,
                limit = %humantime::format_duration(limit),
                "revoking IAM tokens did not finish in time"
            ),
        }
    }

    async fn run_loop(&mut self) {
        let mut failures: u32 = 0;
        let mut permanent_streak = false;
        let mut attempts: u64 = 0;
        loop {
            let attempt_started = Instant::now();
            attempts += 1;
            let wait = match self.refresh_once().await {
                Ok(Renewed { same_token }) => {
                    let wait = self.log_renewal(same_token, failures);
                    failures = 0;
                    permanent_streak = false;
                    self.cell.set_healthy(true);
                    self.cell.report(RefreshStatus {
                        attempts,
                        last_error: None,
                    });
                    wait
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let permanent = error.is_permanent();
                    let wait = retry_in(failures, permanent, &self.policy, (self.random)());
                    self.log_failure(&error, permanent, permanent_streak, failures, wait);
                    permanent_streak = permanent;
                    self.cell.set_healthy(false);
                    self.cell.report(RefreshStatus {
                        attempts,
                        last_error: Some(error.to_string()),
                    });
                    self.withdraw_lapsed_file();
                    wait
                }
            };
            let mut deadline = attempt_started + wait;
            // Reloads that succeed renew the token themselves and restart the schedule.
            while let Wake::Reload(reload) = self.sleep(deadline, attempt_started).await {
                if let Some(wait) = self.reload(reload).await {
                    failures = 0;
                    permanent_streak = false;
                    deadline = Instant::now() + wait;
                }
            }
        }
    }

    fn log_renewal(&self, same_token: bool, failures: u32) -> Duration {
        let token = self.cell.current().expect("a token was just stored");
        let remaining = token.remaining(Instant::now());
        let wait = refresh_in(remaining, &self.policy, (self.random)());
        tracing::info!(
            credentials = %self.credentials.describe(),
            expires_at = %humantime::format_rfc3339_seconds(token.expires_at()),
            valid_for = %humantime::format_duration(whole_secs(remaining)),
            next_refresh_in = %humantime::format_duration(whole_secs(wait)),
            same_token,
            after_failures = failures,
            "IAM token renewed"
        );
        wait
    }

    /// Once no servable token is left, the token file goes too: a reader must never pick up an
    /// expired token from it.
    fn withdraw_lapsed_file(&self) {
        let Some(sink) = &self.sink else { return };
        if self.cell.current().is_none() || self.cell.servable().is_some() {
            return;
        }
        match sink.remove() {
            Ok(()) => tracing::warn!(
                path = %sink.path().display(),
                "removed the token file: the last token reached its safety margin"
            ),
            Err(error) => tracing::error!(%error, "cannot remove the lapsed token file"),
        }
    }

    /// Tries the new credentials; adopts them, their policy and client only if they yield a
    /// token. Returns the wait until the next renewal on success.
    async fn reload(&mut self, reload: Reload<C>) -> Option<Duration> {
        let described = reload.credentials.describe();
        match self.fetch(&reload.iam, &reload.credentials).await {
            Ok(token) => {
                self.credentials = reload.credentials;
                self.policy = reload.policy;
                self.iam = reload.iam;
                let renewed = self.adopt(token).await;
                self.cell.set_healthy(true);
                tracing::info!(credentials = %described, "reload applied");
                let wait = self.log_renewal(renewed.same_token, 0);
                let _ = reload.done.send(Ok(()));
                Some(wait)
            }
            Err(error) => {
                tracing::error!(
                    credentials = %described,
                    %error,
                    "reload rejected: the new credentials did not get a token; keeping the old \
                     credentials and token"
                );
                let _ = reload.done.send(Err(error));
                None
            }
        }
    }

    fn log_failure(
        &self,
        error: &IamError,
        permanent: bool,
        already_reported: bool,
        failures: u32,
        wait: Duration,
    ) {
        let token_left = self
            .cell
            .current()
            .map(|t| t.servable_for(Instant::now(), SystemTime::now()));
        let serving = match token_left {
            None => "no token held yet".to_owned(),
            Some(None) => "no servable token: clients get 503".to_owned(),
            Some(Some(left)) => format!(
                "still serving the previous token, valid for {}",
                humantime::format_duration(whole_secs(left))
            ),
        };
        let retry_in = humantime::format_duration(whole_secs(wait)).to_string();
        if permanent && already_reported {
            // Said loudly once per streak; repeated attempts only at debug.
            tracing::debug!(%error, failures, %retry_in, %serving, "IAM token refresh failed again");
        } else if permanent {
            tracing::error!(
                %error,
                failures,
                %retry_in,
                %serving,
                "IAM refused the credentials; retrying slowly until they or the configuration \
                 change"
            );
        } else {
            tracing::warn!(%error, failures, %retry_in, %serving, "IAM token refresh failed");
        }
    }

    /// Sleeps until `deadline`, or less if a reader reports that the token lapsed on the wall
    /// clock while the monotonic deadline had not passed (a suspended machine). Such a nudge is
    /// honoured only while healthy and no sooner than `min_interval` after the last attempt, so
    /// readers cannot cause a refresh storm. A reload request wakes it at once.
    async fn sleep(&mut self, deadline: Instant, attempt_started: Instant) -> Wake<C> {
        let cell = Arc::clone(&self.cell);
        loop {
            let reloads = &mut self.reloads;
            let reload = async {
                match reloads.as_mut() {
                    Some(reloads) => reloads.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Wake::Due,
                Some(reload) = reload => return Wake::Reload(reload),
                _ = cell.lapsed() => {
                    // Stale nudges (about a token already replaced) and nudges during a failure
                    // streak (backoff rules then) are ignored.
                    if !cell.is_healthy() || !cell.lapse_reported() {
                        continue;
                    }
                    let earliest = attempt_started + self.policy.min_interval;
                    tokio::time::sleep_until(earliest.min(deadline)).await;
                    tracing::info!("token lapsed on the wall clock (suspend or clock change); renewing early");
                    return Wake::Due;
                }
            }
        }
    }
}

fn whole_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iam::IssuedToken;
    use crate::iam::proto::create_iam_token_request::Identity;
    use crate::secret::SecretString;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use tonic::Code;

    /// A scripted IAM: each call pops the next answer (a token lifetime or a failure code) and
    /// records when it was asked, on tokio's clock.
    #[derive(Clone, Default)]
    struct ScriptedIam {
        answers: Arc<Mutex<VecDeque<Result<Duration, Code>>>>,
        calls: Arc<Mutex<Vec<Instant>>>,
    }

    impl ScriptedIam {
        fn new(answers: impl IntoIterator<Item = Result<Duration, Code>>) -> Self {
            let iam = Self::default();
            iam.answers.lock().unwrap().extend(answers);
            iam
        }

        fn call_offsets(&self, start: Instant) -> Vec<Duration> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|t| *t - start)
                .collect()
        }
    }

    impl IamApi for ScriptedIam {
        async fn create(&self, _identity: Identity) -> Result<IssuedToken, IamError> {
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push(Instant::now());
                calls.len()
            };
            let answer = self.answers.lock().unwrap().pop_front();
            match answer.unwrap_or(Err(Code::Unavailable)) {
                Ok(lifetime) => Ok(IssuedToken {
                    iam_token: format!("t1.scripted-{n}"),
                    expires_at: Some(SystemTime::now() + lifetime),
                    request_id: None,
                }),
                Err(code) => Err(IamError::Status {
                    code,
                    message: "scripted".into(),
                    request_id: None,
                    server_trace_id: None,
                }),
            }
        }

        async fn revoke(&self, _token: &str) -> Result<(), IamError> {
            Ok(())
        }
    }

    fn no_jitter() -> RefreshPolicy {
        RefreshPolicy::default()
    }

    fn spawn(
        iam: &ScriptedIam,
        policy: RefreshPolicy,
    ) -> (Arc<TokenCell>, tokio::task::JoinHandle<()>) {
        let cell = Arc::new(TokenCell::new());
        let credentials = Arc::new(Credentials::OAuthToken(SecretString::new("y0_x".into())));
        let refresher =
            Refresher::new(iam.clone(), credentials, Arc::clone(&cell), policy).with_random(|| 0.0);
        (cell, tokio::spawn(refresher.run()))
    }

    #[tokio::test(start_paused = true)]
    async fn renews_every_max_age_for_twelve_hour_tokens() {
        let twelve = Duration::from_secs(12 * 3600);
        let iam = ScriptedIam::new([Ok(twelve), Ok(twelve), Ok(twelve), Ok(twelve)]);
        let start = Instant::now();
        let (cell, task) = spawn(&iam, no_jitter());
        tokio::time::sleep(Duration::from_secs(3 * 3600 + 60)).await;
        assert_eq!(
            iam.call_offsets(start),
            vec![Duration::ZERO, HOUR, 2 * HOUR, 3 * HOUR]
        );
        assert_eq!(cell.current().unwrap().expose_secret(), "t1.scripted-4");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn outage_keeps_the_token_and_backs_off_exponentially() {
        let lifetime = Duration::from_secs(600);
        let mut answers = vec![Ok(lifetime)];
        answers.extend([Err(Code::Unavailable); 5]);
        answers.push(Ok(lifetime));
        let iam = ScriptedIam::new(answers);
        let policy = RefreshPolicy {
            backoff_initial: Duration::from_secs(2),
            ..no_jitter()
        };
        let start = Instant::now();
        let (cell, task) = spawn(&iam, policy);
        // Renewal due at 300 s; it fails five times.
        tokio::time::sleep(Duration::from_secs(300) + Duration::from_millis(1)).await;
        assert!(!cell.is_healthy());
        assert_eq!(cell.current().unwrap().expose_secret(), "t1.scripted-1");
        assert!(cell.servable().is_some(), "old token still served");
        tokio::time::sleep(Duration::from_secs(60)).await;
        // retry_in with random 0 waits half the base: 1, 2, 4, 8, 16 s.
        let offsets: Vec<u64> = iam
            .call_offsets(start)
            .iter()
            .map(Duration::as_secs)
            .collect();
        assert_eq!(offsets, vec![0, 300, 301, 303, 307, 315, 331]);
        assert!(cell.is_healthy());
        assert_eq!(cell.current().unwrap().expose_secret(), "t1.scripted-7");
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_retry_at_the_slow_end() {
        let iam = ScriptedIam::new([Err(Code::Unauthenticated); 10]);
        let start = Instant::now();
        let (cell, task) = spawn(&iam, no_jitter());
        tokio::time::sleep(Duration::from_secs(200)).await;
        let offsets: Vec<u64> = iam
            .call_offsets(start)
            .iter()
            .map(Duration::as_secs)
            .collect();
        // backoff_max is 60 s, jittered down to no less than 30 s.
        assert_eq!(offsets, vec![0, 30, 60, 90, 120, 150, 180]);
        assert!(cell.current().is_none());
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_lapse_triggers_an_early_renewal_but_no_storm() {
        let hour = Duration::from_secs(3600);
        let iam = ScriptedIam::new([Ok(hour), Ok(hour), Ok(hour)]);
        let start = Instant::now();
        let (cell, task) = spawn(&iam, no_jitter());
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A reader finds the token expired on the wall clock (the machine slept), many times.
        let resumed = SystemTime::now() + 2 * hour;
        for _ in 0..100 {
            assert!(cell.servable_at(Instant::now(), resumed).is_none());
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        // One early renewal, no sooner than min_interval after the last attempt.
        let offsets: Vec<u64> = iam
            .call_offsets(start)
            .iter()
            .map(Duration::as_secs)
            .collect();
        assert_eq!(offsets, vec![0, 5]);
        task.abort();
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn refresh_schedule_table() {
        let p = RefreshPolicy::default();
        // (case, remaining, random, expected)
        let cases = [
            ("already expired", Duration::ZERO, 0.0, p.min_interval),
            ("tiny lifetime", Duration::from_secs(4), 0.0, p.min_interval),
            ("12-hour token, no jitter", 12 * HOUR, 0.0, HOUR),
            ("12-hour token, full jitter", 12 * HOUR, 1.0, 54 * MIN),
            ("same token again with 11 h left", 11 * HOUR, 0.5, 57 * MIN),
            ("1-hour token", HOUR, 0.0, 30 * MIN),
            ("10-minute token", 10 * MIN, 0.0, 5 * MIN),
            ("40-minute remainder", 40 * MIN, 1.0, 18 * MIN),
        ];
        for (case, remaining, random, expected) in cases {
            assert_eq!(refresh_in(remaining, &p, random), expected, "{case}");
        }
    }

    #[test]
    fn refresh_happens_before_the_serving_margin() {
        let p = RefreshPolicy::default();
        for lifetime_s in [10u64, 60, 600, 3600, 12 * 3600] {
            let lifetime = Duration::from_secs(lifetime_s);
            let margin = p.serve_margin.min(lifetime / 10);
            let at = refresh_in(lifetime, &p, 0.0);
            if lifetime > p.min_interval * 2 {
                assert!(
                    at < lifetime - margin,
                    "lifetime {lifetime:?}: renew at {at:?}"
                );
            }
        }
    }

    #[test]
    fn backoff_grows_to_a_minute_and_permanent_waits_longest() {
        let p = RefreshPolicy::default();
        let upper = |n| retry_in(n, false, &p, 1.0);
        let lower = |n| retry_in(n, false, &p, 0.0);
        assert_eq!(upper(1), Duration::from_secs(1));
        assert_eq!(lower(1), Duration::from_millis(500));
        assert_eq!(upper(2), Duration::from_secs(2));
        assert_eq!(upper(4), Duration::from_secs(8));
        assert_eq!(upper(7), Duration::from_secs(60));
        assert_eq!(upper(1000), Duration::from_secs(60));
        assert_eq!(lower(1000), Duration::from_secs(30));
        assert_eq!(retry_in(1, true, &p, 1.0), Duration::from_secs(60));
        assert_eq!(retry_in(1, true, &p, 0.0), Duration::from_secs(30));
    }
}
