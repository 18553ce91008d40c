//! The IAM client: one `IamTokenService/Create` call behind the [`IamApi`] seam, the tonic
//! implementation of it, and the classification of failures into transient and permanent.

use std::future::Future;
use std::time::{Duration, SystemTime};

use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::config::{IamSettings, is_loopback};
use crate::credentials::CredentialsError;
use crate::token::InvalidToken;

/// Code generated from `proto/yandex/cloud/iam/v1/iam_token_service.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("yandex.cloud.iam.v1");
}

use proto::iam_token_service_client::IamTokenServiceClient;
use proto::{CreateIamTokenRequest, create_iam_token_request::Identity};

/// A token as IAM returned it, before validation.
pub struct IssuedToken {
    pub iam_token: String,
    pub expires_at: Option<SystemTime>,
    /// `x-request-id` of the answer, for support.
    pub request_id: Option<String>,
}

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    #[error("IAM answered {code:?}: {message}{}", ids(.request_id, .server_trace_id))]
    Status {
        code: Code,
        message: String,
        request_id: Option<String>,
        server_trace_id: Option<String>,
    },
    #[error("IAM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("refused IAM's answer: {error}{}", ids(.request_id, &None))]
    BadAnswer {
        error: InvalidToken,
        request_id: Option<String>,
    },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

fn ids(request_id: &Option<String>, trace_id: &Option<String>) -> String {
    match (request_id, trace_id) {
        (Some(r), Some(t)) => format!(" (x-request-id {r}, x-server-trace-id {t})"),
        (Some(r), None) => format!(" (x-request-id {r})"),
        (None, Some(t)) => format!(" (x-server-trace-id {t})"),
        (None, None) => String::new(),
    }
}

impl IamError {
    /// True when retrying cannot help until the credentials or configuration change.
    pub fn is_permanent(&self) -> bool {
        match self {
            IamError::Status { code, .. } => matches!(
                code,
                Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied
            ),
            IamError::Credentials(_) => true,
            IamError::Timeout(_) | IamError::BadAnswer { .. } => false,
        }
    }

    /// The gRPC code, for logs and metrics.
    pub fn code(&self) -> Option<Code> {
        match self {
            IamError::Status { code, .. } => Some(*code),
            IamError::Timeout(_) => Some(Code::DeadlineExceeded),
            _ => None,
        }
    }

    pub fn from_status(status: &tonic::Status) -> Self {
        let header = |name: &str| {
            status
                .metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(clean)
        };
        IamError::Status {
            code: status.code(),
            message: clean(status.message()),
            request_id: header("x-request-id"),
            server_trace_id: header("x-server-trace-id"),
        }
    }
}

/// Keeps a remote message printable and short enough for one log line.
fn clean(text: &str) -> String {
    const MAX: usize = 300;
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX)
        .collect();
    if text.chars().count() > MAX {
        out.push('…');
    }
    out
}

/// The remote calls the sidecar makes. Production uses [`GrpcIam`]; tests script it.
pub trait IamApi: Send + Sync + 'static {
    /// `IamTokenService/Create`.
    fn create(
        &self,
        identity: Identity,
    ) -> impl Future<Output = Result<IssuedToken, IamError>> + Send;

    /// `IamTokenService/Revoke`, authenticated with the token itself.
    fn revoke(&self, token: &str) -> impl Future<Output = Result<(), IamError>> + Send;
}

/// `IamTokenService` over gRPC with tonic.
#[derive(Clone)]
pub struct GrpcIam {
    client: IamTokenServiceClient<Channel>,
    call_timeout: Duration,
}

/// Why the IAM client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("iam.endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("iam.ca_file {path}: {reason}")]
    CaFile {
        path: std::path::PathBuf,
        reason: String,
    },
}

impl GrpcIam {
    /// Builds the client. The channel connects lazily, so an IAM unreachable at startup is
    /// retried by the refresher rather than failing the process.
    pub fn new(settings: &IamSettings) -> Result<Self, ClientError> {
        let endpoint_error = |reason: String| ClientError::Endpoint {
            endpoint: settings.endpoint.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(settings.endpoint.clone())
            .map_err(|e| endpoint_error(e.to_string()))?
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(60))
            .keep_alive_timeout(Duration::from_secs(20))
            .user_agent(concat!("yc-iam-sidecar/", env!("CARGO_PKG_VERSION")))
            .map_err(|e| endpoint_error(e.to_string()))?;
        let uri = endpoint.uri().clone();
        match uri.scheme_str() {
            Some("https") => {
                let mut tls = ClientTlsConfig::new().with_webpki_roots();
                if let Some(path) = &settings.ca_file {
                    let pem = std::fs::read(path).map_err(|e| ClientError::CaFile {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                        return Err(ClientError::CaFile {
                            path: path.clone(),
                            reason: "holds no PEM certificate".to_owned(),
                        });
                    }
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                endpoint = endpoint
                    .tls_config(tls)
                    .map_err(|e| endpoint_error(e.to_string()))?;
            }
            _ => {
                let host = uri.host().unwrap_or_default();
                let host_ip = host.trim_start_matches('[').trim_end_matches(']');
                let local = host == "localhost" || host_ip.parse().is_ok_and(is_loopback);
                if !local {
                    tracing::warn!(
                        endpoint = %settings.endpoint,
                        "IAM endpoint uses plain http:// to a non-loopback host: the JWT and the \
                         token travel unencrypted"
                    );
                }
            }
        }
        Ok(Self {
            client: IamTokenServiceClient::new(endpoint.connect_lazy()),
            call_timeout: settings.call_timeout,
        })
    }
}

impl IamApi for GrpcIam {
    async fn create(&self, identity: Identity) -> Result<IssuedToken, IamError> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(CreateIamTokenRequest {
            identity: Some(identity),
        });
        // grpc-timeout tells IAM when to give up; the local deadline bounds connection set-up,
        // the call and any stall.
        request.set_timeout(self.call_timeout);
        let started = tokio::time::Instant::now();
        let call = tokio::time::timeout(self.call_timeout, client.create(request));
        let response = match call.await {
            Err(_) => return Err(IamError::Timeout(self.call_timeout)),
            Ok(Err(status)) => return Err(status_error(&status, started, self.call_timeout)),
            Ok(Ok(response)) => response,
        };
        let request_id = response
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(clean);
        let body = response.into_inner();
        Ok(IssuedToken {
            iam_token: body.iam_token,
            expires_at: body.expires_at.and_then(timestamp_to_system_time),
            request_id,
        })
    }

    async fn revoke(&self, token: &str) -> Result<(), IamError> {
        self.revoke_call(token).await
    }
}

impl GrpcIam {
    async fn revoke_call(&self, token: &str) -> Result<(), IamError> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(proto::RevokeIamTokenRequest {
            iam_token: token.to_owned(),
        });
        request.set_timeout(self.call_timeout);
        let mut bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| IamError::Status {
                code: Code::InvalidArgument,
                message: "token cannot be sent as a header".to_owned(),
                request_id: None,
                server_trace_id: None,
            })?;
        bearer.set_sensitive(true);
        request.metadata_mut().insert("authorization", bearer);
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(self.call_timeout, client.revoke(request)).await {
            Err(_) => Err(IamError::Timeout(self.call_timeout)),
            Ok(Err(status)) => Err(status_error(&status, started, self.call_timeout)),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

/// A status that ends a call at its deadline (IAM's answer to `grpc-timeout` may beat the local
/// timer by a hair) is the timeout it is, not a remote failure.
fn status_error(
    status: &tonic::Status,
    started: tokio::time::Instant,
    limit: Duration,
) -> IamError {
    let deadline_answer = matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled);
    if deadline_answer && started.elapsed() >= limit {
        return IamError::Timeout(limit);
    }
    IamError::from_status(status)
}

/// Converts a protobuf timestamp; `None` for values outside what `SystemTime` can hold.
pub fn timestamp_to_system_time(ts: prost_types::Timestamp) -> Option<SystemTime> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    let nanos = Duration::from_nanos(ts.nanos as u64);
    if ts.seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(ts.seconds as u64) + nanos)
    } else {
        SystemTime::UNIX_EPOCH
            .checked_sub(Duration::from_secs(ts.seconds.unsigned_abs()))?
            .checked_add(nanos)
    }
}

/// The inverse, for the emulator.
pub fn system_time_to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => prost_types::Timestamp {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        },
        Err(_) => prost_types::Timestamp {
            seconds: 0,
            nanos: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_the_reference() {
        let status = |code| IamError::Status {
            code,
            message: String::new(),
            request_id: None,
            server_trace_id: None,
        };
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
        ] {
            assert!(status(code).is_permanent(), "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
        ] {
            assert!(!status(code).is_permanent(), "{code:?}");
        }
        assert!(!IamError::Timeout(Duration::from_secs(1)).is_permanent());
    }

    #[test]
    fn status_error_carries_code_message_and_request_ids() {
        let mut status = tonic::Status::unauthenticated("Key 'abc' was not found\r\nspoof");
        status
            .metadata_mut()
            .insert("x-request-id", "req-123".parse().unwrap());
        status
            .metadata_mut()
            .insert("x-server-trace-id", "trace-9".parse().unwrap());
        let err = IamError::from_status(&status);
        assert_eq!(
            err.to_string(),
            "IAM answered Unauthenticated: Key 'abc' was not found  spoof \
             (x-request-id req-123, x-server-trace-id trace-9)"
        );
    }

    #[test]
    fn timestamps_convert_both_ways() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(
            timestamp_to_system_time(system_time_to_timestamp(t)),
            Some(t)
        );
        let bad = prost_types::Timestamp {
            seconds: 1,
            nanos: -1,
        };
        assert_eq!(timestamp_to_system_time(bad), None);
    }
}
