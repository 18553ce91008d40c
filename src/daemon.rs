//! Wiring: binds the listeners, starts the refresher, serves until shutdown. Shared by `serve`,
//! `dev` and the integration tests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::cell::TokenCell;
use crate::config::Settings;
use crate::credentials::Credentials;
use crate::iam::{CreateToken, IamError};
use crate::refresh::{Refresher, retry_in};
use crate::server::{TokenApi, serve};

/// A listen address that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds every configured address, failing on the first that cannot be bound.
pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, BindError> {
    let mut listeners = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Runs the sidecar on already-bound listeners until `shutdown` resolves.
pub async fn run<C: CreateToken>(
    settings: &Settings,
    credentials: Arc<Credentials>,
    iam: C,
    listeners: Vec<TcpListener>,
    shutdown: impl Future<Output = ()>,
) {
    let cell = Arc::new(TokenCell::new());
    let api = Arc::new(TokenApi::new(
        Arc::clone(&cell),
        &settings.http,
        credentials.service_account_id(),
    ));
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "serving the IAM token over HTTP");
        }
    }
    tracing::info!(
        credentials = %credentials.describe(),
        iam = %settings.iam.endpoint,
        "fetching the first IAM token"
    );
    let refresher = Refresher::new(
        iam,
        Arc::clone(&credentials),
        Arc::clone(&cell),
        settings.refresh.clone(),
    );
    let refresher = tokio::spawn(refresher.run());
    serve(listeners, api, shutdown, settings.http.shutdown_grace).await;
    refresher.abort();
    tracing::info!("stopped");
}

/// Fetches one token for the `token` command, retrying transient failures until `deadline`
/// passes. Permanent failures return at once.
pub async fn fetch_once<C: CreateToken>(
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
            Ok(_) => {
                return Ok(cell.current().expect("a token was just stored"));
            }
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
