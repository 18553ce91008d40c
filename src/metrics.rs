//! Prometheus metrics in the text exposition format, served at `/metrics`.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::cell::TokenCell;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    outcome: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Every metric the sidecar exports.
pub struct Metrics {
    registry: Registry,
    refresh_attempts: Family<RefreshLabels, Counter>,
    iam_latency: Histogram,
    http_requests: Family<HttpLabels, Counter>,
    /// The two series every token request hits, resolved once so the hot path is one atomic add.
    token_ok: Counter,
    metadata_ok: Counter,
    token_expires_in: Gauge<f64, AtomicU64>,
    token_expiry: Gauge<f64, AtomicU64>,
    ready: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("yc_iam_sidecar");
        let refresh_attempts = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refresh_attempts",
            "IAM token refresh attempts by outcome and gRPC code",
            refresh_attempts.clone(),
        );
        // 5 ms to about 20 s.
        let iam_latency = Histogram::new(exponential_buckets(0.005, 2.0, 13));
        registry.register(
            "iam_call_duration_seconds",
            "Duration of IamTokenService/Create calls",
            iam_latency.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let token_expires_in = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "token_expires_in_seconds",
            "Seconds until the current token expires (0 without a token)",
            token_expires_in.clone(),
        );
        let token_expiry = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "token_expiry_timestamp_seconds",
            "Unix time at which the current token expires (0 without a token)",
            token_expiry.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while a servable token is held, else 0",
            ready.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information", build_info);
        let token_ok = http_requests
            .get_or_create(&HttpLabels {
                route: "token",
                status: 200,
            })
            .clone();
        let metadata_ok = http_requests
            .get_or_create(&HttpLabels {
                route: "metadata_token",
                status: 200,
            })
            .clone();
        Self {
            registry,
            refresh_attempts,
            iam_latency,
            http_requests,
            token_ok,
            metadata_ok,
            token_expires_in,
            token_expiry,
            ready,
        }
    }

    /// Records one refresh attempt; `code` is the gRPC code name or a short reason.
    pub fn refresh_attempt(&self, success: bool, code: &'static str, latency: Option<Duration>) {
        self.refresh_attempts
            .get_or_create(&RefreshLabels {
                outcome: if success { "success" } else { "failure" },
                code,
            })
            .inc();
        if let Some(latency) = latency {
            self.iam_latency.observe(latency.as_secs_f64());
        }
    }

    pub fn http_request(&self, route: &'static str, status: u16) {
        match (route, status) {
            ("token", 200) => self.token_ok.inc(),
            ("metadata_token", 200) => self.metadata_ok.inc(),
            _ => self
                .http_requests
                .get_or_create(&HttpLabels { route, status })
                .inc(),
        };
    }

    /// Renders the text format, reading the token gauges from `cell` at scrape time.
    pub fn render(&self, cell: &TokenCell) -> String {
        let (expires_in, expiry, ready) = match cell.current() {
            Some(token) => {
                let expiry = token
                    .expires_at()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                let ready = cell.servable().is_some();
                (token.remaining(Instant::now()).as_secs_f64(), expiry, ready)
            }
            None => (0.0, 0.0, false),
        };
        self.token_expires_in.set(expires_in);
        self.token_expiry.set(expiry);
        self.ready.set(i64::from(ready));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The gRPC code names used as label values.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
