//! Micro-benchmark of the request hot path and of JWT signing (issue 5).
//!
//! `harness = false` and no criterion, to keep CI's `clippy --all-targets` cheap. CI compiles this
//! but never runs it. Run it with:
//!
//! ```text
//! cargo bench --bench hot_path            # all rows
//! BENCH_ITERS=200000 BENCH_SIGN_ITERS=200 cargo bench --bench hot_path
//! ```
//!
//! Each row runs a warm-up of a tenth of its iterations, then times a fixed number of
//! iterations and prints ns/op. The `ref:` rows time pieces of `TokenApi::token` in isolation
//! (and the precomputed-body alternative), to size what caching per token would save.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{Empty, Full};
use tokio::time::Instant;

use yc_iam_sidecar::cell::TokenCell;
use yc_iam_sidecar::config::HttpSettings;
use yc_iam_sidecar::credentials::ServiceAccountKey;
use yc_iam_sidecar::server::{METADATA_TOKEN_PATH, TokenApi};
use yc_iam_sidecar::token::IamToken;

/// A token shaped like the dev emulator's: `t1.<label>.<43 chars>`, 78 bytes.
const TOKEN: &str =
    "t1.FAKE-NOT-VALID-FOR-YANDEX-CLOUD.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ";

struct Row {
    name: &'static str,
    iterations: u64,
    ns_per_op: f64,
}

fn iterations(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Times `iters` calls of `op` after `iters / 10` warm-up calls.
fn time_sync(name: &'static str, iters: u64, mut op: impl FnMut()) -> Row {
    for _ in 0..(iters / 10).max(1) {
        op();
    }
    let start = Instant::now();
    for _ in 0..iters {
        op();
    }
    let elapsed = start.elapsed();
    Row {
        name,
        iterations: iters,
        ns_per_op: elapsed.as_nanos() as f64 / iters as f64,
    }
}

/// Times `iters` requests through `TokenApi::handle`, all inside one `block_on` so the runtime's
/// entry cost is not counted per request. The request is built anew each iteration, as hyper
/// would hand over a fresh one.
fn time_handle(
    rt: &tokio::runtime::Runtime,
    api: &TokenApi,
    name: &'static str,
    iters: u64,
    uri: &'static str,
    metadata: bool,
) -> Row {
    let request = || {
        let mut builder = Request::builder()
            .uri(uri)
            .header(header::HOST, "127.0.0.1:4268");
        if metadata {
            builder = builder.header("metadata-flavor", "Google");
        }
        builder.body(Empty::<Bytes>::new()).expect("valid request")
    };
    // One check outside the timing: the row must measure a 200, not a refusal.
    let status = rt.block_on(api.handle(request())).status();
    assert_eq!(
        status,
        http::StatusCode::OK,
        "{name}: {uri} answered {status}"
    );
    rt.block_on(async {
        for _ in 0..(iters / 10).max(1) {
            black_box(api.handle(black_box(request())).await);
        }
        let start = Instant::now();
        for _ in 0..iters {
            black_box(api.handle(black_box(request())).await);
        }
        let elapsed = start.elapsed();
        Row {
            name,
            iterations: iters,
            ns_per_op: elapsed.as_nanos() as f64 / iters as f64,
        }
    })
}

fn main() {
    let n = iterations("BENCH_ITERS", 1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let cell = Arc::new(TokenCell::new());
    let (token, _capped) = IamToken::accept(
        TOKEN.to_owned(),
        Some(SystemTime::now() + Duration::from_secs(3600)),
        Instant::now(),
        SystemTime::now(),
        Duration::from_secs(300),
    )
    .expect("the bench token is valid");
    let token = Arc::new(token);
    cell.store(Arc::clone(&token));
    let api = TokenApi::new(Arc::clone(&cell), &HttpSettings::default(), None);

    let mut rows = vec![
        time_handle(&rt, &api, "handle GET /token", n, "/token", false),
        time_handle(
            &rt,
            &api,
            "handle GET /token?format=json",
            n,
            "/token?format=json",
            false,
        ),
        time_handle(
            &rt,
            &api,
            "handle GET metadata token path",
            n,
            METADATA_TOKEN_PATH,
            true,
        ),
    ];

    // Pieces of the per-request work, timed alone.
    rows.push(time_sync("ref: build request only", n, || {
        black_box(
            Request::builder()
                .uri(black_box("/token"))
                .header(header::HOST, "127.0.0.1:4268")
                .body(Empty::<Bytes>::new())
                .expect("valid request"),
        );
    }));
    // What `refuse` does before any route: five header lookups (two by &str name, which hashes
    // a parsed name each time) and the Host check's IP parse. Replicated, as it is private.
    let probe = Request::builder()
        .uri("/token")
        .header(header::HOST, "127.0.0.1:4268")
        .body(Empty::<Bytes>::new())
        .expect("valid request");
    rows.push(time_sync("ref: refuse()-style header checks", n, || {
        let headers = black_box(&probe).headers();
        let forwarded =
            headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED);
        let origin = headers.contains_key(header::ORIGIN);
        let host_ok = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.rsplit_once(':'))
            .and_then(|(name, _)| name.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.is_loopback());
        let body = headers.contains_key(header::TRANSFER_ENCODING)
            || headers.contains_key(header::CONTENT_LENGTH);
        black_box((forwarded, origin, host_ok, body));
    }));
    rows.push(time_sync("ref: cell.servable()", n, || {
        black_box(cell.servable());
    }));
    rows.push(time_sync("ref: Bytes::copy_from_slice(token)", n, || {
        black_box(Bytes::copy_from_slice(
            black_box(token.expose_secret()).as_bytes(),
        ));
    }));
    rows.push(time_sync("ref: format! metadata JSON", n, || {
        black_box(format!(
            "{{\"access_token\":\"{}\",\"expires_in\":{},\"token_type\":\"Bearer\"}}",
            black_box(token.expose_secret()),
            black_box(3599u64),
        ));
    }));
    rows.push(time_sync("ref: format! /token?format=json", n, || {
        black_box(format!(
            "{{\"access_token\":\"{}\",\"token_type\":\"Bearer\",\"expires_in\":{},\"expires_at\":\"{}\"}}",
            black_box(token.expose_secret()),
            black_box(3599u64),
            humantime::format_rfc3339_seconds(black_box(token.expires_at())),
        ));
    }));
    // The alternative: bodies rendered once per token, shared by refcount. For the JSON forms
    // only the expires_in digits change per second; splicing them costs one small copy.
    let text_body = Bytes::copy_from_slice(token.expose_secret().as_bytes());
    rows.push(time_sync("ref: response from cached Bytes", n, || {
        let mut response = Response::new(Full::new(black_box(&text_body).clone()));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            http::HeaderValue::from_static("no-store"),
        );
        black_box(response);
    }));
    let head = format!(
        "{{\"access_token\":\"{}\",\"expires_in\":",
        token.expose_secret()
    );
    rows.push(time_sync("ref: splice cached JSON prefix", n, || {
        let mut body = Vec::with_capacity(head.len() + 40);
        body.extend_from_slice(black_box(head.as_bytes()));
        let mut digits = [0u8; 20];
        let mut v = black_box(3599u64);
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        body.extend_from_slice(&digits[i..]);
        body.extend_from_slice(b",\"token_type\":\"Bearer\"}");
        black_box(Bytes::from(body));
    }));

    let key_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sa-key-rsa2048.json");
    let key = ServiceAccountKey::from_file(&key_path).expect("fixture key loads");
    let sign_iters = iterations("BENCH_SIGN_ITERS", 1_000);
    rows.push(time_sync(
        "ServiceAccountKey::sign_jwt (RSA-2048)",
        sign_iters,
        || {
            black_box(key.sign_jwt(black_box(SystemTime::now())).expect("signs"));
        },
    ));

    println!("{:<42} {:>12} {:>12}", "name", "iterations", "ns/op");
    for row in &rows {
        println!(
            "{:<42} {:>12} {:>12.1}",
            row.name, row.iterations, row.ns_per_op
        );
    }
    println!("\n(2-core machine shared with other work: expect several % of noise between runs)");
}
