//! The command line: one-shot `token`, `check-config`, the example config, and bad input at
//! startup failing with one clear line and a sysexits code.
// These tests drive a real process over real sockets on the real clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::time::Duration;

use support::{FakeIam, config, fixture, run_binary};
use yc_iam_sidecar::config::{Overrides, Settings};

#[test]
fn example_config_parses_with_the_real_loader() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let settings = Settings::load(Some(&path), &Overrides::default(), &|_| None)
        .expect("config.example.toml is valid");
    // The example documents the defaults; loading it must give the same policy as no file.
    let defaults = Settings::load(
        None,
        &Overrides {
            key_file: Some("/k".into()),
            ..Overrides::default()
        },
        &|_| None,
    )
    .unwrap();
    assert_eq!(settings.refresh, defaults.refresh);
    assert_eq!(settings.http.listen, defaults.http.listen);
    assert_eq!(settings.http.wait_for_token, defaults.http.wait_for_token);
    assert_eq!(settings.iam.endpoint, defaults.iam.endpoint);
    assert_eq!(settings.iam.call_timeout, defaults.iam.call_timeout);
}

#[test]
fn token_command_prints_one_fresh_token() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(&iam, "", "")).unwrap();
    let (code, stdout, stderr) = run_binary(&["token", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, format!("{}\n", iam.issued_tokens()[0]));
    assert!(!stderr.contains("t1."), "token only on stdout: {stderr}");
}

#[test]
fn token_command_uses_the_conventional_environment() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let key = fixture("sa-key-rsa4096.json");
    let (code, stdout, stderr) = run_binary(
        &["token", "--iam-endpoint", &iam.endpoint()],
        &[("YC_SERVICE_ACCOUNT_KEY_FILE", key.to_str().unwrap())],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), iam.issued_tokens()[0]);
    assert_eq!(
        iam.emulator.calls()[0].key_id.as_deref(),
        Some("ajetestkey4096pkcs8xx")
    );
}

#[test]
fn token_command_with_oauth_token() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    iam.emulator.trust_oauth_token("y0_test_oauth_token");
    let (code, stdout, stderr) = run_binary(
        &["token", "--iam-endpoint", &iam.endpoint()],
        &[("YC_TOKEN", "y0_test_oauth_token")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), iam.issued_tokens()[0]);
    assert!(iam.emulator.calls()[0].oauth);
}

#[test]
fn token_command_fails_fast_on_a_permanent_error() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    // A key IAM does not know: the fake answers UNAUTHENTICATED as IAM does.
    let key = fixture("sa-key-pkcs1-camel.json");
    let (code, stdout, stderr) = run_binary(
        &[
            "token",
            "--iam-endpoint",
            &iam.endpoint(),
            "--key-file",
            key.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(78), "{stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("Key 'ajetestkey2048pkcs1xx' was not found"),
        "{stderr}"
    );
}

#[test]
fn check_config_validates_and_summarises() {
    let iam = FakeIam::start(Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(&iam, "", "")).unwrap();
    let (code, stdout, stderr) =
        run_binary(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(stdout.contains(support::SERVICE_ACCOUNT), "{stdout}");
    assert!(
        iam.emulator.calls().is_empty(),
        "check-config does not call IAM"
    );
}

/// Runs `serve` with a config body and expects a startup failure.
fn startup_failure(config_text: &str, extra_args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config_text).unwrap();
    let mut args = vec!["serve", "--config", path.to_str().unwrap()];
    args.extend_from_slice(extra_args);
    let (code, _, stderr) = run_binary(&args, &[]);
    (code, stderr)
}

fn key_config(key: &str) -> String {
    format!(
        "[credentials]\nservice_account_key_file = {key:?}\n[http]\nlisten = [\"127.0.0.1:0\"]\n"
    )
}

#[test]
fn bad_input_exits_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let malformed = write("malformed.json", b"{\"id\": \"abc\", ");
    let unreadable_dir = dir.path().to_str().unwrap().to_owned();
    let no_pem = fixture("no-pem-key.json").to_str().unwrap().to_owned();
    let user = fixture("user-account-key.json")
        .to_str()
        .unwrap()
        .to_owned();
    let good = fixture("sa-key-rsa2048.json").to_str().unwrap().to_owned();

    let cases: Vec<(String, Vec<&str>, i32, Vec<&str>)> = vec![
        (
            key_config("/nonexistent/key.json"),
            vec![],
            78,
            vec!["/nonexistent/key.json", "No such file"],
        ),
        (key_config(&unreadable_dir), vec![], 78, vec!["cannot read"]),
        (
            key_config(&malformed),
            vec![],
            78,
            vec!["malformed.json", "ends too early"],
        ),
        (
            key_config(&no_pem),
            vec![],
            78,
            vec!["no-pem-key.json", "no PEM block"],
        ),
        (
            key_config(&user),
            vec![],
            78,
            vec!["user account", "service account"],
        ),
        (
            format!("{}[refresh]\nmax_agee = \"1h\"\n", key_config(&good)),
            vec![],
            78,
            vec!["config.toml:6", "unknown field `max_agee`"],
        ),
        (
            format!("{}[refresh]\nmax_age = \"an hour\"\n", key_config(&good)),
            vec![],
            78,
            vec!["config.toml:6", "invalid duration", "max_age"],
        ),
        (
            format!("{}[iam]\nendpoint = \"iam.example\"\n", key_config(&good)),
            vec![],
            78,
            vec!["iam.endpoint"],
        ),
        (
            format!("{}[log]\nfilter = \"infor\"\n", key_config(&good)),
            vec![],
            78,
            vec!["log.filter", "\"infor\" is not a log filter"],
        ),
        (
            key_config(&good),
            vec!["--listen", "localhost:80"],
            78,
            vec!["http.listen"],
        ),
        (
            "[credentials]\n".to_owned(),
            vec![],
            78,
            vec!["no credentials", "YC_SERVICE_ACCOUNT_KEY_FILE"],
        ),
        (
            key_config(&good),
            vec!["--bogus-flag"],
            64,
            vec!["--bogus-flag"],
        ),
    ];
    for threads in ["two", "-1", "65"] {
        let (code, _, stderr) = run_binary(
            &["check-config", "--key-file", &good],
            &[("YC_IAM_SIDECAR_WORKER_THREADS", threads)],
        );
        assert_eq!(code, Some(78), "{stderr}");
        assert!(
            stderr.contains("YC_IAM_SIDECAR_WORKER_THREADS") && stderr.contains(threads),
            "{stderr}"
        );
    }
    for (config_text, args, want_code, needles) in cases {
        let (code, stderr) = startup_failure(&config_text, &args);
        assert_eq!(code, Some(want_code), "{needles:?}: {stderr}");
        for needle in &needles {
            assert!(stderr.contains(needle), "want {needle:?} in {stderr:?}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
        if want_code != 64 {
            let lines: Vec<_> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "one line: {stderr:?}");
            assert!(
                lines[0].starts_with("yc-iam-sidecar: error: "),
                "{stderr:?}"
            );
        }
    }
}

#[test]
fn port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let key = fixture("sa-key-rsa2048.json");
    let (code, stderr) = startup_failure(
        &format!(
            "[credentials]\nservice_account_key_file = {:?}\n[http]\nlisten = [{addr:?}]\n",
            key.to_str().unwrap()
        ),
        &[],
    );
    assert_eq!(code, Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
}
