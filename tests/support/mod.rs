//! Shared helpers for the integration tests: a fake IAM on a loopback port, the real binary
//! started with a config file, and a raw HTTP/1.1 client that can send hostile requests.
#![allow(dead_code, clippy::disallowed_types)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use yc_iam_sidecar::emulator::Emulator;

pub const KEY_ID: &str = "ajetestkey2048pkcs8xx";
pub const SERVICE_ACCOUNT: &str = "ajetestserviceaccount";

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fake IAM: the library's emulator, trusting the fixture keys, served on its own runtime
/// thread so blocking tests can use it too.
pub struct FakeIam {
    pub emulator: Emulator,
    pub addr: SocketAddr,
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeIam {
    pub fn start(default_lifetime: Duration) -> Self {
        Self::start_inner(default_lifetime, false)
    }

    /// A fake IAM behind TLS with `tls-server.pem` (signed by `ca-good.pem`).
    pub fn start_tls(default_lifetime: Duration) -> Self {
        Self::start_inner(default_lifetime, true)
    }

    fn start_inner(default_lifetime: Duration, tls: bool) -> Self {
        let emulator = Emulator::new(default_lifetime);
        for key in ["sa-key-rsa2048.json", "sa-key-rsa4096.json"] {
            emulator
                .trust_key_file(&std::fs::read(fixture(key)).unwrap())
                .unwrap();
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, addr) = std::sync::mpsc::channel();
        let serving = emulator.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                ready.send(listener.local_addr().unwrap()).unwrap();
                let stopped = async {
                    let _ = stopped.await;
                };
                if tls {
                    let cert = std::fs::read(fixture("tls-server.pem")).unwrap();
                    let key = std::fs::read(fixture("tls-server.key")).unwrap();
                    serving
                        .serve_tls(listener, &cert, &key, stopped)
                        .await
                        .unwrap();
                } else {
                    serving.serve(listener, stopped).await.unwrap();
                }
            });
        });
        let addr = addr.recv().unwrap();
        Self {
            emulator,
            addr,
            tls,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn issued_tokens(&self) -> Vec<String> {
        self.emulator.issued().into_iter().map(|(t, _)| t).collect()
    }
}

impl Drop for FakeIam {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The real binary, started with a config file in a temporary directory. Its stderr (JSON logs)
/// is collected line by line.
pub struct Sidecar {
    pub child: Child,
    /// The first TCP listener.
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_yc-iam-sidecar")
}

/// A config for `iam` with a short-token-friendly refresh policy; `extra` is appended verbatim.
pub fn config(iam: &FakeIam, refresh: &str, extra: &str) -> String {
    format!(
        "[credentials]\nservice_account_key_file = {key:?}\n\n[iam]\nendpoint = {endpoint:?}\ncall_timeout = \"2s\"\n\n[refresh]\n{refresh}\n\n[http]\nlisten = [\"127.0.0.1:0\"]\n{extra}\n",
        key = fixture("sa-key-rsa2048.json").display().to_string(),
        endpoint = iam.endpoint(),
    )
}

impl Sidecar {
    /// Starts `serve` with `config_text` and waits until it listens.
    pub fn start(config_text: &str, rust_log: &str) -> Self {
        Self::start_with(config_text, rust_log, &[])
    }

    /// As [`Sidecar::start`], with extra environment variables.
    pub fn start_with(config_text: &str, rust_log: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config_text).unwrap();
        let mut command = Command::new(binary());
        command
            .args(["serve", "--config"])
            .arg(&path)
            .args(["--log-format", "json"])
            .env("RUST_LOG", rust_log)
            .env_remove("YC_SERVICE_ACCOUNT_KEY_FILE")
            .env_remove("YC_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC");
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        let reader = std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = &addr_tx
                    && line.contains("serving the IAM token over HTTP")
                {
                    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
                    if let Ok(addr) = value["addr"].as_str().unwrap().parse::<SocketAddr>() {
                        let _ = tx.send(addr);
                        addr_tx = None;
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("sidecar did not start: {:#?}", logs.lock().unwrap());
            }
        };
        Self {
            child,
            addr,
            dir,
            logs,
            reader: Some(reader),
        }
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        get(self.addr, path, &[])
    }

    /// Polls `path` until `check` accepts the answer or `limit` passes.
    pub fn wait_for(
        &self,
        path: &str,
        limit: Duration,
        check: impl Fn(&HttpResponse) -> bool,
    ) -> HttpResponse {
        let started = Instant::now();
        loop {
            let response = self.get(path);
            if check(&response) || started.elapsed() > limit {
                return response;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The config file the sidecar was started with (rewrite it, then send HUP).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The address of the first listener logged with `message` (for extra listeners).
    pub fn logged_addr(&self, message: &str) -> Option<SocketAddr> {
        self.logs()
            .iter()
            .find(|l| l.contains(message))
            .and_then(|l| {
                let value: serde_json::Value = serde_json::from_str(l).ok()?;
                value["addr"].as_str()?.parse().ok()
            })
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.logs().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`) with the system's `kill`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for exit and returns the exit code and every log line.
    pub fn wait(mut self, limit: Duration) -> (Option<i32>, Vec<String>) {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("sidecar did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        (status.code(), self.logs())
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // A failing test shows what the sidecar said (INFO and above).
        if std::thread::panicking() {
            for line in self.logs() {
                if !line.contains("\"level\":\"TRACE\"") && !line.contains("\"level\":\"DEBUG\"") {
                    eprintln!("sidecar log: {line}");
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// `GET path` with `Host: localhost` unless `headers` names another Host.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    request(addr, "GET", path, headers)
}

/// Sends one raw HTTP/1.1 request on a fresh connection and reads the whole answer.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut text = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        text.push_str("Host: localhost\r\n");
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("Connection: close\r\n\r\n");
    raw(addr, text.as_bytes())
}

/// Writes `bytes` and parses the answer.
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    parse_response(&answer)
}

pub fn parse_response(answer: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete HTTP answer: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// Fails if any log line holds a token, a JWT, or a line of the fixture's private key.
pub fn assert_no_secrets(logs: &[String], tokens: &[String], extra: &[&str]) {
    let text = logs.join("\n");
    for token in tokens {
        assert!(
            !text.contains(token.as_str()),
            "an IAM token appears in the logs"
        );
        if token.len() > 24 {
            assert!(
                !text.contains(&token[token.len() - 20..]),
                "part of a token in the logs"
            );
        }
    }
    // Every JWT opens with the base64 of {"typ":"JWT","alg":"PS256",...
    assert!(!text.contains("eyJ0eXAi"), "a JWT appears in the logs");
    assert!(!text.contains("PRIVATE KEY"));
    let key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("sa-key-rsa2048.json")).unwrap()).unwrap();
    for line in key["private_key"]
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| l.len() > 20 && !l.contains(' '))
    {
        assert!(
            !text.contains(line),
            "a private key line appears in the logs"
        );
    }
    for secret in extra {
        assert!(
            !text.contains(secret),
            "{secret:?}-like secret appears in the logs"
        );
    }
}

/// Runs the binary with `args` to completion; returns exit code, stdout and stderr.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(binary());
    command
        .args(args)
        .env_remove("YC_SERVICE_ACCOUNT_KEY_FILE")
        .env_remove("YC_TOKEN")
        .env_remove("RUST_LOG");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
