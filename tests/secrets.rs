//! Secrets never reach the logs: a TRACE-level capture of a full cycle (startup, first token,
//! renewals, an outage with transient and permanent errors, recovery, shutdown) contains no
//! token, no JWT and no line of the private key.
// These tests drive a real process over real sockets on the real clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::time::{Duration, Instant};

use support::{FakeIam, Sidecar, config, fixture};
use tonic::Code;
use yc_iam_sidecar::emulator::Step;

#[test]
fn trace_logs_of_a_full_cycle_hold_no_secret() {
    let iam = FakeIam::start(Duration::from_secs(2));
    let sidecar = Sidecar::start(
        &config(
            &iam,
            "min_interval = \"100ms\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"",
            "",
        ),
        "trace",
    );
    let first = sidecar.wait_for("/token", Duration::from_secs(10), |r| r.status == 200);
    assert_eq!(first.status, 200);
    // Renewals, then failures of both kinds, then recovery.
    let started = Instant::now();
    while iam.emulator.calls().len() < 3 && started.elapsed() < Duration::from_secs(10) {
        sidecar.get("/token?format=json");
        std::thread::sleep(Duration::from_millis(50));
    }
    iam.emulator.push([
        Step::Fail(Code::Unavailable, "down".into()),
        Step::Fail(
            Code::Unauthenticated,
            "JWT signature validation fails".into(),
        ),
        Step::Answer {
            iam_token: "t1.has space".into(),
            expires_at: None,
        },
    ]);
    let calls_before = iam.emulator.calls().len();
    let started = Instant::now();
    while iam.emulator.calls().len() < calls_before + 4
        && started.elapsed() < Duration::from_secs(10)
    {
        sidecar.get(yc_iam_sidecar::server::METADATA_TOKEN_PATH);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        iam.emulator.calls().len() >= calls_before + 4,
        "cycle completed"
    );
    sidecar.signal("TERM");
    let (code, logs) = sidecar.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0));

    let text = logs.join("\n");
    assert!(
        logs.len() > 20,
        "TRACE produced a real log: {} lines",
        logs.len()
    );
    assert!(text.contains("IAM token renewed"));
    assert!(
        text.contains("refused IAM's answer"),
        "the hostile answer was logged"
    );

    let tokens = iam.issued_tokens();
    assert!(tokens.len() >= 3);
    for token in &tokens {
        assert!(
            !text.contains(token.as_str()),
            "an IAM token appears in the logs"
        );
        // Even a fragment of one.
        assert!(
            !text.contains(&token[token.len() - 20..]),
            "part of a token in the logs"
        );
    }
    assert!(!text.contains("t1.has space"), "refused token echoed");
    // Every JWT opens with the base64 of {"typ":"JWT","alg":"PS256",...
    assert!(!text.contains("eyJ0eXAi"), "a JWT appears in the logs");
    let key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("sa-key-rsa2048.json")).unwrap()).unwrap();
    let private = key["private_key"].as_str().unwrap();
    assert!(!text.contains("PRIVATE KEY"));
    for line in private.lines().filter(|l| l.len() > 20 && !l.contains(' ')) {
        assert!(
            !text.contains(line),
            "a private key line appears in the logs"
        );
    }
}
