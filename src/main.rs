//! The `yc-iam-sidecar` binary: parses the command line, picks exit codes, and wires the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use yc_iam_sidecar::config::{self, LogFormat, Overrides, Settings, SinkFormat, SinkSettings};
use yc_iam_sidecar::credentials::{Credentials, ServiceAccountKey};
use yc_iam_sidecar::daemon;
use yc_iam_sidecar::emulator::{self, Emulator};
use yc_iam_sidecar::iam::GrpcIam;
use yc_iam_sidecar::sink::FileSink;

/// sysexits(3) codes, so supervisors can tell a bad configuration from a bad day.
const EX_USAGE: u8 = 64;
const EX_UNAVAILABLE: u8 = 69;
const EX_SOFTWARE: u8 = 70;
const EX_CANTCREAT: u8 = 73;
const EX_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "yc-iam-sidecar",
    version,
    about = "Keeps a fresh Yandex Cloud IAM token in memory and serves it on localhost",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (the default).
    Serve(ServeArgs),
    /// Fetch one token, print it to stdout, and exit.
    Token(TokenArgs),
    /// Validate the configuration and credentials, then exit.
    CheckConfig(CommonArgs),
    /// Run against a built-in IAM emulator issuing fake tokens (not valid for Yandex Cloud).
    Dev(DevArgs),
    /// GET a URL (by default the local /readyz) and exit 0 on 200: a probe for images without
    /// curl.
    Probe(ProbeArgs),
}

#[derive(Args, Clone)]
struct ProbeArgs {
    /// URL to check, http:// only.
    #[arg(long, default_value = "http://127.0.0.1:4268/readyz")]
    url: String,
    /// Keep trying until 200 or this much time has passed (0: try once).
    #[arg(long, default_value = "0s", value_parser = config::parse_duration)]
    wait: Duration,
}

#[derive(Args, Clone, Default)]
struct CommonArgs {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "YC_IAM_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// Service-account authorized key file (overrides the config file).
    #[arg(long, env = "YC_IAM_SIDECAR_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// File holding a Yandex OAuth token (overrides the config file).
    #[arg(
        long,
        env = "YC_IAM_SIDECAR_OAUTH_TOKEN_FILE",
        conflicts_with = "key_file"
    )]
    oauth_token_file: Option<PathBuf>,
    /// IAM endpoint (overrides iam.endpoint).
    #[arg(long, env = "YC_IAM_SIDECAR_IAM_ENDPOINT")]
    iam_endpoint: Option<String>,
    /// Log format.
    #[arg(long, value_enum, env = "YC_IAM_SIDECAR_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to serve on, IP:PORT; repeat for several (replaces http.listen).
    #[arg(
        long,
        short = 'l',
        env = "YC_IAM_SIDECAR_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<String>,
}

#[derive(Args, Clone)]
struct TokenArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Give up on transient IAM failures after this long.
    #[arg(long, default_value = "30s", value_parser = config::parse_duration)]
    timeout: Duration,
    /// Write the token to this file (atomically, mode --mode) instead of stdout.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Format of the --output file.
    #[arg(long, value_enum, default_value = "raw")]
    format: SinkFormat,
    /// Permission bits of the --output file, octal; never writable by others.
    #[arg(long, default_value = "0600", value_parser = token_file_mode)]
    mode: u32,
}

fn token_file_mode(text: &str) -> Result<u32, String> {
    let mode = config::parse_mode(text)?;
    if mode & 0o002 != 0 {
        return Err("a token file must not be writable by others".to_owned());
    }
    Ok(mode)
}

#[derive(Args, Clone)]
struct DevArgs {
    /// Address to serve on, IP:PORT; repeat for several.
    #[arg(long, short = 'l', value_delimiter = ',')]
    listen: Vec<String>,
    /// Lifetime of the emulator's tokens; short, so renewals show in the log.
    #[arg(long, default_value = "10m", value_parser = config::parse_duration)]
    token_lifetime: Duration,
    /// Log format.
    #[arg(long, value_enum, env = "YC_IAM_SIDECAR_LOG_FORMAT")]
    log_format: Option<LogFormat>,
}

impl CommonArgs {
    fn overrides(&self, listen: Vec<String>) -> Overrides {
        Overrides {
            listen,
            key_file: self.key_file.clone(),
            oauth_token_file: self.oauth_token_file.clone(),
            iam_endpoint: self.iam_endpoint.clone(),
            log_format: self.log_format,
        }
    }

    fn settings(&self, listen: Vec<String>) -> Result<Settings, config::ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        Settings::load(self.config.as_deref(), &self.overrides(listen), &env)
    }
}

/// A failure with the exit code it maps to. Printed as one line on stderr.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl ToString) -> Self {
        Self {
            code,
            message: message.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EX_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match runtime(std::env::var(ENV_WORKER_THREADS).ok().as_deref()) {
        Ok(runtime) => runtime,
        Err(failure) => {
            eprintln!("yc-iam-sidecar: error: {}", failure.message);
            return ExitCode::from(failure.code);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::Token(args)) => token(args).await,
            Some(Command::CheckConfig(args)) => check_config(args),
            Some(Command::Dev(args)) => dev(args).await,
            Some(Command::Probe(args)) => probe(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // One line on stderr, whatever the log format: supervisors show it as it is.
            eprintln!("yc-iam-sidecar: error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

const ENV_WORKER_THREADS: &str = "YC_IAM_SIDECAR_WORKER_THREADS";

/// The async runtime: `worker_threads` (from the environment; it must be known before anything
/// else runs) worker threads, 2 by default; 0 runs everything on the main thread.
fn runtime(worker_threads: Option<&str>) -> Result<tokio::runtime::Runtime, Failure> {
    let threads = match worker_threads.map(str::trim) {
        None | Some("") => 2,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n <= 64 => n,
            _ => {
                return Err(Failure::new(
                    EX_CONFIG,
                    format!(
                        "{ENV_WORKER_THREADS}={text:?}: use a number of threads from 0 \
                         (everything on one thread) to 64"
                    ),
                ));
            }
        },
    };
    let mut builder = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build().map_err(|error| {
        Failure::new(
            EX_SOFTWARE,
            format!("cannot start the async runtime: {error}"),
        )
    })
}

fn init_logging(format: LogFormat, filter: &str) {
    // Validated with the rest of the settings (`RUST_LOG` included); "info" is only a guard.
    let filter: Targets = filter
        .parse()
        .unwrap_or_else(|_| Targets::new().with_default(Level::INFO));
    // The builder's own level (INFO unless set) would cap the filter; the filter decides.
    let builder = tracing_subscriber::fmt()
        .with_max_level(Level::TRACE)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.finish().with(filter).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .finish()
            .with(filter)
            .init(),
    }
}

/// Keeps secrets out of core dumps and away from same-user debuggers: no core file, and the
/// process is not dumpable (which also forbids ptrace attach by non-root processes).
fn harden_process() {
    if let Err(error) =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
    {
        tracing::warn!(%error, "cannot disable core dumps");
    }
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(%error, "cannot mark the process non-dumpable");
    }
}

fn load(args: &CommonArgs, listen: Vec<String>) -> Result<(Settings, Credentials), Failure> {
    let settings = args
        .settings(listen)
        .map_err(|e| Failure::new(EX_CONFIG, e))?;
    init_logging(settings.log.format, &settings.log.filter);
    harden_process();
    let credentials =
        Credentials::load(&settings.credentials).map_err(|e| Failure::new(EX_CONFIG, e))?;
    Ok((settings, credentials))
}

async fn serve(args: ServeArgs) -> Result<(), Failure> {
    let (settings, credentials) = load(&args.common, args.listen.clone())?;
    let iam = GrpcIam::new(&settings.iam).map_err(|e| Failure::new(EX_CONFIG, e))?;
    let listeners = daemon::bind(&settings).await.map_err(listen_failure)?;
    let initial = settings.clone();
    let reload: daemon::ReloadSource<GrpcIam> = Box::new(move || {
        let settings = args
            .common
            .settings(args.listen.clone())
            .map_err(|e| e.to_string())?;
        let credentials = Credentials::load(&settings.credentials).map_err(|e| e.to_string())?;
        let iam = GrpcIam::new(&settings.iam).map_err(|e| e.to_string())?;
        for (changed, what) in [
            (settings.http != initial.http, "[http]"),
            (
                settings.metrics_listen != initial.metrics_listen,
                "[metrics]",
            ),
            (settings.sink != initial.sink, "[sink]"),
            (
                settings.iam.revoke_on_shutdown != initial.iam.revoke_on_shutdown,
                "iam.revoke_on_shutdown",
            ),
        ] {
            if changed {
                tracing::warn!(
                    section = what,
                    "this change takes effect only after a restart"
                );
            }
        }
        Ok((Arc::new(credentials), settings.refresh, iam))
    });
    daemon::run(
        &settings,
        Arc::new(credentials),
        iam,
        listeners,
        shutdown_signal(),
        Some(reload),
    )
    .await;
    Ok(())
}

async fn token(args: TokenArgs) -> Result<(), Failure> {
    let (settings, credentials) = load(&args.common, Vec::new())?;
    let iam = GrpcIam::new(&settings.iam).map_err(|e| Failure::new(EX_CONFIG, e))?;
    let token = daemon::fetch_once(&settings, Arc::new(credentials), iam, args.timeout)
        .await
        .map_err(|e| {
            let code = if e.is_permanent() {
                EX_CONFIG
            } else {
                EX_UNAVAILABLE
            };
            Failure::new(code, e)
        })?;
    match args.output {
        None => println!("{}", token.expose_secret()),
        Some(path) => {
            let sink = FileSink::new(SinkSettings {
                path: path.clone(),
                format: args.format,
                mode: args.mode,
                owner: None,
                group: None,
                command: Vec::new(),
                signal: None,
                pid_file: None,
            });
            sink.write(&token)
                .map_err(|e| Failure::new(EX_CANTCREAT, e))?;
            tracing::info!(
                path = %path.display(),
                expires_at = %humantime::format_rfc3339_seconds(token.expires_at()),
                "token written"
            );
        }
    }
    Ok(())
}

async fn probe(args: ProbeArgs) -> Result<(), Failure> {
    let give_up = tokio::time::Instant::now() + args.wait;
    loop {
        let outcome = probe_once(&args.url).await;
        match outcome {
            Ok(200) => return Ok(()),
            _ if tokio::time::Instant::now() >= give_up => {
                let reason = match outcome {
                    Ok(status) => format!("{} answered {status}", args.url),
                    Err(e) => format!("{}: {e}", args.url),
                };
                return Err(Failure::new(1, reason));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// One GET over plain HTTP/1.1; returns the status code.
async fn probe_once(url: &str) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs can be probed")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(authority)
            .await
            .map_err(|e| e.to_string())?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| e.to_string())?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| "not an HTTP answer".to_owned())
    };
    tokio::time::timeout(Duration::from_secs(1), exchange)
        .await
        .map_err(|_| "no answer within 1s".to_owned())?
}

fn check_config(args: CommonArgs) -> Result<(), Failure> {
    let (settings, credentials) = load(&args, Vec::new())?;
    if let Some(path) = &settings.http.client_secret_file {
        yc_iam_sidecar::auth::ClientSecret::load(path).map_err(|e| Failure::new(EX_CONFIG, e))?;
    }
    GrpcIam::new(&settings.iam).map_err(|e| Failure::new(EX_CONFIG, e))?;
    let listen: Vec<String> = settings
        .http
        .listen
        .iter()
        .map(ToString::to_string)
        .collect();
    println!(
        "configuration OK: {}; IAM {}; listening on {}",
        credentials.describe(),
        settings.iam.endpoint,
        listen.join(", ")
    );
    Ok(())
}

async fn dev(args: DevArgs) -> Result<(), Failure> {
    let mut common = CommonArgs {
        log_format: args.log_format,
        ..CommonArgs::default()
    };
    let emulator_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(|e| {
            Failure::new(
                EX_UNAVAILABLE,
                format!("cannot start the IAM emulator: {e}"),
            )
        })?;
    let emulator_addr = emulator_listener
        .local_addr()
        .map_err(|e| Failure::new(EX_SOFTWARE, e))?;
    common.iam_endpoint = Some(format!("http://{emulator_addr}"));

    let key = emulator::generate_key("dev-key-id", "dev-service-account")
        .map_err(|e| Failure::new(EX_SOFTWARE, format!("cannot generate a key: {e}")))?;
    let emulator = Emulator::new(args.token_lifetime);
    emulator
        .trust_key(&key.key_id, &key.service_account_id, &key.public_key_pem)
        .map_err(|e| Failure::new(EX_SOFTWARE, e))?;
    let credentials = ServiceAccountKey::from_json(&key.json, "generated dev key".as_ref())
        .map_err(|e| Failure::new(EX_SOFTWARE, e))?;

    // Settings as for `serve`, minus credentials, which the dev key supplies: of the
    // environment only RUST_LOG counts.
    let env = |name: &str| match name {
        "RUST_LOG" => std::env::var(name).ok(),
        _ => None,
    };
    let overrides = Overrides {
        listen: args.listen,
        oauth_token_file: Some("unused".into()),
        ..common.overrides(Vec::new())
    };
    let settings =
        Settings::load(None, &overrides, &env).map_err(|e| Failure::new(EX_CONFIG, e))?;
    init_logging(settings.log.format, &settings.log.filter);
    tracing::warn!(
        emulator = %emulator_addr,
        token_lifetime = %humantime::format_duration(args.token_lifetime),
        "DEV MODE: tokens come from a built-in IAM emulator and are NOT valid for Yandex Cloud"
    );
    let iam = GrpcIam::new(&settings.iam).map_err(|e| Failure::new(EX_CONFIG, e))?;
    let listeners = daemon::bind(&settings).await.map_err(listen_failure)?;
    let (stop_emulator, emulator_stopped) = tokio::sync::oneshot::channel::<()>();
    let emulator_task = tokio::spawn(emulator.serve(emulator_listener, async {
        let _ = emulator_stopped.await;
    }));
    daemon::run(
        &settings,
        Arc::new(Credentials::ServiceAccountKey(credentials)),
        iam,
        listeners,
        shutdown_signal(),
        None,
    )
    .await;
    let _ = stop_emulator.send(());
    let _ = emulator_task.await;
    Ok(())
}

fn listen_failure(error: daemon::ListenError) -> Failure {
    match error {
        daemon::ListenError::Bind(e) => Failure::new(EX_UNAVAILABLE, e),
        daemon::ListenError::Secret(e) => Failure::new(EX_CONFIG, e),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}
