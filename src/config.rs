//! Configuration: the TOML file, command-line and environment overrides, validated once into typed
//! [`Settings`]. Every error names the file and the field.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::refresh::RefreshPolicy;
use crate::secret::SecretString;

/// The default port. Clear of the ports applications in the same pod usually take (80, 3000,
/// 5000, 8000, 8080, 9090 and friends) and below Linux's ephemeral range (32768+), so an outgoing
/// connection never holds it. "IAMT" on a phone keypad.
pub const DEFAULT_PORT: u16 = 4268;

/// Yandex Cloud's production IAM endpoint.
pub const DEFAULT_IAM_ENDPOINT: &str = "https://iam.api.cloud.yandex.net:443";

/// Environment variables read by the Yandex SDKs and the `yc` CLI; used when the configuration
/// names no credentials.
pub const ENV_KEY_FILE: &str = "YC_SERVICE_ACCOUNT_KEY_FILE";
pub const ENV_OAUTH_TOKEN: &str = "YC_TOKEN";

/// Why a configuration was refused. The message is one line naming the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{location}: {message}")]
    Parse { location: String, message: String },
    #[error("{origin}: {field}: {message}")]
    Invalid {
        origin: String,
        field: &'static str,
        message: String,
    },
}

/// The file as written. Every section and key is optional; unknown keys are an error so a typo
/// never silently falls back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub credentials: CredentialsSection,
    #[serde(default)]
    pub iam: IamSection,
    #[serde(default)]
    pub refresh: RefreshSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub sink: Option<SinkSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSection {
    pub service_account_key_file: Option<PathBuf>,
    pub oauth_token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IamSection {
    pub endpoint: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub call_timeout: Option<HumanDuration>,
    pub connect_timeout: Option<HumanDuration>,
    pub revoke_on_shutdown: Option<bool>,
    pub revoke_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSection {
    pub max_age: Option<HumanDuration>,
    pub renew_fraction: Option<f64>,
    pub jitter: Option<f64>,
    pub min_interval: Option<HumanDuration>,
    pub serve_margin: Option<HumanDuration>,
    pub backoff_initial: Option<HumanDuration>,
    pub backoff_max: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    pub listen: Option<Vec<String>>,
    pub allowed_hosts: Option<Vec<String>>,
    pub wait_for_token: Option<HumanDuration>,
    pub shutdown_grace: Option<HumanDuration>,
    pub unix_socket_mode: Option<String>,
    pub unix_socket_group: Option<u32>,
    pub authenticated_listen: Option<Vec<String>>,
    pub client_secret_file: Option<PathBuf>,
    pub max_connections: Option<usize>,
    pub header_read_timeout: Option<HumanDuration>,
    pub max_header_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSection {
    pub path: PathBuf,
    pub format: Option<SinkFormat>,
    pub mode: Option<String>,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub command: Option<Vec<String>>,
    pub signal: Option<String>,
    pub pid_file: Option<PathBuf>,
}

/// How the token is written to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    /// The bare token, no newline.
    #[default]
    Raw,
    /// `{"access_token","token_type","expires_at"}`.
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub format: Option<LogFormat>,
    pub filter: Option<String>,
}

/// A duration written the humantime way: `"90s"`, `"5m"`, `"1h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a humantime duration with a message that shows the accepted form.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "invalid duration {text:?}: {e} (write it like \"500ms\", \"90s\", \"5m\" or \"1h\")"
        )
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Values given on the command line or through `YC_IAM_SIDECAR_*` variables; they win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub key_file: Option<PathBuf>,
    pub oauth_token_file: Option<PathBuf>,
    pub iam_endpoint: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// Where the credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialsSource {
    /// A service-account authorized key file as written by `yc iam key create`.
    KeyFile(PathBuf),
    /// A file holding a Yandex OAuth token.
    OAuthTokenFile(PathBuf),
    /// A Yandex OAuth token taken from `YC_TOKEN`.
    OAuthTokenEnv(SecretString),
}

#[derive(Debug, Clone, PartialEq)]
pub struct IamSettings {
    pub endpoint: String,
    pub ca_file: Option<PathBuf>,
    /// Deadline of one Create call, connection included.
    pub call_timeout: Duration,
    pub connect_timeout: Duration,
    /// Revoke the tokens this process obtained when it shuts down.
    pub revoke_on_shutdown: bool,
    pub revoke_timeout: Duration,
}

/// Where to listen: a TCP address or a Unix socket path (`unix:/run/x.sock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => addr.fmt(f),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    pub listen: Vec<ListenAddr>,
    /// Listeners on which token requests must carry the client secret.
    pub authenticated_listen: Vec<ListenAddr>,
    pub client_secret_file: Option<PathBuf>,
    /// Permission bits and group of Unix sockets.
    pub unix_socket_mode: u32,
    pub unix_socket_group: Option<u32>,
    /// Open connections per listener; past it the oldest idle one is closed.
    pub max_connections: usize,
    /// A connection must send a complete request head within this long of becoming idle.
    pub header_read_timeout: Duration,
    /// Largest request head accepted (at least 8 KiB).
    pub max_header_bytes: usize,
    /// Extra `Host` header values accepted besides loopback addresses and `localhost`.
    pub allowed_hosts: Vec<String>,
    pub wait_for_token: Duration,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SinkSettings {
    pub path: PathBuf,
    pub format: SinkFormat,
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// Run after each write (argv; no shell).
    pub command: Vec<String>,
    /// Send this signal to the pid in `pid_file` after each write.
    pub signal: Option<String>,
    pub pid_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub credentials: CredentialsSource,
    pub iam: IamSettings,
    pub refresh: RefreshPolicy,
    pub http: HttpSettings,
    pub log: LogSettings,
    /// Separate listeners serving only `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Vec<SocketAddr>,
    pub sink: Option<SinkSettings>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: vec![ListenAddr::Tcp(SocketAddr::from((
                [127, 0, 0, 1],
                DEFAULT_PORT,
            )))],
            authenticated_listen: Vec::new(),
            client_secret_file: None,
            unix_socket_mode: 0o660,
            unix_socket_group: None,
            max_connections: 512,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 8192,
            allowed_hosts: Vec::new(),
            // The Python SDK gives up after 1 s; answering 503 before that lets it report a
            // clear error instead of a timeout.
            wait_for_token: Duration::from_millis(500),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Default for IamSettings {
    fn default() -> Self {
        Self {
            endpoint: DEFAULT_IAM_ENDPOINT.to_owned(),
            ca_file: None,
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            revoke_on_shutdown: false,
            revoke_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".to_owned(),
        }
    }
}

/// Reads and parses a config file without validating it.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses TOML text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (location, snippet) = match e.span() {
            Some(span) => {
                let line = text[..span.start].matches('\n').count() + 1;
                let line_text = text.lines().nth(line - 1).unwrap_or("").trim();
                (format!("{origin}:{line}"), format!(" (in `{line_text}`)"))
            }
            None => (origin.to_owned(), String::new()),
        };
        ConfigError::Parse {
            location,
            message: format!("{}{snippet}", e.message().trim()),
        }
    })
}

impl Settings {
    /// Loads `path` (if any), applies overrides and the environment, and validates the result.
    /// `env` is the process environment in production and a map in tests.
    pub fn load(
        path: Option<&Path>,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let (file, origin) = match path {
            Some(path) => (read_file(path)?, path.display().to_string()),
            None => (FileConfig::default(), "configuration".to_owned()),
        };
        Self::from_file_config(file, &origin, overrides, env)
    }

    pub fn from_file_config(
        file: FileConfig,
        origin: &str,
        overrides: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let invalid = |field: &'static str, message: String| ConfigError::Invalid {
            origin: origin.to_owned(),
            field,
            message,
        };

        let credentials = resolve_credentials(&file.credentials, overrides, env)
            .map_err(|m| invalid("credentials", m))?;

        let defaults = IamSettings::default();
        let endpoint = overrides
            .iam_endpoint
            .clone()
            .or(file.iam.endpoint)
            .unwrap_or(defaults.endpoint);
        validate_endpoint(&endpoint).map_err(|m| invalid("iam.endpoint", m))?;
        let iam = IamSettings {
            endpoint,
            ca_file: file.iam.ca_file,
            call_timeout: positive(file.iam.call_timeout, defaults.call_timeout)
                .map_err(|m| invalid("iam.call_timeout", m))?,
            connect_timeout: positive(file.iam.connect_timeout, defaults.connect_timeout)
                .map_err(|m| invalid("iam.connect_timeout", m))?,
            revoke_on_shutdown: file.iam.revoke_on_shutdown.unwrap_or(false),
            revoke_timeout: positive(file.iam.revoke_timeout, defaults.revoke_timeout)
                .map_err(|m| invalid("iam.revoke_timeout", m))?,
        };

        let refresh = refresh_policy(&file.refresh).map_err(|(f, m)| invalid(f, m))?;

        let http_defaults = HttpSettings::default();
        let listen_text = if !overrides.listen.is_empty() {
            overrides.listen.clone()
        } else {
            file.http.listen.unwrap_or_default()
        };
        let listen = if listen_text.is_empty() {
            http_defaults.listen
        } else {
            listen_text
                .iter()
                .map(|a| parse_listen(a))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| invalid("http.listen", m))?
        };
        let allowed_hosts = file.http.allowed_hosts.unwrap_or_default();
        for host in &allowed_hosts {
            if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
                return Err(invalid(
                    "http.allowed_hosts",
                    format!("{host:?} is not a host name"),
                ));
            }
        }
        let unix_socket_mode = match &file.http.unix_socket_mode {
            None => http_defaults.unix_socket_mode,
            Some(text) => parse_mode(text).map_err(|m| invalid("http.unix_socket_mode", m))?,
        };
        let authenticated_listen = file
            .http
            .authenticated_listen
            .unwrap_or_default()
            .iter()
            .map(|a| parse_listen(a))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid("http.authenticated_listen", m))?;
        if authenticated_listen.is_empty() != file.http.client_secret_file.is_none() {
            return Err(invalid(
                "http.client_secret_file",
                "client_secret_file and authenticated_listen go together: name both or neither"
                    .to_owned(),
            ));
        }
        let max_connections = file
            .http
            .max_connections
            .unwrap_or(http_defaults.max_connections);
        if max_connections == 0 {
            return Err(invalid(
                "http.max_connections",
                "must be at least 1".to_owned(),
            ));
        }
        let max_header_bytes = file
            .http
            .max_header_bytes
            .unwrap_or(http_defaults.max_header_bytes);
        if !(8192..=1 << 20).contains(&max_header_bytes) {
            return Err(invalid(
                "http.max_header_bytes",
                format!("{max_header_bytes} is outside 8192..=1048576"),
            ));
        }
        let http = HttpSettings {
            listen,
            authenticated_listen,
            client_secret_file: file.http.client_secret_file,
            max_connections,
            header_read_timeout: positive(
                file.http.header_read_timeout,
                http_defaults.header_read_timeout,
            )
            .map_err(|m| invalid("http.header_read_timeout", m))?,
            max_header_bytes,
            unix_socket_mode,
            unix_socket_group: file.http.unix_socket_group,
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            wait_for_token: file
                .http
                .wait_for_token
                .map_or(http_defaults.wait_for_token, |d| d.0),
            shutdown_grace: file
                .http
                .shutdown_grace
                .map_or(http_defaults.shutdown_grace, |d| d.0),
        };

        let log_defaults = LogSettings::default();
        let log = LogSettings {
            format: overrides
                .log_format
                .or(file.log.format)
                .unwrap_or(log_defaults.format),
            filter: match env("RUST_LOG").filter(|v| !v.trim().is_empty()) {
                Some(filter) => validate_log_filter(&filter).map_err(|m| ConfigError::Invalid {
                    origin: "environment".to_owned(),
                    field: "RUST_LOG",
                    message: m,
                })?,
                None => match file.log.filter {
                    Some(filter) => {
                        validate_log_filter(&filter).map_err(|m| invalid("log.filter", m))?
                    }
                    None => log_defaults.filter,
                },
            },
        };

        let metrics_listen = file
            .metrics
            .listen
            .unwrap_or_default()
            .iter()
            .map(|a| match parse_listen(a)? {
                ListenAddr::Tcp(addr) => Ok(addr),
                ListenAddr::Unix(_) => Err("metrics listeners are TCP only".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid("metrics.listen", m))?;

        let sink = match file.sink {
            None => None,
            Some(section) => Some(sink_settings(section).map_err(|(f, m)| invalid(f, m))?),
        };

        Ok(Settings {
            credentials,
            iam,
            refresh,
            http,
            log,
            metrics_listen,
            sink,
        })
    }
}

/// Precedence: command line, then the config file, then the conventional `YC_*` variables.
fn resolve_credentials(
    section: &CredentialsSection,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CredentialsSource, String> {
    match (&overrides.key_file, &overrides.oauth_token_file) {
        (Some(_), Some(_)) => {
            return Err("give either --key-file or --oauth-token-file, not both".to_owned());
        }
        (Some(path), None) => return Ok(CredentialsSource::KeyFile(path.clone())),
        (None, Some(path)) => return Ok(CredentialsSource::OAuthTokenFile(path.clone())),
        (None, None) => {}
    }
    match (&section.service_account_key_file, &section.oauth_token_file) {
        (Some(_), Some(_)) => {
            return Err(
                "set either service_account_key_file or oauth_token_file, not both".to_owned(),
            );
        }
        (Some(path), None) => return Ok(CredentialsSource::KeyFile(path.clone())),
        (None, Some(path)) => return Ok(CredentialsSource::OAuthTokenFile(path.clone())),
        (None, None) => {}
    }
    let nonempty = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if let Some(path) = nonempty(ENV_KEY_FILE) {
        return Ok(CredentialsSource::KeyFile(PathBuf::from(path)));
    }
    if let Some(token) = nonempty(ENV_OAUTH_TOKEN) {
        return Ok(CredentialsSource::OAuthTokenEnv(SecretString::new(
            token.trim().to_owned(),
        )));
    }
    Err(format!(
        "no credentials: set [credentials] service_account_key_file (or oauth_token_file), \
         pass --key-file, or set {ENV_KEY_FILE} (or {ENV_OAUTH_TOKEN})"
    ))
}

/// Log filter directives: `LEVEL` and `TARGET=LEVEL`, comma-separated (`info,hyper=warn`).
/// Span and field filters (`[span{field=value}]`) are not supported; they would pull a regex
/// engine into the binary for no use a sidecar has.
pub fn validate_log_filter(filter: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let filter = filter.trim();
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word.trim()));
    // A bare word would otherwise mean "this target at every level", so a misspelt level
    // ("infor") would quietly switch logging off.
    let directives_ok = filter
        .split(',')
        .all(|directive| match directive.split_once('=') {
            Some((target, level)) => !target.trim().is_empty() && is_level(level),
            None => is_level(directive),
        });
    match filter.parse::<tracing_subscriber::filter::Targets>() {
        Ok(_) if directives_ok => Ok(filter.to_owned()),
        _ => Err(format!(
            "{filter:?} is not a log filter: use LEVEL or TARGET=LEVEL, comma-separated, \
             e.g. \"info,yc_iam_sidecar=debug\"; levels: {}",
            LEVELS.join(", ")
        )),
    }
}

fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => {
            return Err(format!(
                "{endpoint:?} must start with https:// (or http:// for a local test IAM)"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} names no host"));
    }
    Ok(())
}

fn positive(value: Option<HumanDuration>, default: Duration) -> Result<Duration, String> {
    match value {
        None => Ok(default),
        Some(HumanDuration(d)) if d.is_zero() => Err("must be greater than zero".to_owned()),
        Some(HumanDuration(d)) => Ok(d),
    }
}

fn refresh_policy(section: &RefreshSection) -> Result<RefreshPolicy, (&'static str, String)> {
    let d = RefreshPolicy::default();
    let fraction = |field: &'static str, value: Option<f64>, default: f64, max_inclusive: f64| {
        let v = value.unwrap_or(default);
        if v.is_finite() && v >= 0.0 && v <= max_inclusive {
            Ok(v)
        } else {
            Err((field, format!("{v} is outside 0..={max_inclusive}")))
        }
    };
    let policy = RefreshPolicy {
        max_age: positive(section.max_age, d.max_age).map_err(|m| ("refresh.max_age", m))?,
        renew_fraction: fraction(
            "refresh.renew_fraction",
            section.renew_fraction,
            d.renew_fraction,
            0.9,
        )?,
        jitter: fraction("refresh.jitter", section.jitter, d.jitter, 0.5)?,
        min_interval: positive(section.min_interval, d.min_interval)
            .map_err(|m| ("refresh.min_interval", m))?,
        serve_margin: section.serve_margin.map_or(d.serve_margin, |v| v.0),
        backoff_initial: positive(section.backoff_initial, d.backoff_initial)
            .map_err(|m| ("refresh.backoff_initial", m))?,
        backoff_max: positive(section.backoff_max, d.backoff_max)
            .map_err(|m| ("refresh.backoff_max", m))?,
    };
    if policy.renew_fraction == 0.0 {
        return Err((
            "refresh.renew_fraction",
            "must be greater than zero".to_owned(),
        ));
    }
    if policy.backoff_max < policy.backoff_initial {
        return Err((
            "refresh.backoff_max",
            format!(
                "{} is shorter than refresh.backoff_initial ({})",
                humantime::format_duration(policy.backoff_max),
                humantime::format_duration(policy.backoff_initial)
            ),
        ));
    }
    if policy.min_interval > policy.max_age {
        return Err((
            "refresh.min_interval",
            "is longer than refresh.max_age".to_owned(),
        ));
    }
    Ok(policy)
}

/// Parses one listen address: `IP:PORT`, with IPv6 in brackets (`[::1]:4268`), or
/// `unix:/absolute/path`.
pub fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    let text = text.trim();
    if let Some(path) = text.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(format!("{text:?}: a Unix socket path must be absolute"));
        }
        return Ok(ListenAddr::Unix(path));
    }
    text.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
        format!(
            "{text:?} is not an address like \"127.0.0.1:{DEFAULT_PORT}\", \"[::1]:{DEFAULT_PORT}\" \
             or \"unix:/run/yc-iam-sidecar.sock\""
        )
    })
}

/// Parses file permission bits written in octal, like `"0600"`.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim().trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("{text:?} is not an octal mode like \"0600\"")),
    }
}

fn sink_settings(section: SinkSection) -> Result<SinkSettings, (&'static str, String)> {
    if section.path.as_os_str().is_empty() || section.path.file_name().is_none() {
        return Err(("sink.path", "must name a file".to_owned()));
    }
    let mode = match &section.mode {
        None => 0o600,
        Some(text) => parse_mode(text).map_err(|m| ("sink.mode", m))?,
    };
    if mode & 0o002 != 0 {
        return Err((
            "sink.mode",
            "must not let others write the token file".to_owned(),
        ));
    }
    let command = section.command.unwrap_or_default();
    if command.first().is_some_and(String::is_empty) {
        return Err(("sink.command", "the program name is empty".to_owned()));
    }
    if section.signal.is_some() != section.pid_file.is_some() {
        return Err((
            "sink.signal",
            "signal and pid_file go together: name both or neither".to_owned(),
        ));
    }
    if let Some(signal) = &section.signal {
        crate::sink::parse_signal(signal).map_err(|m| ("sink.signal", m))?;
    }
    Ok(SinkSettings {
        path: section.path,
        format: section.format.unwrap_or_default(),
        mode,
        owner: section.owner,
        group: section.group,
        command,
        signal: section.signal,
        pid_file: section.pid_file,
    })
}

/// True for addresses only this machine can reach.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn load_str(text: &str) -> Result<Settings, ConfigError> {
        let file = parse(text, "test.toml")?;
        Settings::from_file_config(file, "test.toml", &Overrides::default(), &no_env)
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let s = load_str("[credentials]\nservice_account_key_file = \"/k.json\"\n").unwrap();
        assert_eq!(s.credentials, CredentialsSource::KeyFile("/k.json".into()));
        assert_eq!(s.iam.endpoint, DEFAULT_IAM_ENDPOINT);
        assert_eq!(
            s.http.listen,
            vec![ListenAddr::Tcp("127.0.0.1:4268".parse().unwrap())]
        );
        assert_eq!(s.refresh.max_age, Duration::from_secs(3600));
        assert_eq!(s.http.wait_for_token, Duration::from_millis(500));
    }

    #[test]
    fn log_filter_is_validated_and_rust_log_wins() {
        let base = "[credentials]\noauth_token_file = \"/t\"\n";
        let with = |filter: &str| format!("{base}[log]\nfilter = \"{filter}\"\n");
        assert_eq!(
            load_str(&with("warn,yc_iam_sidecar=debug"))
                .unwrap()
                .log
                .filter,
            "warn,yc_iam_sidecar=debug"
        );
        for bad in ["loud", "hyper=loud", "[span{x=1}]=debug"] {
            let err = load_str(&with(bad)).unwrap_err().to_string();
            assert!(err.contains("log.filter") && err.contains(bad), "{err}");
        }

        let rust_log =
            |value: &'static str| move |name: &str| (name == "RUST_LOG").then(|| value.to_owned());
        let loaded = |value: &'static str| {
            let file = parse(&with("warn"), "test.toml").unwrap();
            Settings::from_file_config(file, "test.toml", &Overrides::default(), &rust_log(value))
        };
        assert_eq!(loaded("trace").unwrap().log.filter, "trace");
        assert_eq!(
            loaded("  ").unwrap().log.filter,
            "warn",
            "a blank RUST_LOG is unset"
        );
        let err = loaded("verbose").unwrap_err().to_string();
        assert!(err.contains("RUST_LOG") && err.contains("verbose"), "{err}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = load_str("[refresh]\nmax_age = \"1h\"\nmax_agee = \"2h\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:3:"), "{err}");
        assert!(err.contains("max_agee"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }

    #[test]
    fn bad_duration_names_the_line_and_the_value() {
        let err = load_str(
            "[credentials]\noauth_token_file = \"/t\"\n[refresh]\nmax_age = \"5 parsecs\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("test.toml:4:"), "{err}");
        assert!(
            err.contains("5 parsecs") && err.contains("max_age"),
            "{err}"
        );
    }

    #[test]
    fn invalid_values_name_the_field() {
        let cases = [
            ("[http]\nlisten = [\"localhost\"]", "http.listen"),
            ("[iam]\nendpoint = \"ftp://x\"", "iam.endpoint"),
            ("[refresh]\njitter = 2.0", "refresh.jitter"),
            ("[refresh]\nmax_age = \"0s\"", "refresh.max_age"),
            (
                "[refresh]\nbackoff_initial = \"2m\"\nbackoff_max = \"1m\"",
                "refresh.backoff_max",
            ),
            ("[http]\nallowed_hosts = [\"a b\"]", "http.allowed_hosts"),
            ("[http]\nlisten = [\"unix:relative.sock\"]", "http.listen"),
            (
                "[http]\nunix_socket_mode = \"0999\"",
                "http.unix_socket_mode",
            ),
            ("[metrics]\nlisten = [\"unix:/m.sock\"]", "metrics.listen"),
            ("[sink]\npath = \"/t\"\nmode = \"0666\"", "sink.mode"),
            ("[sink]\npath = \"/t\"\nsignal = \"HUP\"", "sink.signal"),
            (
                "[sink]\npath = \"/t\"\nsignal = \"NOPE\"\npid_file = \"/p\"",
                "sink.signal",
            ),
            ("[iam]\nrevoke_timeout = \"0s\"", "iam.revoke_timeout"),
            (
                "[http]\nclient_secret_file = \"/s\"",
                "http.client_secret_file",
            ),
            (
                "[http]\nauthenticated_listen = [\"127.0.0.1:1\"]",
                "http.client_secret_file",
            ),
            ("[http]\nmax_connections = 0", "http.max_connections"),
            ("[http]\nmax_header_bytes = 100", "http.max_header_bytes"),
            (
                "[http]\nheader_read_timeout = \"0s\"",
                "http.header_read_timeout",
            ),
        ];
        for (body, field) in cases {
            let text = format!("[credentials]\noauth_token_file = \"/t\"\n{body}\n");
            let err = load_str(&text).unwrap_err().to_string();
            assert!(err.contains(field), "{body}: {err}");
            assert!(err.starts_with("test.toml: "), "{body}: {err}");
        }
    }

    #[test]
    fn both_credentials_is_an_error() {
        let err = load_str(
            "[credentials]\nservice_account_key_file = \"/k\"\noauth_token_file = \"/t\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
    }

    #[test]
    fn credentials_precedence_flag_file_env() {
        let env = |name: &str| match name {
            ENV_KEY_FILE => Some("/env/key.json".to_owned()),
            ENV_OAUTH_TOKEN => Some("y0_env".to_owned()),
            _ => None,
        };
        let file = || parse("[credentials]\noauth_token_file = \"/file/token\"\n", "t").unwrap();
        let flag = Overrides {
            key_file: Some("/flag/key.json".into()),
            ..Overrides::default()
        };
        let s = Settings::from_file_config(file(), "t", &flag, &env).unwrap();
        assert_eq!(
            s.credentials,
            CredentialsSource::KeyFile("/flag/key.json".into())
        );
        let s = Settings::from_file_config(file(), "t", &Overrides::default(), &env).unwrap();
        assert_eq!(
            s.credentials,
            CredentialsSource::OAuthTokenFile("/file/token".into())
        );
        let s = Settings::from_file_config(FileConfig::default(), "t", &Overrides::default(), &env)
            .unwrap();
        assert_eq!(
            s.credentials,
            CredentialsSource::KeyFile("/env/key.json".into())
        );
        let only_token = |name: &str| (name == ENV_OAUTH_TOKEN).then(|| "y0_env\n".to_owned());
        let s = Settings::from_file_config(
            FileConfig::default(),
            "t",
            &Overrides::default(),
            &only_token,
        )
        .unwrap();
        assert_eq!(
            s.credentials,
            CredentialsSource::OAuthTokenEnv(SecretString::new("y0_env".to_owned()))
        );
    }

    #[test]
    fn no_credentials_says_how_to_give_them() {
        let err = Settings::from_file_config(
            FileConfig::default(),
            "configuration",
            &Overrides::default(),
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(ENV_KEY_FILE) && err.contains("--key-file"),
            "{err}"
        );
    }

    #[test]
    fn listen_flags_replace_the_file_list() {
        let file = parse(
            "[credentials]\noauth_token_file = \"/t\"\n[http]\nlisten = [\"127.0.0.1:1\"]\n",
            "t",
        )
        .unwrap();
        let overrides = Overrides {
            listen: vec!["[::1]:9".to_owned(), "127.0.0.2:10".to_owned()],
            ..Overrides::default()
        };
        let s = Settings::from_file_config(file, "t", &overrides, &no_env).unwrap();
        assert_eq!(
            s.http.listen,
            vec![
                ListenAddr::Tcp("[::1]:9".parse().unwrap()),
                ListenAddr::Tcp("127.0.0.2:10".parse().unwrap())
            ]
        );
    }

    #[test]
    fn unix_listener_and_sink_parse() {
        let s = load_str(
            "[credentials]\noauth_token_file = \"/t\"\n[http]\nlisten = [\"unix:/run/y.sock\", \"127.0.0.1:1\"]\nunix_socket_mode = \"0640\"\nunix_socket_group = 42\n[sink]\npath = \"/run/token\"\nformat = \"json\"\nsignal = \"SIGHUP\"\npid_file = \"/run/app.pid\"\n",
        )
        .unwrap();
        assert_eq!(s.http.listen[0], ListenAddr::Unix("/run/y.sock".into()));
        assert_eq!(s.http.unix_socket_mode, 0o640);
        assert_eq!(s.http.unix_socket_group, Some(42));
        let sink = s.sink.unwrap();
        assert_eq!(sink.mode, 0o600);
        assert_eq!(sink.format, SinkFormat::Json);
        assert_eq!(sink.signal.as_deref(), Some("SIGHUP"));
    }

    #[test]
    fn loopback_covers_v4_v6_and_mapped() {
        for ip in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.1", "169.254.169.254", "::", "0.0.0.0"] {
            assert!(!is_loopback(ip.parse().unwrap()), "{ip}");
        }
    }
}
