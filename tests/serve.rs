//! The real binary against a fake IAM on loopback: first token, renewal, outages, permanent
//! errors, the metadata protocol, refused requests, shutdown.
// These tests drive a real process over real sockets on the real clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use support::{FakeIam, Sidecar, config, get, raw, request};
use tonic::Code;
use yc_iam_sidecar::emulator::Step;

const FAST_REFRESH: &str =
    "min_interval = \"200ms\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"400ms\"";

fn started(lifetime: Duration, refresh: &str) -> (FakeIam, Sidecar) {
    let iam = FakeIam::start(lifetime);
    let sidecar = Sidecar::start(&config(&iam, refresh, ""), "info");
    (iam, sidecar)
}

#[test]
fn first_token_is_served_in_every_shape() {
    let (iam, sidecar) = started(Duration::from_secs(3600), "");

    let plain = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    assert_eq!(plain.status, 200, "{plain:?}");
    assert_eq!(iam.issued_tokens(), vec![plain.body.clone()]);
    assert!(plain.body.starts_with("t1."));
    assert_eq!(
        plain.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(plain.header("cache-control"), Some("no-store"));

    // The fake IAM saw a JWT that verified against the fixture's public key, with its kid.
    let calls = iam.emulator.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].key_id.as_deref(), Some(support::KEY_ID));
    assert_eq!(calls[0].code, Code::Ok);

    let json = sidecar.get("/token?format=json");
    assert_eq!(json.status, 200);
    assert_eq!(json.header("content-type"), Some("application/json"));
    assert_eq!(json.header("cache-control"), Some("no-store"));
    let body = json.json();
    assert_eq!(body["access_token"], plain.body.as_str());
    assert_eq!(body["token_type"], "Bearer");
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let expires_at = humantime::parse_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    let (_, issued_expiry) = iam.emulator.issued()[0];
    let skew = issued_expiry
        .duration_since(expires_at)
        .unwrap_or_else(|e| e.duration());
    assert!(skew < Duration::from_secs(2), "expires_at off by {skew:?}");

    let metadata = get(
        sidecar.addr,
        yc_iam_sidecar::server::METADATA_TOKEN_PATH,
        &[("Metadata-Flavor", "Google")],
    );
    assert_eq!(metadata.status, 200);
    assert_eq!(metadata.header("content-type"), Some("application/json"));
    assert_eq!(metadata.header("metadata-flavor"), Some("Google"));
    let body = metadata.json();
    assert_eq!(body["access_token"], plain.body.as_str());
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].as_u64().unwrap() > 3500);

    let refused = get(
        sidecar.addr,
        yc_iam_sidecar::server::METADATA_TOKEN_PATH,
        &[],
    );
    assert_eq!(refused.status, 403);
    assert!(!refused.body.contains("t1."));

    assert_eq!(sidecar.get("/readyz").status, 200);
    assert_eq!(sidecar.get("/healthz").status, 200);

    // google-auth's ping and account document.
    let root = get(sidecar.addr, "/", &[]);
    assert_eq!(root.header("metadata-flavor"), Some("Google"));
    let account = get(
        sidecar.addr,
        "/computeMetadata/v1/instance/service-accounts/default/?recursive=true",
        &[("Metadata-Flavor", "Google")],
    );
    assert_eq!(account.json()["email"], support::SERVICE_ACCOUNT);

    // expires_in is computed per response.
    std::thread::sleep(Duration::from_millis(2100));
    let later = sidecar.get("/token?format=json").json()["expires_in"]
        .as_u64()
        .unwrap();
    assert!(later + 2 <= expires_in, "{later} vs {expires_in}");
}

#[test]
fn token_is_renewed_before_it_expires_and_never_served_expired() {
    let lifetime = Duration::from_secs(3);
    let (iam, sidecar) = started(lifetime, FAST_REFRESH);
    sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);

    let mut seen = HashSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        let response = sidecar.get("/token");
        assert_eq!(
            response.status, 200,
            "a valid token exists all along: {response:?}"
        );
        let issued = iam.emulator.issued();
        let (_, expires_at) = issued
            .iter()
            .find(|(t, _)| *t == response.body)
            .expect("served token was issued by IAM");
        assert!(*expires_at > SystemTime::now(), "served an expired token");
        seen.insert(response.body);
        std::thread::sleep(Duration::from_millis(25));
    }
    // 3 s tokens renewed at about half-life over 7 s: several rotations, not a storm.
    assert!(seen.len() >= 3, "only {} distinct tokens", seen.len());
    let calls = iam.emulator.calls().len();
    assert!(calls <= 8, "{calls} IAM calls in 7 s");
}

#[test]
fn outage_keeps_the_old_token_then_503_then_recovers() {
    let lifetime = Duration::from_secs(4);
    let (iam, sidecar) = started(lifetime, FAST_REFRESH);
    let first = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    assert_eq!(first.status, 200);
    iam.emulator.push(std::iter::repeat_n(
        Step::Fail(Code::Unavailable, "IAM is down".into()),
        100_000,
    ));

    // Until the margin (a tenth of 4 s) the first token keeps being served.
    let (_, expires_at) = iam.emulator.issued()[0];
    let margin = Duration::from_millis(400);
    let mut served_old = 0;
    let mut got_503 = None;
    while SystemTime::now() < expires_at + Duration::from_secs(1) {
        let response = sidecar.get("/token");
        let now = SystemTime::now();
        match response.status {
            200 => {
                assert_eq!(response.body, first.body);
                assert!(now < expires_at, "expired token served");
                served_old += 1;
            }
            503 => {
                assert!(
                    now + Duration::from_millis(200) >= expires_at - margin,
                    "503 too early"
                );
                assert_eq!(response.header("retry-after"), Some("1"));
                assert!(!response.body.contains("t1."));
                got_503 = Some(response);
            }
            other => panic!("unexpected status {other}: {response:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served_old > 10, "old token served during the outage");
    let unavailable = got_503.expect("503 once the token reached its margin");
    assert!(
        unavailable.body.contains("expired"),
        "{:?}",
        unavailable.body
    );
    assert_eq!(sidecar.get("/readyz").status, 503);

    // IAM comes back: a fresh token within the backoff ceiling.
    iam.emulator.clear_script();
    let recovered = sidecar.wait_for("/token", Duration::from_secs(5), |r| r.status == 200);
    assert_eq!(recovered.status, 200);
    assert_ne!(recovered.body, first.body);
    assert_eq!(sidecar.get("/readyz").status, 200);

    let warned = sidecar
        .logs()
        .iter()
        .filter(|l| l.contains("IAM token refresh failed") && l.contains("IAM is down"))
        .count();
    assert!(warned >= 2, "transient failures are logged");
}

#[test]
fn permanent_errors_are_not_hammered_and_reported_once() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    iam.emulator.push(std::iter::repeat_n(
        Step::Fail(Code::Unauthenticated, "Key 'x' was not found".into()),
        100_000,
    ));
    let sidecar = Sidecar::start(
        &config(
            &iam,
            "backoff_initial = \"50ms\"\nbackoff_max = \"1s\"",
            "wait_for_token = \"100ms\"",
        ),
        "info",
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let response = sidecar.get("/token");
        assert_eq!(response.status, 503);
        assert_eq!(response.header("retry-after"), Some("1"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Permanent errors wait backoff_max (jittered to at least half of it) between attempts,
    // where transient ones would start at 50 ms.
    let calls = iam.emulator.calls().len();
    assert!((2..=9).contains(&calls), "{calls} calls in 4 s");
    let errors: Vec<_> = sidecar
        .logs()
        .into_iter()
        .filter(|l| l.contains("\"level\":\"ERROR\""))
        .collect();
    assert_eq!(errors.len(), 1, "one error per streak: {errors:#?}");
    assert!(errors[0].contains("Unauthenticated") && errors[0].contains("x-request-id"));
}

#[test]
fn forged_and_foreign_requests_are_refused() {
    let (_iam, sidecar) = started(Duration::from_secs(3600), "");
    let token = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    let addr = sidecar.addr;
    let refused = [
        ("GET", "/token", vec![("Host", "evil.example")], 403),
        ("GET", "/token", vec![("Host", "evil.example:4268")], 403),
        ("GET", "/token", vec![("Host", "10.0.0.1")], 403),
        ("GET", "/token", vec![("Host", "[::1]:42A68")], 403),
        (
            "GET",
            "/token",
            vec![("Host", "localhost"), ("Host", "evil.example")],
            400,
        ),
        (
            "GET",
            "/token",
            vec![("X-Forwarded-For", "203.0.113.9")],
            403,
        ),
        ("GET", "/token", vec![("Forwarded", "for=203.0.113.9")], 403),
        (
            "GET",
            "/token",
            vec![("Origin", "https://evil.example")],
            403,
        ),
        ("POST", "/token", vec![], 405),
        ("PUT", "/token", vec![], 405),
        ("DELETE", "/token", vec![], 405),
        ("OPTIONS", "/token", vec![], 405),
        ("GET", "/token?format=xml", vec![], 400),
        ("GET", "/nope", vec![], 404),
        ("GET", "/token/../token", vec![], 404),
        ("GET", "/token", vec![("Content-Length", "5")], 413),
    ];
    for (method, path, headers, status) in refused {
        let response = request(addr, method, path, &headers);
        assert_eq!(
            response.status, status,
            "{method} {path} {headers:?}: {response:?}"
        );
        assert!(
            !response.body.contains(&token.body),
            "{method} {path} {headers:?} leaked the token"
        );
        assert!(response.header("access-control-allow-origin").is_none());
    }
    let allowed_hosts = [
        "localhost",
        "localhost:4268",
        "127.0.0.1:4268",
        "[::1]:4268",
        "LOCALHOST",
    ];
    for host in allowed_hosts {
        let response = get(addr, "/token", &[("Host", host)]);
        assert_eq!(response.status, 200, "Host {host}");
    }
    let post = request(addr, "POST", "/token", &[]);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    // HEAD gets the headers and no body.
    let head = request(addr, "HEAD", "/token", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");

    // Garbage instead of HTTP gets a 400 from the parser, not a crash.
    let garbage = raw(
        addr,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    );
    assert_eq!(garbage.status, 400);
    assert_eq!(sidecar.get("/healthz").status, 200);
}

#[test]
fn request_before_the_first_token_waits_briefly_then_gets_503() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    iam.emulator.push([Step::Stall(Duration::from_secs(3))]);
    let sidecar = Sidecar::start(&config(&iam, "", "wait_for_token = \"300ms\""), "info");
    let started = Instant::now();
    let response = sidecar.get("/token");
    let waited = started.elapsed();
    assert_eq!(response.status, 503, "{response:?}");
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(response.body.contains("first"), "{:?}", response.body);
    assert!(
        waited >= Duration::from_millis(250),
        "answered after {waited:?}"
    );
    assert_eq!(sidecar.get("/readyz").status, 503);
    // The stalled call completes: the token is served from then on.
    let ready = sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    assert_eq!(ready.status, 200);
    assert_eq!(sidecar.get("/token").body, iam.issued_tokens()[0]);
}

#[test]
fn a_request_waiting_for_the_first_token_gets_it_when_it_arrives() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    iam.emulator.push([Step::Stall(Duration::from_millis(500))]);
    let sidecar = Sidecar::start(&config(&iam, "", "wait_for_token = \"5s\""), "info");
    let response = sidecar.get("/token");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body, iam.issued_tokens()[0]);
}

#[test]
fn same_token_from_iam_again_is_normal() {
    let iam = FakeIam::start(Duration::from_secs(4));
    iam.emulator.push([
        Step::Issue(Duration::from_secs(4)),
        Step::Repeat,
        Step::Repeat,
    ]);
    let sidecar = Sidecar::start(&config(&iam, FAST_REFRESH, ""), "info");
    let first = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    // Wait until the two repeats were consumed and a new token arrived.
    let started = Instant::now();
    while iam.emulator.calls().len() < 4 && started.elapsed() < Duration::from_secs(10) {
        assert_eq!(sidecar.get("/token").status, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(iam.emulator.calls().len() >= 4);
    let repeated = sidecar
        .logs()
        .iter()
        .filter(|l| l.contains("IAM token renewed") && l.contains("\"same_token\":true"))
        .count();
    assert_eq!(repeated, 2);
    let now = sidecar.wait_for("/token", Duration::from_secs(5), |r| r.body != first.body);
    assert_eq!(now.status, 200);
}

#[test]
fn one_thread_runtime_serves_renews_and_stops() {
    let iam = FakeIam::start(Duration::from_secs(3));
    let sidecar = Sidecar::start_with(
        &config(&iam, FAST_REFRESH, ""),
        "info",
        &[("YC_IAM_SIDECAR_WORKER_THREADS", "0")],
    );
    sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.pid())).unwrap();
    let threads = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    assert_eq!(threads.split_whitespace().nth(1), Some("1"), "{threads}");

    let mut seen = HashSet::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let response = sidecar.get("/token");
        assert_eq!(response.status, 200, "{response:?}");
        seen.insert(response.body);
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(
        seen.len() >= 2,
        "renewed on one thread: {} tokens",
        seen.len()
    );
    sidecar.signal("TERM");
    let (code, logs) = sidecar.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0), "{logs:#?}");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    use std::io::{Read, Write};
    let iam = FakeIam::start(Duration::from_secs(3600));
    // A grace period and header-read timeout far longer than the test waits: connections must
    // close because they are told to, not because a timer ran out.
    let sidecar = Sidecar::start(
        &config(
            &iam,
            "",
            "shutdown_grace = \"60s\"\nheader_read_timeout = \"60s\"",
        ),
        "info",
    );
    sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    // An idle keep-alive connection (one request answered, then quiet) must not hold shutdown up:
    // the server closes it.
    let mut idle = std::net::TcpStream::connect(sidecar.addr).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 512];
    let n = idle.read(&mut answer).unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
    let never_used = std::net::TcpStream::connect(sidecar.addr).unwrap();
    sidecar.signal("TERM");
    idle.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(idle.read(&mut answer).unwrap(), 0, "closed by the server");
    let (code, logs) = sidecar.wait(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{logs:#?}");
    assert!(logs.iter().any(|l| l.contains("SIGTERM received")));
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("still open after the shutdown grace")),
        "{logs:#?}"
    );
    drop(never_used);
}

#[test]
fn sigint_exits_zero_too() {
    let (_iam, sidecar) = started(Duration::from_secs(3600), "");
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let addr = sidecar.addr;
    sidecar.signal("INT");
    let (code, _) = sidecar.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "listener closed"
    );
}
