//! What operators run it with: systemd notify over a real datagram socket, the token file, SIGHUP
//! key rotation, /metrics, revoke on shutdown, a Unix socket listener, one-shot `token --output`
//! and the `probe` command.

// These tests drive a real process over real sockets on the real clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::time::{Duration, Instant};

use support::{FakeIam, Sidecar, config, fixture, run_binary};
use tonic::Code;
use yc_iam_sidecar::emulator::Step;

const FAST: &str = "min_interval = \"100ms\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"";

fn collect(
    socket: &UnixDatagram,
    until: impl Fn(&[String]) -> bool,
    limit: Duration,
) -> Vec<String> {
    let started = Instant::now();
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit && !until(&messages) {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    messages
}

#[test]
fn systemd_ready_comes_after_the_first_token_and_file_then_watchdog_and_stopping() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    // The first Create stalls: nothing may claim readiness meanwhile.
    iam.emulator.push([Step::Stall(Duration::from_millis(800))]);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let token_file = dir.path().join("token");
    let sink = format!("[sink]\npath = {:?}\n", token_file.to_str().unwrap());
    let sidecar = Sidecar::start_with(
        &format!("{}{sink}", config(&iam, "", "")),
        "info",
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let before = collect(
        &socket,
        |m| m.iter().any(|x| x.contains("READY=1")),
        Duration::from_secs(10),
    );
    let ready = before
        .iter()
        .find(|m| m.contains("READY=1"))
        .expect("READY=1 sent");
    // At the moment READY arrives the token is served and already in the file.
    let served = sidecar.get("/token");
    assert_eq!(served.status, 200);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap(), served.body);
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().mode() & 0o777,
        0o600
    );
    assert!(
        ready.contains("STATUS=serving; token valid until"),
        "{ready}"
    );
    assert!(iam.emulator.calls().len() == 1);

    let after = collect(
        &socket,
        |m| m.iter().filter(|x| *x == "WATCHDOG=1").count() >= 3,
        Duration::from_secs(5),
    );
    assert!(
        after.iter().filter(|x| *x == "WATCHDOG=1").count() >= 3,
        "{after:?}"
    );

    sidecar.signal("TERM");
    let stopping = collect(
        &socket,
        |m| m.iter().any(|x| x == "STOPPING=1"),
        Duration::from_secs(5),
    );
    assert!(stopping.iter().any(|x| x == "STOPPING=1"), "{stopping:?}");
    let (code, _) = sidecar.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0));
}

#[test]
fn token_file_follows_rotations_and_is_withdrawn_when_the_token_lapses() {
    let iam = FakeIam::start(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token.json");
    let sink = format!(
        "[sink]\npath = {:?}\nformat = \"json\"\nmode = \"0640\"\n",
        token_file.to_str().unwrap()
    );
    let sidecar = Sidecar::start(&format!("{}{sink}", config(&iam, FAST, "")), "info");
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let started = Instant::now();
    while iam.issued_tokens().len() < 3 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&token_file).unwrap()).unwrap();
    assert!(
        iam.issued_tokens()
            .contains(&file["access_token"].as_str().unwrap().to_owned())
    );
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().mode() & 0o777,
        0o640
    );

    // IAM goes down: once the last token reaches its margin the file disappears.
    iam.emulator.push(std::iter::repeat_n(
        Step::Fail(Code::Unavailable, "down".into()),
        100_000,
    ));
    let started = Instant::now();
    while token_file.exists() && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!token_file.exists(), "lapsed token file removed");
    let (_, expiry) = *iam.emulator.issued().last().unwrap();
    assert!(std::time::SystemTime::now() < expiry + Duration::from_millis(300));
}

#[test]
fn sighup_rotates_to_a_new_key_and_rejects_a_broken_one() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let sidecar = Sidecar::start(&config(&iam, "", ""), "info");
    let first = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    assert_eq!(
        iam.emulator.calls()[0].key_id.as_deref(),
        Some(support::KEY_ID)
    );

    // Rotate to the 4096-bit key.
    let rotated = config(&iam, "", "").replace(
        fixture("sa-key-rsa2048.json").to_str().unwrap(),
        fixture("sa-key-rsa4096.json").to_str().unwrap(),
    );
    std::fs::write(sidecar.config_path(), rotated).unwrap();
    sidecar.signal("HUP");
    assert!(sidecar.wait_for_log("reload applied", Duration::from_secs(10)));
    let calls = iam.emulator.calls();
    assert_eq!(
        calls.last().unwrap().key_id.as_deref(),
        Some("ajetestkey4096pkcs8xx")
    );
    let second = sidecar.get("/token");
    assert_eq!(second.body, *iam.issued_tokens().last().unwrap());
    assert_ne!(second.body, first.body);

    // A key IAM does not know: rejected, the old key and token stay.
    let unknown = config(&iam, "", "").replace(
        fixture("sa-key-rsa2048.json").to_str().unwrap(),
        fixture("sa-key-pkcs1-camel.json").to_str().unwrap(),
    );
    std::fs::write(sidecar.config_path(), unknown).unwrap();
    sidecar.signal("HUP");
    assert!(sidecar.wait_for_log("was not found", Duration::from_secs(10)));
    assert_eq!(sidecar.get("/token").body, second.body);

    // A broken file: rejected before IAM is asked.
    let calls_before = iam.emulator.calls().len();
    std::fs::write(
        sidecar.config_path(),
        "[credentials]\nservice_account_key_file = 7\n",
    )
    .unwrap();
    sidecar.signal("HUP");
    assert!(sidecar.wait_for_log(
        "old configuration and credentials stay",
        Duration::from_secs(10)
    ));
    assert_eq!(iam.emulator.calls().len(), calls_before);
    assert_eq!(sidecar.get("/token").body, second.body);
    assert_eq!(sidecar.get("/readyz").status, 200);
}

/// Parses the text format into (series, value) pairs.
fn samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn sample(all: &[(String, f64)], series: &str) -> Option<f64> {
    all.iter().find(|(s, _)| s == series).map(|(_, v)| *v)
}

#[test]
fn metrics_count_attempts_requests_and_expiry() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    iam.emulator.push([
        Step::Fail(Code::Unavailable, "down".into()),
        Step::Fail(Code::Unavailable, "down".into()),
        Step::Fail(Code::ResourceExhausted, "slow down".into()),
    ]);
    let sidecar = Sidecar::start(
        &format!(
            "{}[metrics]\nlisten = [\"127.0.0.1:0\"]\n",
            config(&iam, FAST, "")
        ),
        "info",
    );
    sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    sidecar.get("/token");
    sidecar.get("/nope");

    let response = sidecar.get("/metrics");
    assert_eq!(response.status, 200);
    let all = samples(&response.body);
    let get = |series: &str| {
        sample(&all, series).unwrap_or_else(|| panic!("{series} missing:\n{}", response.body))
    };
    assert_eq!(
        get("yc_iam_sidecar_refresh_attempts_total{outcome=\"failure\",code=\"UNAVAILABLE\"}"),
        2.0
    );
    assert_eq!(
        get(
            "yc_iam_sidecar_refresh_attempts_total{outcome=\"failure\",code=\"RESOURCE_EXHAUSTED\"}"
        ),
        1.0
    );
    assert_eq!(
        get("yc_iam_sidecar_refresh_attempts_total{outcome=\"success\",code=\"OK\"}"),
        1.0
    );
    assert_eq!(get("yc_iam_sidecar_iam_call_duration_seconds_count"), 4.0);
    assert_eq!(get("yc_iam_sidecar_ready"), 1.0);
    let expires_in = get("yc_iam_sidecar_token_expires_in_seconds");
    assert!((3500.0..=3600.0).contains(&expires_in), "{expires_in}");
    let expiry = get("yc_iam_sidecar_token_expiry_timestamp_seconds");
    let (_, issued_expiry) = iam.emulator.issued()[0];
    let want = issued_expiry
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - want).abs() < 2.0, "{expiry} vs {want}");
    assert!(get("yc_iam_sidecar_http_requests_total{route=\"token\",status=\"200\"}") >= 2.0);
    assert_eq!(
        get("yc_iam_sidecar_http_requests_total{route=\"unknown\",status=\"404\"}"),
        1.0
    );
    assert_eq!(get("yc_iam_sidecar_build_info{version=\"0.1.0\"}"), 1.0);
    assert!(!response.body.contains("t1."), "no token in metrics");

    // The separate monitoring listener serves metrics and health, never the token.
    let monitoring = sidecar
        .logged_addr("serving metrics and health over HTTP")
        .expect("monitoring listener");
    assert_eq!(support::get(monitoring, "/metrics", &[]).status, 200);
    assert_eq!(support::get(monitoring, "/readyz", &[]).status, 200);
    // Kubelet and Prometheus address it by pod IP: no Host restriction on health and metrics.
    let by_pod_ip = support::get(monitoring, "/metrics", &[("Host", "10.1.2.3:4269")]);
    assert_eq!(by_pod_ip.status, 200);
    let token_by_pod_ip = support::get(sidecar.addr, "/token", &[("Host", "10.1.2.3:4268")]);
    assert_eq!(token_by_pod_ip.status, 403);
    assert_eq!(support::get(monitoring, "/token", &[]).status, 404);
    let metadata = support::get(
        monitoring,
        yc_iam_sidecar::server::METADATA_TOKEN_PATH,
        &[("Metadata-Flavor", "Google")],
    );
    assert_eq!(metadata.status, 404);
}

#[test]
fn revoke_on_shutdown_revokes_the_tokens_obtained() {
    let iam = FakeIam::start(Duration::from_secs(3));
    let sidecar = Sidecar::start(
        &config(&iam, FAST, "").replace("[iam]\n", "[iam]\nrevoke_on_shutdown = true\n"),
        "info",
    );
    sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    let started = Instant::now();
    while iam.issued_tokens().len() < 2 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    sidecar.signal("TERM");
    let (code, logs) = sidecar.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    let revoked = iam.emulator.revoked();
    let issued = iam.emulator.issued();
    let still_valid: Vec<_> = issued
        .iter()
        .filter(|(_, exp)| *exp > std::time::SystemTime::now() + Duration::from_millis(500))
        .map(|(t, _)| t.clone())
        .collect();
    assert!(!revoked.is_empty());
    for token in &still_valid {
        assert!(revoked.contains(token), "a valid token was not revoked");
    }
    assert!(logs.iter().any(|l| l.contains("revoked the IAM tokens")));
}

#[test]
fn without_opt_in_nothing_is_revoked() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let sidecar = Sidecar::start(&config(&iam, "", ""), "info");
    sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(Duration::from_secs(10)).0, Some(0));
    assert!(iam.emulator.revoked().is_empty());
}

#[test]
fn unix_socket_listener_serves_with_its_mode_and_is_removed_on_exit() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("token.sock");
    let text = config(&iam, "", "unix_socket_mode = \"0600\"").replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"127.0.0.1:0\", \"unix:{}\"]", socket.display()),
    );
    let sidecar = Sidecar::start(&text, "info");
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .write_all(b"GET /token HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    let response = support::parse_response(&answer);
    assert_eq!(response.status, 200);
    assert_eq!(response.body, iam.issued_tokens()[0]);

    sidecar.signal("TERM");
    assert_eq!(sidecar.wait(Duration::from_secs(10)).0, Some(0));
    assert!(!socket.exists(), "socket file removed on exit");
}

#[test]
fn token_output_writes_the_file_like_the_sink() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("token");
    let key = fixture("sa-key-rsa2048.json");
    let (code, stdout, stderr) = run_binary(
        &[
            "token",
            "--iam-endpoint",
            &iam.endpoint(),
            "--key-file",
            key.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "", "the token goes to the file only");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        iam.issued_tokens()[0]
    );
    assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o600);
    assert!(!stderr.contains("t1."));
}

#[test]
fn probe_exits_zero_only_when_ready() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let sidecar = Sidecar::start(&config(&iam, "", ""), "info");
    let url = format!("http://{}/readyz", sidecar.addr);
    let (code, _, stderr) = run_binary(&["probe", "--url", &url, "--wait", "10s"], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    drop(sidecar);
    let (code, _, stderr) = run_binary(&["probe", "--url", &url], &[]);
    assert_eq!(code, Some(1));
    assert!(stderr.contains(&url), "{stderr}");
}
