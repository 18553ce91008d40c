//! Soak: continuous concurrent clients through at least 100 token rotations. Asserts zero non-200
//! answers while a valid token exists, zero expired or unknown tokens served, and flat memory,
//! and prints the figures. Ignored by default (about a minute); CI runs it with
//! `cargo test --release --test soak -- --ignored --nocapture`.

// These tests drive a real process over real sockets on the real clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use support::{FakeIam, Sidecar, config};

const ROTATIONS: usize = 100;
const CLIENTS: usize = 8;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// One keep-alive connection: GET /token, read status and body by Content-Length.
fn client_loop(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<String, SystemTime>>>,
) -> (u64, u64) {
    let mut ok = 0;
    let mut bad = 0;
    let mut local: HashMap<String, SystemTime> = HashMap::new();
    let mut stream = BufReader::new(TcpStream::connect(addr).unwrap());
    while !stop.load(Ordering::Relaxed) {
        let sent = SystemTime::now();
        if stream
            .get_mut()
            .write_all(b"GET /token HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            stream = BufReader::new(TcpStream::connect(addr).unwrap());
            continue;
        }
        let mut status_line = String::new();
        if stream.read_line(&mut status_line).unwrap_or(0) == 0 {
            // The server closed an idle keep-alive connection: reconnect.
            stream = BufReader::new(TcpStream::connect(addr).unwrap());
            continue;
        }
        let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).unwrap();
        if status == 200 {
            ok += 1;
            // Keep the latest send time per token: it must precede that token's expiry.
            local.insert(String::from_utf8(body).unwrap(), sent);
        } else {
            bad += 1;
        }
    }
    let mut seen = seen.lock().unwrap();
    for (token, sent) in local {
        let entry = seen.entry(token).or_insert(sent);
        if sent > *entry {
            *entry = sent;
        }
    }
    (ok, bad)
}

#[test]
#[ignore = "takes about a minute; run explicitly (CI does)"]
fn hundred_rotations_under_load_serve_only_valid_tokens() {
    let lifetime = Duration::from_millis(600);
    let iam = FakeIam::start(lifetime);
    let sidecar = Sidecar::start(
        &config(
            &iam,
            "min_interval = \"100ms\"\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"",
            "",
        ),
        "info",
    );
    sidecar.wait_for("/readyz", Duration::from_secs(10), |r| r.status == 200);
    let pid = sidecar.child.id();

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
            let addr = sidecar.addr;
            std::thread::spawn(move || client_loop(addr, stop, seen))
        })
        .collect();

    let started = Instant::now();
    let mut warm_rss = None;
    while iam.issued_tokens().len() < ROTATIONS + 1 {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "rotations too slow"
        );
        if warm_rss.is_none() && iam.issued_tokens().len() >= 10 {
            warm_rss = Some(rss_kib(pid));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let end_rss = rss_kib(pid);
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut bad) = (0, 0);
    for client in clients {
        let (o, b) = client.join().unwrap();
        ok += o;
        bad += b;
    }
    let elapsed = started.elapsed();

    let issued: HashMap<String, SystemTime> = iam.emulator.issued().into_iter().collect();
    let seen = seen.lock().unwrap();
    let unknown = seen.keys().filter(|t| !issued.contains_key(*t)).count();
    let expired = seen
        .iter()
        .filter(|(t, sent)| issued.get(*t).is_some_and(|exp| **sent >= *exp))
        .count();
    let rotations = issued.len() - 1;
    let warm_rss = warm_rss.unwrap();
    let growth = end_rss as i64 - warm_rss as i64;

    println!(
        "soak: {rotations} rotations in {:.1}s with {CLIENTS} keep-alive clients",
        elapsed.as_secs_f64()
    );
    println!("soak: {ok} requests answered 200, {bad} other answers");
    println!(
        "soak: {} distinct tokens served, {unknown} unknown, {expired} served at or after expiry",
        seen.len()
    );
    println!("soak: RSS {warm_rss} KiB after warm-up, {end_rss} KiB at the end ({growth:+} KiB)");

    assert!(rotations >= ROTATIONS);
    assert_eq!(bad, 0, "non-200 answers while a valid token existed");
    assert_eq!(unknown, 0, "tokens IAM never issued were served");
    assert_eq!(expired, 0, "expired tokens were served");
    assert!(seen.len() >= ROTATIONS / 2, "clients saw the rotations");
    assert!(growth < 4 * 1024, "memory grew by {growth} KiB");
}
