//! The floor for the sidecar's HTTP stack: a minimal hyper 1.x http1 server that answers every
//! request with a fixed 78-byte `text/plain` body, on the same runtime as the sidecar (tokio
//! multi-thread, 2 workers). `scripts/bench.sh` compares the sidecar against it.
//!
//! ```text
//! cargo run --release --example hyper_floor -- 127.0.0.1:4300
//! HYPER_FLOOR_RUNTIME=current cargo run --release --example hyper_floor -- 127.0.0.1:4300
//! ```
//!
//! `HYPER_FLOOR_RUNTIME` = `multi` (default: multi-thread, 2 workers, as `src/main.rs`) or
//! `current` (current-thread), to size what the runtime flavour costs or gains.
//! `HYPER_FLOOR_HEADER_TIMEOUT=1` arms hyper's header-read timeout with a tokio timer, as the
//! sidecar's server does, to size what that costs per request.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// 78 bytes, the length of a dev-emulator token.
const BODY: &[u8; 78] =
    b"t1.FAKE-NOT-VALID-FOR-YANDEX-CLOUD.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .ok_or("usage: hyper_floor IP:PORT")?
        .parse()?;
    let flavour = std::env::var("HYPER_FLOOR_RUNTIME").unwrap_or_else(|_| "multi".to_owned());
    let runtime = match flavour.as_str() {
        "current" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        "multi" => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        other => return Err(format!("HYPER_FLOOR_RUNTIME={other:?}: use multi or current").into()),
    };
    runtime.block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!("hyper_floor listening on {}", listener.local_addr()?);
    let body = Bytes::from_static(BODY);
    let mut builder = http1::Builder::new();
    if std::env::var_os("HYPER_FLOOR_HEADER_TIMEOUT").is_some_and(|v| v == "1") {
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(10));
    }
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req| {
                let mut response = Response::new(Full::new(body.clone()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
