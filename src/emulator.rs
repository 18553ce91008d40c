//! A local stand-in for `IamTokenService`: verifies service-account JWTs with the public key the
//! way IAM does and issues fake tokens. Backs the `dev` command and the integration tests, which
//! script it to fail, stall, or answer strangely.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status};

use crate::credentials::{JWT_AUDIENCE, JWT_LIFETIME};
use crate::iam::proto::create_iam_token_request::Identity;
use crate::iam::proto::iam_token_service_server::{IamTokenService, IamTokenServiceServer};
use crate::iam::proto::{
    CreateIamTokenForServiceAccountRequest, CreateIamTokenRequest, CreateIamTokenResponse,
    RevokeIamTokenRequest, RevokeIamTokenResponse,
};
use crate::iam::system_time_to_timestamp;

/// Marks every token the emulator issues, so nobody mistakes one for a real credential.
pub const FAKE_TOKEN_LABEL: &str = "FAKE-NOT-VALID-FOR-YANDEX-CLOUD";

/// One scripted answer to a Create call; unscripted calls issue a token of the default lifetime.
#[derive(Debug, Clone)]
pub enum Step {
    /// Issue a new token valid for this long.
    Issue(Duration),
    /// Answer with the previously issued token and its original expiry.
    Repeat,
    /// Fail with this status code and message.
    Fail(Code, String),
    /// Wait this long before taking the next step (or the default).
    Stall(Duration),
    /// Answer exactly this, however wrong.
    Answer {
        iam_token: String,
        expires_at: Option<prost_types::Timestamp>,
    },
}

/// One Create call as the emulator saw it.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: SystemTime,
    /// `kid` from a JWT that verified.
    pub key_id: Option<String>,
    pub oauth: bool,
    /// The gRPC code answered; `Ok` for a token.
    pub code: Code,
}

struct TrustedKey {
    service_account_id: String,
    public_key: DecodingKey,
}

#[derive(Default)]
struct State {
    keys: Mutex<HashMap<String, TrustedKey>>,
    oauth_tokens: Mutex<Vec<String>>,
    script: Mutex<VecDeque<Step>>,
    default_lifetime: Mutex<Duration>,
    calls: Mutex<Vec<Call>>,
    issued: Mutex<Vec<(String, SystemTime)>>,
    revoked: Mutex<Vec<String>>,
    requests: AtomicU64,
}

/// The emulator; clones share state, so a test keeps one handle and serves another.
#[derive(Clone)]
pub struct Emulator {
    state: Arc<State>,
}

impl Default for Emulator {
    fn default() -> Self {
        Self::new(Duration::from_secs(12 * 3600))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Emulator {
    /// An emulator whose unscripted tokens live `default_lifetime`.
    pub fn new(default_lifetime: Duration) -> Self {
        let emulator = Self {
            state: Arc::default(),
        };
        *lock(&emulator.state.default_lifetime) = default_lifetime;
        emulator
    }

    /// Trusts JWTs signed by this key (`public_key_pem` is SubjectPublicKeyInfo PEM).
    pub fn trust_key(
        &self,
        key_id: &str,
        service_account_id: &str,
        public_key_pem: &str,
    ) -> Result<(), jsonwebtoken::errors::Error> {
        let public_key = DecodingKey::from_rsa_pem(public_key_pem.as_bytes())?;
        lock(&self.state.keys).insert(
            key_id.to_owned(),
            TrustedKey {
                service_account_id: service_account_id.to_owned(),
                public_key,
            },
        );
        Ok(())
    }

    /// Trusts the public half of a `key.json` as `yc iam key create` writes it.
    pub fn trust_key_file(&self, json: &[u8]) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Public {
            id: String,
            service_account_id: String,
            public_key: String,
        }
        let key: Public = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        self.trust_key(&key.id, &key.service_account_id, &key.public_key)
            .map_err(|e| e.to_string())
    }

    /// Accepts this OAuth token.
    pub fn trust_oauth_token(&self, token: &str) {
        lock(&self.state.oauth_tokens).push(token.to_owned());
    }

    /// Queues scripted answers.
    pub fn push(&self, steps: impl IntoIterator<Item = Step>) {
        lock(&self.state.script).extend(steps);
    }

    /// Drops every queued answer not yet used.
    pub fn clear_script(&self) {
        lock(&self.state.script).clear();
    }

    /// Changes the lifetime of unscripted tokens.
    pub fn set_default_lifetime(&self, lifetime: Duration) {
        *lock(&self.state.default_lifetime) = lifetime;
    }

    /// Every Create call so far.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state.calls).clone()
    }

    /// Every token issued so far with its expiry, oldest first.
    pub fn issued(&self) -> Vec<(String, SystemTime)> {
        lock(&self.state.issued).clone()
    }

    /// Tokens revoked through `Revoke`.
    pub fn revoked(&self) -> Vec<String> {
        lock(&self.state.revoked).clone()
    }

    /// Serves gRPC on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(IamTokenServiceServer::new(self))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown,
            )
            .await
    }

    /// Serves gRPC over TLS with the given PEM certificate chain and key.
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        cert_pem: &[u8],
        key_pem: &[u8],
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
            .add_service(IamTokenServiceServer::new(self))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                shutdown,
            )
            .await
    }

    fn next_request_id(&self) -> String {
        format!(
            "emulator-{}",
            self.state.requests.fetch_add(1, Ordering::Relaxed) + 1
        )
    }

    /// Checks the identity as IAM does; returns the key id of a verified JWT.
    fn verify(&self, identity: Option<Identity>) -> Result<(Option<String>, bool), Status> {
        match identity {
            None => Err(Status::invalid_argument(
                "One of the options must be selected",
            )),
            Some(Identity::YandexPassportOauthToken(token)) => {
                if lock(&self.state.oauth_tokens).contains(&token) {
                    Ok((None, true))
                } else {
                    Err(Status::unauthenticated(
                        "The OAuth token is invalid or revoked",
                    ))
                }
            }
            Some(Identity::Jwt(jwt)) => self.verify_jwt(&jwt).map(|kid| (Some(kid), false)),
        }
    }

    fn verify_jwt(&self, jwt: &str) -> Result<String, Status> {
        #[derive(Deserialize)]
        struct Claims {
            iss: String,
            iat: u64,
            exp: u64,
        }
        let header = jsonwebtoken::decode_header(jwt)
            .map_err(|_| Status::unauthenticated("The JWT is malformed"))?;
        if header.alg != Algorithm::PS256 {
            return Err(Status::unauthenticated("Only PS256 JWTs are accepted"));
        }
        let kid = header.kid.ok_or_else(|| {
            Status::unauthenticated("The required field 'kid' is missing from the JWT header")
        })?;
        let keys = lock(&self.state.keys);
        let key = keys
            .get(&kid)
            .ok_or_else(|| Status::unauthenticated(format!("Key '{kid}' was not found")))?;
        let mut validation = Validation::new(Algorithm::PS256);
        validation.set_audience(&[JWT_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(jwt, &key.public_key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    Status::unauthenticated("JWT signature validation fails")
                }
                other => Status::unauthenticated(format!("JWT validation fails: {other:?}")),
            })?
            .claims;
        if claims.iss != key.service_account_id {
            return Err(Status::unauthenticated(
                "The JWT issuer does not own the key",
            ));
        }
        if claims.exp.saturating_sub(claims.iat) > JWT_LIFETIME.as_secs() {
            return Err(Status::unauthenticated("The JWT lifetime exceeds one hour"));
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if claims.iat > now + 60 {
            return Err(Status::unauthenticated("The JWT is issued in the future"));
        }
        Ok(kid)
    }

    fn issue(&self, lifetime: Duration) -> CreateIamTokenResponse {
        let mut random = [0u8; 32];
        rand::fill(&mut random);
        let token = format!(
            "t1.{FAKE_TOKEN_LABEL}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
        );
        let expires_at = SystemTime::now() + lifetime;
        lock(&self.state.issued).push((token.clone(), expires_at));
        CreateIamTokenResponse {
            iam_token: token,
            expires_at: Some(system_time_to_timestamp(expires_at)),
        }
    }

    fn record(&self, key_id: Option<String>, oauth: bool, code: Code) {
        lock(&self.state.calls).push(Call {
            at: SystemTime::now(),
            key_id,
            oauth,
            code,
        });
    }
}

fn with_request_id<T>(mut response: Response<T>, request_id: &str) -> Response<T> {
    if let Ok(value) = request_id.parse() {
        response.metadata_mut().insert("x-request-id", value);
    }
    response
}

fn status_with_request_id(mut status: Status, request_id: &str) -> Status {
    if let Ok(value) = request_id.parse() {
        status.metadata_mut().insert("x-request-id", value);
    }
    status
}

#[tonic::async_trait]
impl IamTokenService for Emulator {
    async fn create(
        &self,
        request: Request<CreateIamTokenRequest>,
    ) -> Result<Response<CreateIamTokenResponse>, Status> {
        let request_id = self.next_request_id();
        let (key_id, oauth) = match self.verify(request.into_inner().identity) {
            Ok(who) => who,
            Err(status) => {
                self.record(None, false, status.code());
                return Err(status_with_request_id(status, &request_id));
            }
        };
        loop {
            let step = lock(&self.state.script).pop_front();
            let answer = match step {
                Some(Step::Stall(pause)) => {
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Some(Step::Fail(code, message)) => Err(Status::new(code, message)),
                Some(Step::Issue(lifetime)) => Ok(self.issue(lifetime)),
                Some(Step::Repeat) => match lock(&self.state.issued).last().cloned() {
                    Some((iam_token, expires_at)) => Ok(CreateIamTokenResponse {
                        iam_token,
                        expires_at: Some(system_time_to_timestamp(expires_at)),
                    }),
                    None => Err(Status::internal("emulator: nothing to repeat")),
                },
                Some(Step::Answer {
                    iam_token,
                    expires_at,
                }) => Ok(CreateIamTokenResponse {
                    iam_token,
                    expires_at,
                }),
                None => {
                    let lifetime = *lock(&self.state.default_lifetime);
                    Ok(self.issue(lifetime))
                }
            };
            let code = answer.as_ref().map_or_else(Status::code, |_| Code::Ok);
            self.record(key_id, oauth, code);
            return match answer {
                Ok(body) => Ok(with_request_id(Response::new(body), &request_id)),
                Err(status) => Err(status_with_request_id(status, &request_id)),
            };
        }
    }

    async fn create_for_service_account(
        &self,
        _request: Request<CreateIamTokenForServiceAccountRequest>,
    ) -> Result<Response<CreateIamTokenResponse>, Status> {
        Err(Status::unimplemented(
            "the emulator does not impersonate service accounts",
        ))
    }

    async fn revoke(
        &self,
        request: Request<RevokeIamTokenRequest>,
    ) -> Result<Response<RevokeIamTokenResponse>, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let token = request.into_inner().iam_token;
        let known = lock(&self.state.issued).iter().any(|(t, _)| *t == token);
        if bearer.as_deref() != Some(token.as_str()) || !known {
            return Err(Status::unauthenticated("The token is not valid"));
        }
        lock(&self.state.revoked).push(token);
        Ok(Response::new(RevokeIamTokenResponse {
            subject_id: "emulated-subject".to_owned(),
        }))
    }
}

/// A freshly generated RSA-2048 key in `yc iam key create` format, for `dev` and tests.
pub struct GeneratedKey {
    /// The key file JSON, preamble line included.
    pub json: zeroize::Zeroizing<Vec<u8>>,
    pub key_id: String,
    pub service_account_id: String,
    pub public_key_pem: String,
}

/// Generates a key pair with aws-lc-rs and writes it out as `yc` would.
pub fn generate_key(key_id: &str, service_account_id: &str) -> Result<GeneratedKey, String> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::{KeyPair, KeySize};
    use aws_lc_rs::signature::KeyPair as _;
    let pair = KeyPair::generate(KeySize::Rsa2048).map_err(|e| e.to_string())?;
    let private = pair.as_der().map_err(|e| e.to_string())?;
    let public = pair.public_key().as_der().map_err(|e| e.to_string())?;
    let private_pem = zeroize::Zeroizing::new(pem("PRIVATE KEY", private.as_ref()));
    let public_key_pem = pem("PUBLIC KEY", public.as_ref());
    let json = serde_json::json!({
        "id": key_id,
        "service_account_id": service_account_id,
        "created_at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "key_algorithm": "RSA_2048",
        "public_key": public_key_pem,
        "private_key": format!(
            "PLEASE DO NOT REMOVE THIS LINE! Yandex.Cloud SA Key ID {key_id}\n{}",
            *private_pem
        ),
    });
    Ok(GeneratedKey {
        json: zeroize::Zeroizing::new(serde_json::to_vec_pretty(&json).map_err(|e| e.to_string())?),
        key_id: key_id.to_owned(),
        service_account_id: service_account_id.to_owned(),
        public_key_pem,
    })
}

fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("key_id", &self.key_id)
            .field("service_account_id", &self.service_account_id)
            .finish_non_exhaustive()
    }
}
