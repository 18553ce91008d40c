//! Secrets never reach the logs: a TRACE-level capture of a full cycle (startup, first token,
//! renewals, an outage with transient and permanent errors, recovery, shutdown) contains no
//! token, no JWT and no line of the private key.
// These tests drive a real process over real sockets on the real clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::time::{Duration, Instant};

use support::{FakeIam, Sidecar, assert_no_secrets, config};
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
    // No token (nor a fragment), no JWT, no private key line, and the refused token not echoed.
    assert_no_secrets(&logs, &tokens, &["t1.has space"]);
}
