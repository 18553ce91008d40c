//! The built-in IAM emulator as a standalone loopback server, trusting one authorized-key file,
//! so the real binary can be started with `serve` against a loopback IAM without the RSA key
//! generation that `dev` does at startup. `scripts/bench.sh` uses it for the start-to-ready time.
//!
//! ```text
//! cargo run --release --example iam_emulator -- 127.0.0.1:4301 tests/fixtures/sa-key-rsa2048.json
//! yc-iam-sidecar serve --key-file tests/fixtures/sa-key-rsa2048.json \
//!     --iam-endpoint http://127.0.0.1:4301 --listen 127.0.0.1:4268
//! ```
//!
//! Tokens are fake (`t1.FAKE-NOT-VALID-FOR-YANDEX-CLOUD.…`) and live one hour
//! (`IAM_EMULATOR_LIFETIME`, e.g. `10m`, to change).

use std::net::SocketAddr;
use std::time::Duration;

use yc_iam_sidecar::emulator::Emulator;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: iam_emulator IP:PORT KEY_FILE.json";
    let addr: SocketAddr = args.next().ok_or(usage)?.parse()?;
    let key_file = args.next().ok_or(usage)?;
    let lifetime = match std::env::var("IAM_EMULATOR_LIFETIME") {
        Ok(text) => humantime::parse_duration(&text)?,
        Err(_) => Duration::from_secs(3600),
    };
    let emulator = Emulator::new(lifetime);
    emulator.trust_key_file(&std::fs::read(&key_file)?)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "iam_emulator listening on {}, trusting {key_file}",
        listener.local_addr()?
    );
    emulator
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
