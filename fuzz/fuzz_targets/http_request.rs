//! Arbitrary bytes as an HTTP/1.1 request stream, served by the real `TokenApi` behind hyper's
//! HTTP/1 connection handler configured as `server::serve` configures it.
//!
//! Replay one input with its exchange printed:
//!   FUZZ_HTTP_TRACE=1 cargo fuzz run -s none --codegen-units 16 http_request INPUT
//!
//! Invariants:
//! - nothing panics, and the connection finishes once the client has sent everything;
//! - per request that reaches the handler (checked on the request as hyper parsed it): the
//!   secret comes back only for a bodiless GET/HEAD of `/token`, or of the metadata token path
//!   with `Metadata-Flavor: Google`, with no Origin / X-Forwarded-For / Forwarded header and a
//!   loopback or `localhost` (first) Host, if any;
//! - on the wire: the secret appears no more often than the handler handed it out, and a stream
//!   holding a single request head with an `Origin:` or `X-Forwarded-For:` line never yields it.
#![no_main]

use std::cell::Cell;
use std::convert::Infallible;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request};
use hyper_util::rt::{TokioIo, TokioTimer};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yc_iam_sidecar::cell::TokenCell;
use yc_iam_sidecar::config::HttpSettings;
use yc_iam_sidecar::server::{METADATA_TOKEN_PATH, TokenApi};
use yc_iam_sidecar::token::IamToken;

const SECRET: &str = "t1.FUZZSECRET";

/// Host checks stricter than the product's current rule, off until the product adopts them (each
/// is a known, low-severity finding: neither can be produced by a browser, so DNS rebinding is
/// not helped):
/// - every `Host` line is judged, not only the first: the product serves `Host: localhost` +
///   `Host: evil.example` (RFC 9112 §3.2: more than one Host line must get 400);
/// - after `[v6]` only `:digits` may follow: the product serves `Host: [::1]:42A68` and
///   `Host: [::1]evil`, while it refuses `127.0.0.1:42A68`.
const STRICT_HOST: bool = true;

struct Fixture {
    api: Arc<TokenApi>,
    settings: HttpSettings,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cell = Arc::new(TokenCell::new());
        let now = SystemTime::now();
        // 12 hours (IAM's maximum), so a long fuzzing session keeps a servable token.
        let (token, _) = IamToken::accept(
            SECRET.into(),
            Some(now + Duration::from_secs(12 * 3600)),
            tokio::time::Instant::now(),
            now,
            Duration::from_secs(300),
        )
        .expect("the fuzz token is valid");
        cell.store(Arc::new(token));
        let settings = HttpSettings {
            wait_for_token: Duration::ZERO,
            ..Default::default()
        };
        let api = Arc::new(TokenApi::new(cell, &settings, None));
        Fixture { api, settings }
    })
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()
        .expect("tokio runtime");
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let yielded = Rc::new(Cell::new(0usize));
    let output = RUNTIME.with(|rt| rt.block_on(exchange(fixture, data, Rc::clone(&yielded))));
    let Some(output) = output else {
        panic!(
            "the connection did not finish within 1 s of the client closing its write half \
             (input {} bytes)",
            data.len()
        );
    };

    if trace() {
        eprintln!(
            "--- handler yielded the token {} time(s); on the wire:\n{}",
            yielded.get(),
            String::from_utf8_lossy(&output)
        );
    }
    let on_wire = count(&output, SECRET.as_bytes());
    assert!(
        on_wire <= yielded.get(),
        "the secret appears {on_wire} times on the wire but the handler yielded it {} times",
        yielded.get()
    );
    if on_wire > 0 {
        assert!(
            count(data, b"/token") > 0,
            "the secret was served for a stream without any /token path"
        );
        if let Some(head) = single_head(data) {
            let head = head.to_ascii_lowercase();
            assert!(
                count(&head, b"\norigin:") == 0 && count(&head, b"\nx-forwarded-for:") == 0,
                "the secret was served for a lone request with Origin / X-Forwarded-For"
            );
        }
    }
});

/// `FUZZ_HTTP_TRACE=1` prints each exchange (for replaying one input by hand).
fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("FUZZ_HTTP_TRACE").is_some())
}

/// Writes `data` as the client, closes the write half and reads everything the server says.
/// `None` when that does not finish within a second.
async fn exchange(fixture: &Fixture, data: &[u8], yielded: Rc<Cell<usize>>) -> Option<Vec<u8>> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let api = Arc::clone(&fixture.api);
    let service = service_fn(move |req: Request<Incoming>| {
        let api = Arc::clone(&api);
        let yielded = Rc::clone(&yielded);
        async move {
            let view = RequestView::of(&req);
            let (parts, body) = api.handle(req).await.into_parts();
            let body: Bytes = body
                .collect()
                .await
                .unwrap_or_else(|e: Infallible| match e {})
                .to_bytes();
            if count(&body, SECRET.as_bytes()) > 0 {
                view.assert_may_have_token(parts.status);
                yielded.set(yielded.get() + 1);
            }
            // Headers kept as they were (`Connection: close` decides what hyper does next).
            Ok::<_, Infallible>(hyper::Response::from_parts(
                parts,
                http_body_util::Full::new(body),
            ))
        }
    });
    // As server::serve builds it, plus half_close: the client closes its write half right after
    // the input, and without half_close hyper drops a request still being answered when it reads
    // that EOF, so the last (often the only) response would never be checked.
    let mut builder = http1::Builder::new();
    builder
        .half_close(true)
        .timer(TokioTimer::new())
        .header_read_timeout(fixture.settings.header_read_timeout)
        .max_buf_size(fixture.settings.max_header_bytes);
    let conn = builder.serve_connection(TokioIo::new(server), service);

    let (mut read, mut write) = tokio::io::split(client);
    let client = async move {
        let send = async {
            let _ = write.write_all(data).await;
            let _ = write.shutdown().await;
        };
        let mut output = Vec::new();
        let receive = read.read_to_end(&mut output);
        let ((), _) = tokio::join!(send, receive);
        output
    };
    let serve = async {
        let _ = conn.await;
    };
    tokio::time::timeout(Duration::from_secs(1), async {
        let ((), output) = tokio::join!(serve, client);
        output
    })
    .await
    .ok()
}

/// What the handler saw, kept to judge whether handing out the token was right.
struct RequestView {
    method: Method,
    path: String,
    header_lines: String,
    forwarded: bool,
    origin: bool,
    body_framing: bool,
    hosts_ok: bool,
    flavor_google: bool,
}

impl RequestView {
    fn of<B>(req: &Request<B>) -> Self {
        let headers = req.headers();
        let mut header_lines = String::new();
        for (name, value) in headers {
            header_lines.push_str(&format!("{name}: {value:?}; "));
        }
        RequestView {
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            header_lines,
            forwarded: headers.contains_key("x-forwarded-for") || headers.contains_key("forwarded"),
            origin: headers.contains_key("origin"),
            body_framing: headers.contains_key("transfer-encoding")
                || headers
                    .get_all("content-length")
                    .iter()
                    .any(|v| v.as_bytes() != b"0"),
            hosts_ok: if STRICT_HOST {
                headers
                    .get_all("host")
                    .iter()
                    .all(|v| host_is_local(v.as_bytes()))
            } else {
                headers
                    .get("host")
                    .is_none_or(|v| host_is_local(v.as_bytes()))
            },
            flavor_google: headers
                .get("metadata-flavor")
                .is_some_and(|v| v.as_bytes() == b"Google"),
        }
    }

    fn assert_may_have_token(&self, status: hyper::StatusCode) {
        let what = format!(
            "{status} with the token for {} {} [{}]",
            self.method, self.path, self.header_lines
        );
        assert!(
            self.method == Method::GET || self.method == Method::HEAD,
            "method: {what}"
        );
        assert!(
            self.path == "/token" || (self.path == METADATA_TOKEN_PATH && self.flavor_google),
            "path / Metadata-Flavor: {what}"
        );
        assert!(!self.forwarded, "forwarded request: {what}");
        assert!(!self.origin, "browser request: {what}");
        assert!(!self.body_framing, "request with a body: {what}");
        assert!(self.hosts_ok, "foreign Host: {what}");
        assert!(status.is_success(), "non-2xx: {what}");
    }
}

/// `localhost` or a loopback IP, with or without a port (an independent re-statement of the
/// rule, deliberately not calling the product's helper).
fn host_is_local(value: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(value) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((inner, tail))
                if !STRICT_HOST || tail.is_empty() || is_port(tail.strip_prefix(':')) =>
            {
                inner
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') && is_port(Some(port)) => name,
            _ => host,
        }
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

fn is_port(text: Option<&str>) -> bool {
    text.is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    if needle.is_empty() || haystack.len() < needle.len() {
        return 0;
    }
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// The request head when the stream holds exactly one head terminator (an empty line), so at
/// most one request can have been answered; `None` otherwise.
fn single_head(data: &[u8]) -> Option<&[u8]> {
    let ends: Vec<usize> = (1..data.len())
        .filter(|&i| {
            data[i - 1] == b'\n'
                && (data[i] == b'\n' || (data[i] == b'\r' && data.get(i + 1) == Some(&b'\n')))
        })
        .collect();
    match ends.as_slice() {
        [end] => Some(&data[..*end]),
        _ => None,
    }
}
