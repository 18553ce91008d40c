//! The local HTTP server: `/token`, the VM metadata token path the Yandex SDKs speak, and the
//! health endpoints. Every answer comes from memory.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

use arc_swap::ArcSwapOption;

use crate::auth::ClientSecret;
use crate::cell::TokenCell;
use crate::config::{HttpSettings, ListenAddr, is_loopback};
use crate::metrics::Metrics;
use crate::token::IamToken;

/// The metadata token path of the GCE-compatible API that Yandex VMs serve and the SDKs call.
pub const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";
const METADATA_ACCOUNT_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/";
const METADATA_EMAIL_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/email";

static METADATA_FLAVOR: HeaderName = HeaderName::from_static("metadata-flavor");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static GOOGLE: HeaderValue = HeaderValue::from_static("Google");
static NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
static TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
static JSON: HeaderValue = HeaderValue::from_static("application/json");

type HttpResponse = Response<Full<Bytes>>;

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routes {
    /// The token, the metadata protocol, health and metrics.
    All,
    /// Only `/metrics`, `/healthz` and `/readyz`: safe to expose beyond loopback.
    Monitoring,
}

/// Answers requests for the token from a [`TokenCell`].
pub struct TokenApi {
    cell: Arc<TokenCell>,
    wait_for_token: Duration,
    allowed_hosts: Vec<String>,
    listen_ips: Vec<IpAddr>,
    account_id: String,
    metrics: Option<Arc<Metrics>>,
    routes: Routes,
    client_secret: Option<Arc<ClientSecret>>,
    wall_clock: fn() -> SystemTime,
    rendered: ArcSwapOption<Rendered>,
}

/// Response bodies for one token, rendered when it is first served: the hot path only copies
/// them and writes `expires_in`. The token passed the bearer-token grammar on receipt, so it needs
/// no JSON escaping.
struct Rendered {
    token: Arc<IamToken>,
    plain: Bytes,
    json: Template,
    metadata: Template,
}

/// A JSON body split around its `expires_in` number.
struct Template {
    head: Bytes,
    tail: Bytes,
}

impl Template {
    fn new(head: String, tail: String) -> Self {
        Self {
            head: zeroizing_bytes(head.into_bytes()),
            tail: zeroizing_bytes(tail.into_bytes()),
        }
    }

    fn with_expires_in(&self, expires_in: u64) -> Bytes {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(expires_in).as_bytes();
        let mut body = Vec::with_capacity(self.head.len() + digits.len() + self.tail.len());
        body.extend_from_slice(&self.head);
        body.extend_from_slice(digits);
        body.extend_from_slice(&self.tail);
        zeroizing_bytes(body)
    }
}

impl Rendered {
    fn new(token: Arc<IamToken>) -> Self {
        let secret = token.expose_secret();
        let expires_at = humantime::format_rfc3339_seconds(token.expires_at());
        Self {
            plain: zeroizing_bytes(secret.as_bytes().to_vec()),
            json: Template::new(
                format!(
                    "{{\"access_token\":\"{secret}\",\"token_type\":\"Bearer\",\"expires_in\":"
                ),
                format!(",\"expires_at\":\"{expires_at}\"}}"),
            ),
            metadata: Template::new(
                format!("{{\"access_token\":\"{secret}\",\"expires_in\":"),
                ",\"token_type\":\"Bearer\"}".to_owned(),
            ),
            token,
        }
    }
}

/// Bytes whose memory is wiped when the last reference (the cache or a response in flight) goes.
fn zeroizing_bytes(bytes: Vec<u8>) -> Bytes {
    struct Wiped(Vec<u8>);
    impl AsRef<[u8]> for Wiped {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Wiped {
        fn drop(&mut self) {
            zeroize::Zeroize::zeroize(&mut self.0);
        }
    }
    Bytes::from_owner(Wiped(bytes))
}

impl TokenApi {
    /// `account_id` names the service account in the metadata account document (`default` when
    /// unknown, as with an OAuth token).
    pub fn new(cell: Arc<TokenCell>, settings: &HttpSettings, account_id: Option<&str>) -> Self {
        Self {
            cell,
            wait_for_token: settings.wait_for_token,
            allowed_hosts: settings.allowed_hosts.clone(),
            listen_ips: settings
                .listen
                .iter()
                .chain(&settings.authenticated_listen)
                .filter_map(|addr| match addr {
                    ListenAddr::Tcp(addr) => Some(addr.ip()),
                    ListenAddr::Unix(_) => None,
                })
                .collect(),
            account_id: account_id.unwrap_or("default").to_owned(),
            metrics: None,
            routes: Routes::All,
            client_secret: None,
            wall_clock: SystemTime::now,
            rendered: ArcSwapOption::empty(),
        }
    }

    /// Requires `Authorization: Bearer <secret>` on the token endpoints.
    pub fn with_client_secret(mut self, secret: Arc<ClientSecret>) -> Self {
        self.client_secret = Some(secret);
        self
    }

    /// Reads the wall clock from `clock` (tests inject jumps and suspends).
    pub fn with_wall_clock(mut self, clock: fn() -> SystemTime) -> Self {
        self.wall_clock = clock;
        self
    }

    /// Counts requests and serves `/metrics` from `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Restricts the endpoints served.
    pub fn with_routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    /// Handles one request. The body is never read.
    pub async fn handle<B: Body>(&self, req: Request<B>) -> HttpResponse {
        match self.respond(&req) {
            Ok(response) => response,
            Err(waiting) => self.respond_after_wait(waiting).await,
        }
    }

    /// Answers `req` at once, or, for a token request that arrives before the first token was
    /// obtained, says what to wait for ([`TokenApi::respond_after_wait`]). Every answer but the
    /// wait is synchronous: the hot path needs no future of its own.
    pub fn respond<B: Body>(&self, req: &Request<B>) -> Result<HttpResponse, Waiting> {
        let (label, response) = self.route(req)?;
        self.record(label, &response);
        Ok(response)
    }

    /// Waits up to `http.wait_for_token` for the first token, then answers.
    pub async fn respond_after_wait(&self, waiting: Waiting) -> HttpResponse {
        let served = self
            .cell
            .wait_servable(self.wait_for_token, self.wall_clock)
            .await
            .map(|(token, left)| self.token_response(waiting.format, &token, left));
        let response = self.token_answer(waiting.format, served);
        self.record(waiting.route.label(), &response);
        response
    }

    fn record(&self, route: &'static str, response: &HttpResponse) {
        if let Some(metrics) = &self.metrics {
            metrics.http_request(route, response.status().as_u16());
        }
    }

    /// The answer and its metrics label.
    fn route<B: Body>(&self, req: &Request<B>) -> Result<(&'static str, HttpResponse), Waiting> {
        let route = Route::of(req.uri().path());
        if let Some(refusal) = self.refuse(req, route) {
            return Ok(("refused", refusal));
        }
        if self.routes == Routes::Monitoring && !route.is_monitoring() {
            return Ok((
                Route::Unknown.label(),
                text(StatusCode::NOT_FOUND, "not found\n".into()),
            ));
        }
        if let Some(secret) = &self.client_secret
            && !route.is_monitoring()
            && route != Route::Unknown
            && !secret.verify(req.headers().get(header::AUTHORIZATION))
        {
            let mut response = text(
                StatusCode::UNAUTHORIZED,
                "this listener requires Authorization: Bearer <client secret>\n".into(),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"yc-iam-sidecar\""),
            );
            return Ok(("unauthorized", response));
        }
        Ok((route.label(), self.dispatch(route, req)?))
    }

    fn dispatch<B: Body>(&self, route: Route, req: &Request<B>) -> Result<HttpResponse, Waiting> {
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or("");
        Ok(match route {
            Route::Token => match token_format(query) {
                Ok(format) => self.token(route, format)?,
                Err(bad) => text(StatusCode::BAD_REQUEST, bad),
            },
            Route::Healthz => text(StatusCode::OK, "ok\n".into()),
            Route::Readyz => self.ready(),
            Route::Metrics => match &self.metrics {
                Some(metrics) => {
                    let mut response = text(StatusCode::OK, metrics.render(&self.cell));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    response
                }
                None => text(StatusCode::NOT_FOUND, "metrics are off\n".into()),
            },
            Route::MetadataToken if has_metadata_flavor(req) => {
                self.token(route, Format::Metadata)?
            }
            Route::MetadataOther if path == "/" => {
                flavored(text(StatusCode::OK, "computeMetadata/\n".into()))
            }
            Route::MetadataOther if has_metadata_flavor(req) => flavored(self.account(path, query)),
            Route::MetadataToken | Route::MetadataOther => flavored(text(
                StatusCode::FORBIDDEN,
                "missing header Metadata-Flavor: Google\n".into(),
            )),
            Route::Unknown => text(StatusCode::NOT_FOUND, "not found\n".into()),
        })
    }

    /// Refuses requests that did not come straight from a local process: proxied ones, browser
    /// ones, ones naming a foreign host (DNS rebinding), and anything but a bodiless GET or HEAD.
    fn refuse<B: Body>(&self, req: &Request<B>, route: Route) -> Option<HttpResponse> {
        let headers = req.headers();
        if headers.contains_key(&X_FORWARDED_FOR) || headers.contains_key(header::FORWARDED) {
            return Some(text(
                StatusCode::FORBIDDEN,
                "forwarded requests are refused: the token is only for local processes\n".into(),
            ));
        }
        if headers.contains_key(header::ORIGIN) {
            return Some(text(
                StatusCode::FORBIDDEN,
                "browser requests (with an Origin header) are refused\n".into(),
            ));
        }
        // RFC 9112 §3.2: more than one Host is a bad request (found by fuzzing: only the first
        // was checked).
        if headers.get_all(header::HOST).iter().nth(1).is_some() {
            return Some(text(
                StatusCode::BAD_REQUEST,
                "more than one Host header\n".into(),
            ));
        }
        // Health and metrics carry no secret: probes and scrapers reach them by pod or host IP.
        if let Some(host) = headers.get(header::HOST)
            && !route.is_monitoring()
            && !self.host_allowed(host)
        {
            return Some(text(
                StatusCode::FORBIDDEN,
                "the Host header names neither a loopback address, localhost, nor a configured \
                 http.allowed_hosts entry\n"
                    .into(),
            ));
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are served\n".into(),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Some(response);
        }
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body {
            let mut response = text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request bodies are not accepted\n".into(),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Some(response);
        }
        None
    }

    fn host_allowed(&self, host: &HeaderValue) -> bool {
        let Ok(host) = host.to_str() else {
            return false;
        };
        let name = strip_port(host);
        // What clients send nearly always, before any parsing.
        if name == "127.0.0.1" || name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        if let Ok(ip) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            && (is_loopback(ip) || self.listen_ips.contains(&ip))
        {
            return true;
        }
        self.allowed_hosts
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(name))
    }

    /// The token now; a wait if none was ever obtained and waiting is configured; else 503.
    fn token(&self, route: Route, format: Format) -> Result<HttpResponse, Waiting> {
        let now = tokio::time::Instant::now();
        let served = self
            .cell
            .with_servable(now, (self.wall_clock)(), |token, left| {
                self.token_response(format, token, left)
            });
        match served {
            None if !self.wait_for_token.is_zero() && self.cell.load().is_none() => {
                Err(Waiting { route, format })
            }
            served => Ok(self.token_answer(format, served)),
        }
    }

    /// The answer to a token request, served or not (503); the metadata protocol's carry its
    /// `Metadata-Flavor` header either way.
    fn token_answer(&self, format: Format, served: Option<HttpResponse>) -> HttpResponse {
        let response = served.unwrap_or_else(|| self.unavailable());
        match format {
            Format::Metadata => flavored(response),
            Format::Text | Format::Json => response,
        }
    }

    fn token_response(
        &self,
        format: Format,
        token: &Arc<IamToken>,
        left: Duration,
    ) -> HttpResponse {
        let cached = self.rendered.load();
        let fresh;
        let rendered = match cached.as_deref() {
            Some(rendered) if Arc::ptr_eq(&rendered.token, token) => rendered,
            _ => {
                fresh = self.render(token);
                &*fresh
            }
        };
        let (content_type, body) = match format {
            Format::Text => (&TEXT, rendered.plain.clone()),
            Format::Json => (&JSON, rendered.json.with_expires_in(left.as_secs())),
            Format::Metadata => (&JSON, rendered.metadata.with_expires_in(left.as_secs())),
        };
        let mut response = Response::new(Full::new(body));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, content_type.clone());
        headers.insert(header::CACHE_CONTROL, NO_STORE.clone());
        response
    }

    /// Renders the bodies for a token served for the first time, and caches them.
    fn render(&self, token: &Arc<IamToken>) -> Arc<Rendered> {
        let rendered = Arc::new(Rendered::new(Arc::clone(token)));
        self.rendered.store(Some(Arc::clone(&rendered)));
        rendered
    }

    fn unavailable(&self) -> HttpResponse {
        let reason = match &*self.cell.load() {
            None => "no IAM token yet: the first one is being fetched\n",
            Some(_) => "no valid IAM token: renewal is failing and the last token has expired\n",
        };
        let mut response = text(StatusCode::SERVICE_UNAVAILABLE, reason.into());
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }

    fn ready(&self) -> HttpResponse {
        let now = tokio::time::Instant::now();
        match self
            .cell
            .with_servable(now, (self.wall_clock)(), |_, left| left)
        {
            Some(left) => text(
                StatusCode::OK,
                format!("ready: token valid for {}s\n", left.as_secs()),
            ),
            None => {
                let mut response = text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no servable IAM token\n".into(),
                );
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                response
            }
        }
    }

    /// The service-account document google-auth reads (`?recursive=true`) and the email path.
    fn account(&self, path: &str, query: &str) -> HttpResponse {
        if path == METADATA_EMAIL_PATH {
            return text(StatusCode::OK, self.account_id.clone());
        }
        if !query.split('&').any(|pair| pair == "recursive=true") {
            return text(StatusCode::OK, "aliases\nemail\nscopes\ntoken\n".into());
        }
        let body = serde_json::json!({
            "aliases": ["default"],
            "email": self.account_id,
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, JSON.clone());
        response
    }
}

/// A token request that arrived before the first token: [`TokenApi::respond_after_wait`]
/// answers it.
#[derive(Debug)]
pub struct Waiting {
    route: Route,
    format: Format,
}

/// What a request asks for, decided once from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Token,
    MetadataToken,
    Healthz,
    Readyz,
    Metrics,
    /// `/` (google-auth's probe) and the service-account document and email.
    MetadataOther,
    Unknown,
}

impl Route {
    fn of(path: &str) -> Self {
        match path {
            "/token" => Route::Token,
            METADATA_TOKEN_PATH => Route::MetadataToken,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/metrics" => Route::Metrics,
            "/" | METADATA_ACCOUNT_PATH | METADATA_EMAIL_PATH => Route::MetadataOther,
            _ => Route::Unknown,
        }
    }

    /// The `route` label of the request metrics.
    fn label(self) -> &'static str {
        match self {
            Route::Token => "token",
            Route::MetadataToken => "metadata_token",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::MetadataOther => "metadata_other",
            Route::Unknown => "unknown",
        }
    }

    /// Health and metrics: no secret, reachable by probes and scrapers.
    fn is_monitoring(self) -> bool {
        matches!(self, Route::Healthz | Route::Readyz | Route::Metrics)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Json,
    Metadata,
}

fn token_format(query: &str) -> Result<Format, String> {
    let mut format = Format::Text;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("format", "json")) => format = Format::Json,
            Some(("format", "text")) => format = Format::Text,
            // The value is not echoed: a response never reflects request content (found by
            // fuzzing, which put the token there).
            Some(("format", _)) => {
                return Err("unknown format: use format=json or format=text\n".to_owned());
            }
            _ => {}
        }
    }
    Ok(format)
}

/// The metadata server's guard against requests forged through the application (SSRF): a
/// client must say `Metadata-Flavor: Google`.
fn has_metadata_flavor<B>(req: &Request<B>) -> bool {
    req.headers().get(&METADATA_FLAVOR) == Some(&GOOGLE)
}

fn flavored(mut response: HttpResponse) -> HttpResponse {
    response
        .headers_mut()
        .insert(METADATA_FLAVOR.clone(), GOOGLE.clone());
    response
}

fn text(status: StatusCode, body: String) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, TEXT.clone());
    headers.insert(header::CACHE_CONTROL, NO_STORE.clone());
    response
}

/// `host:port`, `[v6]:port` or a bare host → the host part.
fn strip_port(host: &str) -> &str {
    let is_port = |port: &str| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
    if host.starts_with('[') {
        // A malformed port leaves the whole value, which then matches nothing.
        return match host.find(']') {
            Some(end) if end + 1 == host.len() => host,
            Some(end) if host[end + 1..].strip_prefix(':').is_some_and(is_port) => &host[..=end],
            _ => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && is_port(port) => name,
        _ => host,
    }
}

/// A bound listener: TCP, or a Unix socket whose file is removed when the listener goes.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A listen address that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    pub addr: String,
    pub source: std::io::Error,
}

impl Listener {
    /// Binds `addr`. A Unix socket gets `mode` and `group`; a stale socket file left by a
    /// previous run is replaced, any other file in the way is an error.
    pub async fn bind(addr: &ListenAddr, mode: u32, group: Option<u32>) -> Result<Self, BindError> {
        let fail = |source| BindError {
            addr: addr.to_string(),
            source,
        };
        match addr {
            ListenAddr::Tcp(socket) => TcpListener::bind(socket)
                .await
                .map(Listener::Tcp)
                .map_err(fail),
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::{FileTypeExt, PermissionsExt};
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(fail(std::io::Error::new(
                            std::io::ErrorKind::AlreadyExists,
                            "a file that is not a socket is in the way",
                        )));
                    }
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(fail(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "another process is serving on this socket",
                        )));
                    }
                    std::fs::remove_file(path).map_err(fail)?;
                }
                let listener = UnixListener::bind(path).map_err(fail)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(fail)?;
                if group.is_some() {
                    std::os::unix::fs::chown(path, None, group).map_err(fail)?;
                }
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    pub fn local_addr(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connection handling limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time open requests get to finish after shutdown begins.
    pub grace: Duration,
    /// A connection must deliver a complete request head within this long of becoming idle
    /// (slowloris and idle keep-alive alike); hyper closes it otherwise.
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// Open connections per listener. A new connection beyond it closes the oldest idle one, so a
    /// flood of idle or trickling connections cannot lock out well-behaved clients.
    pub max_connections: usize,
}

impl Limits {
    pub fn from_settings(http: &HttpSettings) -> Self {
        Self {
            grace: http.shutdown_grace,
            header_read_timeout: http.header_read_timeout,
            max_header_bytes: http.max_header_bytes,
            max_connections: http.max_connections,
        }
    }
}

/// Serves each listener with its API until `shutdown` resolves, then stops accepting and gives
/// open connections up to `limits.grace` to finish their requests.
pub async fn serve(
    listeners: Vec<(Listener, Arc<TokenApi>)>,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    let (stop, stopped) = watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    for (listener, api) in listeners {
        loops.spawn(accept_loop(listener, api, stopped.clone(), limits));
    }
    shutdown.await;
    let _ = stop.send(true);
    while loops.join_next().await.is_some() {}
}

/// One open connection, as the accept loop tracks it.
struct Slot {
    id: u64,
    /// Requests being answered on it right now.
    in_flight: Arc<AtomicUsize>,
    evict: Arc<tokio::sync::Notify>,
}

/// Accepts connections until told to stop, then closes the listener and drains its connections.
async fn accept_loop(
    listener: Listener,
    api: Arc<TokenApi>,
    mut stop: watch::Receiver<bool>,
    limits: Limits,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    let mut connections = tokio::task::JoinSet::new();
    // Oldest first.
    let mut slots: std::collections::VecDeque<Slot> = std::collections::VecDeque::new();
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Ok(id) = done {
                    slots.retain(|slot| slot.id != id);
                }
                continue;
            }
            accepted = accept(&listener) => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                // Out of file descriptors and the like: do not spin.
                tracing::warn!(%error, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if slots.len() >= limits.max_connections {
            match slots
                .iter()
                .position(|slot| slot.in_flight.load(Ordering::Acquire) == 0)
            {
                Some(oldest_idle) => {
                    if let Some(slot) = slots.remove(oldest_idle) {
                        slot.evict.notify_one();
                    }
                }
                None => {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "every connection is busy; refusing a new one"
                    );
                    continue;
                }
            }
        }
        next_id += 1;
        let slot = Slot {
            id: next_id,
            in_flight: Arc::new(AtomicUsize::new(0)),
            evict: Arc::new(tokio::sync::Notify::new()),
        };
        let task = ConnectionTask {
            id: slot.id,
            in_flight: Arc::clone(&slot.in_flight),
            evict: Arc::clone(&slot.evict),
            stop: stop.clone(),
        };
        slots.push_back(slot);
        match stream {
            Stream::Tcp(stream) => {
                let _ = stream.set_nodelay(true);
                connections.spawn(connection(stream, &builder, &api, task));
            }
            Stream::Unix(stream) => {
                connections.spawn(connection(stream, &builder, &api, task));
            }
        }
    }
    // Closing the listener refuses new connections at once.
    drop(listener);
    let open = connections.len();
    let grace = limits.grace;
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!(
            connections = open,
            grace = %humantime::format_duration(grace),
            "HTTP connections still open after the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Stream> {
    match listener {
        Listener::Tcp(listener) => listener.accept().await.map(|(s, _)| Stream::Tcp(s)),
        Listener::Unix(listener, _) => listener.accept().await.map(|(s, _)| Stream::Unix(s)),
    }
}

/// What a connection task needs besides its socket.
struct ConnectionTask {
    id: u64,
    in_flight: Arc<AtomicUsize>,
    evict: Arc<tokio::sync::Notify>,
    stop: watch::Receiver<bool>,
}

/// Decrements the in-flight count when a request's future completes or is dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The future hyper awaits for one request: the answer already made (nearly always), or one
/// waiting for the first token.
enum Reply {
    Now(Option<HttpResponse>),
    Later(Pin<Box<dyn Future<Output = HttpResponse> + Send>>),
}

impl Future for Reply {
    type Output = Result<HttpResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Reply::Now(response) => Poll::Ready(Ok(response
                .take()
                .expect("Reply polled after it completed"))),
            Reply::Later(future) => future.as_mut().poll(cx).map(Ok),
        }
    }
}

/// Serves one connection. On shutdown it finishes the request in flight and closes; evicted
/// (idle, over the connection limit) it closes at once. Returns its id.
fn connection<I>(
    io: I,
    builder: &http1::Builder,
    api: &Arc<TokenApi>,
    task: ConnectionTask,
) -> impl Future<Output = u64> + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let api = Arc::clone(api);
    let in_flight = Arc::clone(&task.in_flight);
    let service = service_fn(move |req| match api.respond(&req) {
        Ok(response) => Reply::Now(Some(response)),
        Err(waiting) => {
            // Only a request waiting for the first token keeps its connection busy.
            let api = Arc::clone(&api);
            in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(Arc::clone(&in_flight));
            Reply::Later(Box::pin(async move {
                let response = api.respond_after_wait(waiting).await;
                drop(guard);
                response
            }))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let ConnectionTask {
        id,
        evict,
        mut stop,
        ..
    } = task;
    async move {
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = evict.notified() => Ok(()),
            _ = stop.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(error) = result {
            tracing::debug!(%error, "HTTP connection ended with an error");
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::Empty;

    async fn status(api: &TokenApi, path: &str) -> u16 {
        let request = Request::get(path)
            .header("host", "localhost")
            .header("metadata-flavor", "Google")
            .body(Empty::<Bytes>::new())
            .unwrap();
        api.handle(request).await.status().as_u16()
    }

    #[tokio::test(start_paused = true)]
    async fn serve_side_check_follows_both_clocks() {
        let cell = Arc::new(TokenCell::new());
        let wall = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let (token, _) = IamToken::accept(
            "t1.clock".into(),
            Some(wall + hour),
            tokio::time::Instant::now(),
            wall,
            Duration::from_secs(300),
        )
        .unwrap();
        cell.store(Arc::new(token));
        let settings = HttpSettings {
            wait_for_token: Duration::ZERO,
            ..HttpSettings::default()
        };
        let api = |clock: fn() -> SystemTime| {
            TokenApi::new(Arc::clone(&cell), &settings, None).with_wall_clock(clock)
        };
        let paths = ["/token", "/readyz", METADATA_TOKEN_PATH];

        let normal = api(SystemTime::now);
        for path in paths {
            assert_eq!(status(&normal, path).await, 200, "{path}");
        }
        // Suspended for two hours (or the clock jumped forward): the wall clock says expired
        // while the monotonic clock stood still.
        let resumed = api(|| SystemTime::now() + Duration::from_secs(7200));
        for path in paths {
            assert_eq!(status(&resumed, path).await, 503, "{path} after a suspend");
        }
        // Inside the safety margin on the wall clock only.
        let late = api(|| SystemTime::now() + Duration::from_secs(3600 - 299));
        assert_eq!(status(&late, "/token").await, 503);

        // The wall clock set back a day cannot extend the token: the monotonic clock ends it.
        let set_back = api(|| SystemTime::now() - Duration::from_secs(86_400));
        assert_eq!(status(&set_back, "/token").await, 200);
        tokio::time::advance(hour - Duration::from_secs(299)).await;
        for path in paths {
            assert_eq!(
                status(&set_back, path).await,
                503,
                "{path} with the clock set back"
            );
        }
    }

    #[test]
    fn host_port_is_stripped() {
        assert_eq!(strip_port("localhost:4268"), "localhost");
        assert_eq!(strip_port("127.0.0.1"), "127.0.0.1");
        assert_eq!(strip_port("[::1]:4268"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("evil.example:80"), "evil.example");
        // Found by fuzzing: a malformed port must not pass as loopback.
        assert_eq!(strip_port("[::1]:42A68"), "[::1]:42A68");
        assert_eq!(strip_port("localhost:42A68"), "localhost:42A68");
        assert_eq!(strip_port("[::1]x"), "[::1]x");
    }

    #[test]
    fn token_format_query() {
        assert_eq!(token_format(""), Ok(Format::Text));
        assert_eq!(token_format("format=json"), Ok(Format::Json));
        assert_eq!(token_format("x=1&format=text"), Ok(Format::Text));
        assert!(token_format("format=xml").is_err());
    }
}
