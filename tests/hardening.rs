//! Faults and abuse: hostile IAM answers, TLS failures, client authentication, connection floods,
//! slowloris, oversized requests, core dumps and exposed key files. Each test would fail if the
//! protection were removed.

// These tests drive a real process over real sockets on the real clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime};

use support::{FakeIam, Sidecar, assert_no_secrets, config, fixture, get, raw};
use tonic::Code;
use yc_iam_sidecar::emulator::Step;
use yc_iam_sidecar::iam::system_time_to_timestamp;

const FAST: &str = "min_interval = \"100ms\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"";

fn answer(token: &str, expires_at: Option<SystemTime>) -> Step {
    Step::Answer {
        iam_token: token.to_owned(),
        expires_at: expires_at.map(system_time_to_timestamp),
    }
}

#[test]
fn hostile_iam_answers_are_refused_and_the_good_token_kept() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let sidecar = Sidecar::start(
        &config(&iam, FAST, "").replace("call_timeout = \"2s\"", "call_timeout = \"500ms\""),
        "trace",
    );
    let good = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    assert_eq!(good.status, 200);

    let hour = Some(SystemTime::now() + Duration::from_secs(3600));
    let hostile: Vec<(Step, &str)> = vec![
        (answer("", hour), "empty token"),
        (
            answer("t1.has space", hour),
            "not allowed in a bearer token",
        ),
        (
            answer("t1.line\r\nX-Injected: 1", hour),
            "not allowed in a bearer token",
        ),
        (
            answer("t1.\u{7}bell", hour),
            "not allowed in a bearer token",
        ),
        (answer("t1.токен", hour), "not allowed in a bearer token"),
        (
            answer(&format!("t1.{}", "a".repeat(10_000)), hour),
            "longer than",
        ),
        (answer("t1.no-expiry", None), "without expires_at"),
        (
            answer(
                "t1.expired",
                Some(SystemTime::now() - Duration::from_secs(60)),
            ),
            "expired",
        ),
        (Step::Stall(Duration::from_secs(2)), "did not answer within"),
        (Step::Fail(Code::Internal, "boom".into()), "Internal"),
    ];
    // Each answer is requested at once through a reload (SIGHUP with the same config): it goes
    // through the same fetch and validation as a renewal, and a refused answer must leave the
    // good token in place.
    let seen = |needle: &str| sidecar.logs().iter().filter(|l| l.contains(needle)).count();
    for (step, needle) in hostile {
        let calls = iam.emulator.calls().len();
        let before = seen(needle);
        iam.emulator.push([step]);
        sidecar.signal("HUP");
        let started = Instant::now();
        while seen(needle) == before {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{needle} not logged"
            );
            // Meanwhile the good token keeps being served.
            let response = sidecar.get("/token");
            assert_eq!(response.status, 200);
            assert_eq!(response.body, good.body);
            std::thread::sleep(Duration::from_millis(20));
        }
        // The fake records a call when it answers; a stalled call is cancelled when the
        // sidecar gives up at its deadline, so it never is.
        if needle != "did not answer within" {
            assert!(
                iam.emulator.calls().len() > calls,
                "{needle}: IAM was asked"
            );
        }
        let response = sidecar.get("/token");
        assert_eq!(response.body, good.body, "after {needle}");
    }

    // An expires_at two days away is capped to 12 hours, with a warning.
    iam.emulator.push([answer(
        "t1.far-future",
        Some(SystemTime::now() + Duration::from_secs(48 * 3600)),
    )]);
    sidecar.signal("HUP");
    let capped = sidecar.wait_for("/token", Duration::from_secs(10), |r| {
        r.body == "t1.far-future"
    });
    assert_eq!(capped.body, "t1.far-future");
    let expires_in = sidecar.get("/token?format=json").json()["expires_in"]
        .as_u64()
        .unwrap();
    assert!(expires_in <= 12 * 3600, "{expires_in}");
    assert!(sidecar.wait_for_log("more than 12 hours away", Duration::from_secs(5)));

    let logs = sidecar.logs();
    let mut tokens = iam.issued_tokens();
    tokens.push("t1.far-future".into());
    assert_no_secrets(
        &logs,
        &tokens,
        &["t1.has space", "t1.no-expiry", "X-Injected", "bell"],
    );
}

fn tls_config(iam: &FakeIam, ca: &str) -> String {
    config(iam, FAST, "").replace(
        "call_timeout = \"2s\"\n",
        &format!(
            "call_timeout = \"2s\"\nca_file = {:?}\n",
            fixture(ca).to_str().unwrap()
        ),
    )
}

#[test]
fn tls_with_the_right_ca_works_and_a_wrong_ca_is_refused_keeping_the_token() {
    let iam = FakeIam::start_tls(Duration::from_secs(3600));
    let sidecar = Sidecar::start(&tls_config(&iam, "ca-good.pem"), "info");
    let good = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    assert_eq!(good.status, 200, "TLS to the fake IAM with its CA");
    assert_eq!(good.body, iam.issued_tokens()[0]);

    // Switch to a CA that did not sign the server's certificate: refused, token kept.
    std::fs::write(sidecar.config_path(), tls_config(&iam, "ca-other.pem")).unwrap();
    sidecar.signal("HUP");
    assert!(sidecar.wait_for_log("reload rejected", Duration::from_secs(15)));
    assert_eq!(
        iam.issued_tokens().len(),
        1,
        "no token over an untrusted connection"
    );
    assert_eq!(sidecar.get("/token").body, good.body);

    // And from scratch, with only the wrong CA: no token, 503, a logged transport error.
    let untrusted = Sidecar::start(&tls_config(&iam, "ca-other.pem"), "info");
    assert!(untrusted.wait_for_log("IAM token refresh failed", Duration::from_secs(15)));
    assert_eq!(untrusted.get("/readyz").status, 503);
    assert_eq!(iam.issued_tokens().len(), 1);
}

#[test]
fn client_secret_guards_the_token_on_authenticated_listeners() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, "s3cret-0123456789abcdef\n").unwrap();
    let extra = format!(
        "authenticated_listen = [\"127.0.0.1:0\"]\nclient_secret_file = {:?}",
        secret_file.to_str().unwrap()
    );
    let sidecar = Sidecar::start(&config(&iam, "", &extra), "trace");
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let guarded = sidecar
        .logged_addr("to clients presenting the client secret")
        .expect("authenticated listener");
    let token = iam.issued_tokens()[0].clone();

    let denied = get(guarded, "/token", &[]);
    assert_eq!(denied.status, 401);
    assert_eq!(
        denied.header("www-authenticate"),
        Some("Bearer realm=\"yc-iam-sidecar\"")
    );
    assert!(!denied.body.contains(&token));
    for wrong in [
        "Bearer s3cret-0123456789abcde",
        "Bearer ",
        "s3cret-0123456789abcdef",
        "Basic czNjcmV0",
    ] {
        assert_eq!(
            get(guarded, "/token", &[("Authorization", wrong)]).status,
            401,
            "{wrong}"
        );
    }
    let metadata = get(
        guarded,
        yc_iam_sidecar::server::METADATA_TOKEN_PATH,
        &[("Metadata-Flavor", "Google")],
    );
    assert_eq!(metadata.status, 401);
    let ok = get(
        guarded,
        "/token",
        &[("Authorization", "Bearer s3cret-0123456789abcdef")],
    );
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body, token);
    // Probes need no secret; the plain listener needs none either.
    assert_eq!(get(guarded, "/readyz", &[]).status, 200);
    assert_eq!(sidecar.get("/token").status, 200);

    // The file is re-read when it changes.
    std::fs::write(&secret_file, "rotated-secret-0123456789\n").unwrap();
    let started = Instant::now();
    loop {
        let response = get(
            guarded,
            "/token",
            &[("Authorization", "Bearer rotated-secret-0123456789")],
        );
        if response.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "rotated secret not picked up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let old = get(
        guarded,
        "/token",
        &[("Authorization", "Bearer s3cret-0123456789abcdef")],
    );
    assert_eq!(old.status, 401);

    sidecar.signal("TERM");
    let (_, logs) = sidecar.wait(Duration::from_secs(10));
    assert_no_secrets(
        &logs,
        &[token],
        &["s3cret-0123456789abcdef", "rotated-secret-0123456789"],
    );
}

#[test]
fn idle_and_trickling_connection_floods_do_not_lock_out_clients() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let sidecar = Sidecar::start(
        &config(
            &iam,
            "",
            "max_connections = 16\nheader_read_timeout = \"2s\"",
        ),
        "info",
    );
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let addr = sidecar.addr;
    // Far more idle connections than the limit, and slowloris ones trickling a header.
    let mut flood: Vec<TcpStream> = (0..64).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for _ in 0..16 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /token HTTP/1.1\r\nHost: localh").unwrap();
        flood.push(s);
    }
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..20 {
        let response = sidecar.get("/token");
        assert_eq!(
            response.status, 200,
            "a well-behaved client is served during the flood"
        );
    }

    // The limit holds: all but the newest 16 flood connections were closed by the server.
    let mut closed = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        if matches!(s.read(&mut [0u8; 64]), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed >= flood.len() - 16,
        "only {closed} of {} closed",
        flood.len()
    );

    // A trickling connection is closed by the server once the header timeout passes.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET /token HTTP/1.1\r\n").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let started = Instant::now();
    let _ = slow.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "slowloris connection left open"
    );
    assert!(!String::from_utf8_lossy(&buf).contains("t1."));
    drop(flood);
}

#[test]
fn oversized_heads_and_request_bodies_are_refused() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let sidecar = Sidecar::start(&config(&iam, "", ""), "info");
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let big = format!(
        "GET /token HTTP/1.1\r\nHost: localhost\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let response = raw(sidecar.addr, big.as_bytes());
    assert_eq!(response.status, 431, "{response:?}");
    let chunked = raw(
        sidecar.addr,
        b"GET /token HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(chunked.status, 413);
    assert!(!chunked.body.contains("t1."));
    let options = support::request(
        sidecar.addr,
        "OPTIONS",
        "/token",
        &[("Origin", "https://a.example")],
    );
    assert!(options.status == 403 || options.status == 405);
    assert!(options.header("access-control-allow-origin").is_none());
    assert_eq!(sidecar.get("/healthz").status, 200);
}

#[test]
fn core_dumps_are_off_and_exposed_key_files_are_flagged() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    std::fs::copy(fixture("sa-key-rsa2048.json"), &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = config(&iam, "", "").replace(
        fixture("sa-key-rsa2048.json").to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let sidecar = Sidecar::start(&text, "info");
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", sidecar.child.id())).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<_> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    assert!(
        sidecar
            .logs()
            .iter()
            .any(|l| l.contains("readable by other users") && l.contains("0644"))
    );

    // A 0600 key raises no warning.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quiet = Sidecar::start(&text, "info");
    quiet.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    assert!(
        !quiet
            .logs()
            .iter()
            .any(|l| l.contains("readable by other users"))
    );
}
