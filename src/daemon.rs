//! Wiring: binds the listeners, starts the refresher and the systemd reporter, serves until
//! shutdown, then optionally revokes. Shared by `serve`, `dev` and the integration tests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::auth::{ClientSecret, SecretFileError};
use crate::cell::TokenCell;
use crate::config::{ListenAddr, Settings};
use crate::credentials::Credentials;
use crate::iam::{IamApi, IamError};
use crate::metrics::Metrics;
use crate::notify::{Notifier, watchdog_interval};
use crate::refresh::{Refresher, Reload, retry_in};
use crate::server::{BindError, Limits, Listener, Routes, TokenApi, serve};
use crate::sink::FileSink;

/// Bound sockets and what guards them, before anything runs.
pub struct Listeners {
    pub http: Vec<Listener>,
    /// Token listeners that require the client secret.
    pub authenticated: Vec<Listener>,
    pub client_secret: Option<Arc<ClientSecret>>,
    pub monitoring: Vec<Listener>,
}

/// Why the listeners could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Secret(#[from] SecretFileError),
}

/// Reads the client secret (if configured) and binds every configured address, failing on the
/// first that cannot be bound.
pub async fn bind(settings: &Settings) -> Result<Listeners, ListenError> {
    let http_settings = &settings.http;
    let client_secret = match &http_settings.client_secret_file {
        Some(path) => Some(Arc::new(ClientSecret::load(path)?)),
        None => None,
    };
    let unix = |addr| {
        Listener::bind(
            addr,
            http_settings.unix_socket_mode,
            http_settings.unix_socket_group,
        )
    };
    let mut http = Vec::new();
    for addr in &http_settings.listen {
        http.push(unix(addr).await?);
    }
    let mut authenticated = Vec::new();
    for addr in &http_settings.authenticated_listen {
        authenticated.push(unix(addr).await?);
    }
    let mut monitoring = Vec::new();
    for addr in &settings.metrics_listen {
        monitoring.push(Listener::bind(&ListenAddr::Tcp(*addr), 0o660, None).await?);
    }
    Ok(Listeners {
        http,
        authenticated,
        client_secret,
        monitoring,
    })
}

/// New credentials, policy and client to switch to on SIGHUP, built by the caller.
pub type ReloadSource<C> =
    Box<dyn Fn() -> Result<(Arc<Credentials>, crate::refresh::RefreshPolicy, C), String> + Send>;

/// Runs the sidecar on already-bound listeners until `shutdown` resolves. `reload`, when given,
/// is called on every SIGHUP.
pub async fn run<C: IamApi>(
    settings: &Settings,
    credentials: Arc<Credentials>,
    iam: C,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reload: Option<ReloadSource<C>>,
) {
    let cell = Arc::new(TokenCell::new());
    let metrics = Arc::new(Metrics::new());
    // Every listener answers from the same cell and counts into the same metrics.
    let new_api = || {
        TokenApi::new(
            Arc::clone(&cell),
            &settings.http,
            credentials.service_account_id(),
        )
        .with_metrics(Arc::clone(&metrics))
    };
    let api = Arc::new(new_api());
    let monitoring_api = Arc::new(new_api().with_routes(Routes::Monitoring));
    let mut bound = Vec::new();
    for listener in listeners.http {
        tracing::info!(addr = %listener.local_addr(), "serving the IAM token over HTTP");
        if let Listener::Tcp(tcp) = &listener
            && tcp
                .local_addr()
                .is_ok_and(|a| !crate::config::is_loopback(a.ip()))
        {
            tracing::warn!(
                addr = %listener.local_addr(),
                "this listener is not loopback-only: anyone who can reach it gets the token in \
                 clear text; prefer 127.0.0.1, a Unix socket, or http.authenticated_listen"
            );
        }
        bound.push((listener, Arc::clone(&api)));
    }
    if let Some(secret) = listeners.client_secret {
        let authenticated_api = Arc::new(new_api().with_client_secret(secret));
        for listener in listeners.authenticated {
            tracing::info!(
                addr = %listener.local_addr(),
                "serving the IAM token over HTTP to clients presenting the client secret"
            );
            bound.push((listener, Arc::clone(&authenticated_api)));
        }
    }
    for listener in listeners.monitoring {
        tracing::info!(addr = %listener.local_addr(), "serving metrics and health over HTTP");
        bound.push((listener, Arc::clone(&monitoring_api)));
    }
    tracing::info!(
        credentials = %credentials.describe(),
        iam = %settings.iam.endpoint,
        "fetching the first IAM token"
    );

    let mut refresher = Refresher::new(
        iam,
        Arc::clone(&credentials),
        Arc::clone(&cell),
        settings.refresh.clone(),
    )
    .with_metrics(Arc::clone(&metrics));
    if let Some(sink) = &settings.sink {
        refresher = refresher.with_sink(Arc::new(FileSink::new(sink.clone())));
    }
    let notifier = Notifier::from_env().map(Arc::new);
    let mut side_tasks = tokio::task::JoinSet::new();
    if let Some(reload) = reload {
        let (requests, receiver) = mpsc::channel(1);
        refresher = refresher.with_reloads(receiver);
        side_tasks.spawn(reload_on_sighup(reload, requests, notifier.clone()));
    }
    if let Some(notifier) = &notifier {
        side_tasks.spawn(report_to_systemd(Arc::clone(&cell), Arc::clone(notifier)));
        if let Some(interval) = watchdog_interval() {
            side_tasks.spawn(watchdog(Arc::clone(notifier), interval));
        }
    }

    let (stop_refresher, refresher_stopped) = oneshot::channel::<()>();
    let refresher = tokio::spawn(refresher.run_until(async {
        let _ = refresher_stopped.await;
    }));
    let stopping = notifier.clone();
    serve(
        bound,
        async move {
            shutdown.await;
            if let Some(notifier) = stopping {
                notifier.notify("STOPPING=1");
            }
        },
        Limits::from_settings(&settings.http),
    )
    .await;
    side_tasks.shutdown().await;
    let _ = stop_refresher.send(());
    if let Ok(refresher) = refresher.await
        && settings.iam.revoke_on_shutdown
    {
        refresher.revoke_obtained(settings.iam.revoke_timeout).await;
    }
    tracing::info!("stopped");
}

/// READY=1 once the first token is held (and written, with a sink), then STATUS= after every
/// attempt.
async fn report_to_systemd(cell: Arc<TokenCell>, notifier: Arc<Notifier>) {
    let mut status = cell.subscribe();
    let mut ready = false;
    loop {
        if status.changed().await.is_err() {
            return;
        }
        let report = status.borrow_and_update().clone();
        let token = cell.servable();
        let held = match &token {
            Some((token, _)) => format!(
                "token valid until {}",
                humantime::format_rfc3339_seconds(token.expires_at())
            ),
            None => "no valid token".to_owned(),
        };
        let text = match report.last_error {
            None => format!("serving; {held}"),
            Some(error) => format!("renewal failing ({error}); {held}"),
        };
        if !ready && token.is_some() {
            ready = true;
            notifier.notify(&format!("READY=1\nSTATUS={text}"));
        } else {
            notifier.notify(&format!("STATUS={text}"));
        }
    }
}

async fn watchdog(notifier: Arc<Notifier>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        notifier.notify("WATCHDOG=1");
    }
}

async fn reload_on_sighup<C: IamApi>(
    reload: ReloadSource<C>,
    requests: mpsc::Sender<Reload<C>>,
    notifier: Option<Arc<Notifier>>,
) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; reload disabled");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received; reloading the configuration and credentials");
        if let Some(notifier) = &notifier {
            notifier.reloading();
        }
        match reload() {
            Err(reason) => tracing::error!(
                %reason,
                "reload rejected: the old configuration and credentials stay in force"
            ),
            Ok((credentials, policy, iam)) => {
                let (done, outcome) = oneshot::channel();
                let request = Reload {
                    credentials,
                    policy,
                    iam,
                    done,
                };
                if requests.send(request).await.is_err() {
                    return;
                }
                let _ = outcome.await;
            }
        }
        if let Some(notifier) = &notifier {
            notifier.notify("READY=1");
        }
    }
}

/// Fetches one token for the `token` command, retrying transient failures until `deadline`
/// passes. Permanent failures return at once.
pub async fn fetch_once<C: IamApi>(
    settings: &Settings,
    credentials: Arc<Credentials>,
    iam: C,
    deadline: Duration,
) -> Result<Arc<crate::token::IamToken>, IamError> {
    let cell = Arc::new(TokenCell::new());
    let refresher = Refresher::new(
        iam,
        credentials,
        Arc::clone(&cell),
        settings.refresh.clone(),
    );
    let give_up = tokio::time::Instant::now() + deadline;
    let mut failures = 0;
    loop {
        match refresher.refresh_once().await {
            Ok(_) => return Ok(cell.current().expect("a token was just stored")),
            Err(error) if error.is_permanent() => return Err(error),
            Err(error) => {
                failures += 1;
                let wait = retry_in(failures, false, &settings.refresh, rand::random());
                if tokio::time::Instant::now() + wait > give_up {
                    return Err(error);
                }
                tracing::warn!(%error, retry_in = ?wait, "IAM token request failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
