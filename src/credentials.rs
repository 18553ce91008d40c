//! Proof of identity for IAM: a service-account authorized key, signed into a fresh PS256 JWT for
//! every call, or a Yandex OAuth token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::config::CredentialsSource;
use crate::iam::proto::create_iam_token_request::Identity;
use crate::secret::SecretString;

/// The only audience IAM accepts in a service-account JWT.
pub const JWT_AUDIENCE: &str = "https://iam.api.cloud.yandex.net/iam/v1/tokens";

/// IAM refuses a JWT whose `exp - iat` exceeds one hour; every official SDK uses exactly that.
pub const JWT_LIFETIME: Duration = Duration::from_secs(3600);

/// IAM's limit on `yandex_passport_oauth_token`.
pub const MAX_OAUTH_TOKEN_LEN: usize = 4000;

/// Why credentials could not be loaded or used. Messages name the file and never quote key
/// material or tokens.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid authorized key file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: `{field}` is missing")]
    MissingField { path: PathBuf, field: &'static str },
    #[error(
        "{path} is a key of user account {user_account_id}; the sidecar needs a service account's \
         authorized key (`yc iam key create --service-account-name NAME -o key.json`)"
    )]
    UserAccountKey {
        path: PathBuf,
        user_account_id: String,
    },
    #[error("{path}: private_key holds no PEM block (no \"-----BEGIN\" line)")]
    NoPem { path: PathBuf },
    #[error(
        "{path}: private_key is encrypted; write the key unencrypted as `yc iam key create` does"
    )]
    EncryptedKey { path: PathBuf },
    #[error("{path}: private_key is not a usable RSA private key ({reason})")]
    BadKey { path: PathBuf, reason: String },
    #[error("{path}: the OAuth token file is empty")]
    EmptyOAuthToken { path: PathBuf },
    #[error(
        "{origin}: the OAuth token is {len} characters; IAM accepts at most {MAX_OAUTH_TOKEN_LEN}"
    )]
    OAuthTokenTooLong { origin: String, len: usize },
    #[error("{origin}: the OAuth token contains whitespace or control characters")]
    OAuthTokenBadCharacter { origin: String },
    #[error("cannot sign a JWT with key {key_id}: {reason}")]
    Sign { key_id: String, reason: String },
}

/// The fields of `key.json` we use. snake_case as `yc` writes it, camelCase as the REST API
/// returns it; unknown fields are ignored.
#[derive(Deserialize)]
struct KeyFile {
    id: Option<String>,
    #[serde(alias = "serviceAccountId")]
    service_account_id: Option<String>,
    #[serde(alias = "userAccountId")]
    user_account_id: Option<String>,
    #[serde(alias = "privateKey")]
    private_key: Option<Zeroizing<String>>,
}

/// A service account's authorized key, ready to sign JWTs.
pub struct ServiceAccountKey {
    key_id: String,
    service_account_id: String,
    signing_key: EncodingKey,
}

impl ServiceAccountKey {
    /// Loads a key file as written by `yc iam key create`.
    pub fn from_file(path: &Path) -> Result<Self, CredentialsError> {
        let bytes =
            Zeroizing::new(
                std::fs::read(path).map_err(|source| CredentialsError::Read {
                    path: path.to_owned(),
                    source,
                })?,
            );
        Self::from_json(&bytes, path)
    }

    /// Parses key-file JSON; `path` only names the source in errors.
    pub fn from_json(json: &[u8], path: &Path) -> Result<Self, CredentialsError> {
        let malformed = |reason: String| CredentialsError::Malformed {
            path: path.to_owned(),
            reason,
        };
        // serde_json's messages can quote the offending value; report only where it went wrong.
        let file: KeyFile = serde_json::from_slice(json).map_err(|e| {
            malformed(match e.classify() {
                serde_json::error::Category::Eof => "the JSON ends too early".to_owned(),
                serde_json::error::Category::Io => "the JSON could not be read".to_owned(),
                serde_json::error::Category::Syntax => {
                    format!(
                        "JSON syntax error at line {} column {}",
                        e.line(),
                        e.column()
                    )
                }
                serde_json::error::Category::Data => format!(
                    "unexpected JSON value at line {} column {} (expected an object of strings)",
                    e.line(),
                    e.column()
                ),
            })
        })?;
        let missing = |field| CredentialsError::MissingField {
            path: path.to_owned(),
            field,
        };
        if file.service_account_id.is_none()
            && let Some(user_account_id) = file.user_account_id
        {
            return Err(CredentialsError::UserAccountKey {
                path: path.to_owned(),
                user_account_id,
            });
        }
        let key_id = nonempty(file.id).ok_or_else(|| missing("id"))?;
        let service_account_id =
            nonempty(file.service_account_id).ok_or_else(|| missing("service_account_id"))?;
        let private_key = file.private_key.ok_or_else(|| missing("private_key"))?;

        // Keys issued since late 2023 open with "PLEASE DO NOT REMOVE THIS LINE! Yandex.Cloud SA
        // Key ID ..." before the PEM; parse from the first BEGIN line on.
        let start = private_key
            .find("-----BEGIN")
            .ok_or_else(|| CredentialsError::NoPem {
                path: path.to_owned(),
            })?;
        let pem = &private_key[start..];
        if pem.starts_with("-----BEGIN ENCRYPTED") {
            return Err(CredentialsError::EncryptedKey {
                path: path.to_owned(),
            });
        }
        let signing_key =
            EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| CredentialsError::BadKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        let key = ServiceAccountKey {
            key_id,
            service_account_id,
            signing_key,
        };
        // The PEM parser checks structure only; a trial signature proves the key really works,
        // so a broken key fails at startup rather than at the first refresh.
        key.sign_jwt(SystemTime::now())
            .map_err(|e| CredentialsError::BadKey {
                path: path.to_owned(),
                reason: match e {
                    CredentialsError::Sign { reason, .. } => reason,
                    other => other.to_string(),
                },
            })?;
        Ok(key)
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn service_account_id(&self) -> &str {
        &self.service_account_id
    }

    /// Signs a JWT for IAM's Create: PS256 (RSASSA-PSS, SHA-256, salt length 32), `kid` = key
    /// id, `iss` = service account id, valid for one hour from `now`.
    pub fn sign_jwt(&self, now: SystemTime) -> Result<SecretString, CredentialsError> {
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = JwtClaims {
            iss: &self.service_account_id,
            aud: JWT_AUDIENCE,
            iat,
            exp: iat + JWT_LIFETIME.as_secs(),
        };
        let mut header = Header::new(Algorithm::PS256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, &claims, &self.signing_key)
            .map(SecretString::new)
            .map_err(|e| CredentialsError::Sign {
                key_id: self.key_id.clone(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("key_id", &self.key_id)
            .field("service_account_id", &self.service_account_id)
            .field("private_key", &"****")
            .finish()
    }
}

/// The claims IAM checks.
#[derive(Serialize)]
pub struct JwtClaims<'a> {
    pub iss: &'a str,
    pub aud: &'a str,
    pub iat: u64,
    pub exp: u64,
}

/// What the sidecar presents to IAM.
pub enum Credentials {
    ServiceAccountKey(ServiceAccountKey),
    OAuthToken(SecretString),
}

impl Credentials {
    /// Loads credentials from their configured source.
    pub fn load(source: &CredentialsSource) -> Result<Self, CredentialsError> {
        let credentials = Self::load_unchecked(source)?;
        // Only for a file that worked: a broken one gets its single clear error line instead.
        if let CredentialsSource::KeyFile(path) | CredentialsSource::OAuthTokenFile(path) = source {
            warn_if_exposed(path);
        }
        Ok(credentials)
    }

    fn load_unchecked(source: &CredentialsSource) -> Result<Self, CredentialsError> {
        match source {
            CredentialsSource::KeyFile(path) => {
                ServiceAccountKey::from_file(path).map(Credentials::ServiceAccountKey)
            }
            CredentialsSource::OAuthTokenFile(path) => {
                let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                    CredentialsError::Read {
                        path: path.clone(),
                        source,
                    }
                })?);
                let token = text.trim();
                if token.is_empty() {
                    return Err(CredentialsError::EmptyOAuthToken { path: path.clone() });
                }
                oauth_token(token, &path.display().to_string())
            }
            CredentialsSource::OAuthTokenEnv(token) => {
                oauth_token(token.expose_secret(), crate::config::ENV_OAUTH_TOKEN)
            }
        }
    }

    /// The identity for one Create call; a key signs a fresh JWT at `now`.
    pub fn identity(&self, now: SystemTime) -> Result<Identity, CredentialsError> {
        Ok(match self {
            Credentials::ServiceAccountKey(key) => {
                Identity::Jwt(key.sign_jwt(now)?.expose_secret().to_owned())
            }
            Credentials::OAuthToken(token) => {
                Identity::YandexPassportOauthToken(token.expose_secret().to_owned())
            }
        })
    }

    /// Who these credentials are, for logs: never secret.
    pub fn describe(&self) -> String {
        match self {
            Credentials::ServiceAccountKey(key) => format!(
                "service account {} (key {})",
                key.service_account_id, key.key_id
            ),
            Credentials::OAuthToken(_) => "Yandex OAuth token".to_owned(),
        }
    }

    /// The service account, when known.
    pub fn service_account_id(&self) -> Option<&str> {
        match self {
            Credentials::ServiceAccountKey(key) => Some(key.service_account_id()),
            Credentials::OAuthToken(_) => None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::ServiceAccountKey(key) => key.fmt(f),
            Credentials::OAuthToken(token) => f.debug_tuple("OAuthToken").field(token).finish(),
        }
    }
}

/// Warns when a credentials file is readable by others, or by a group other than our own (a
/// Kubernetes Secret mounted with `fsGroup` is group-readable by the sidecar's own group).
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.mode();
    let foreign_group = meta.gid() != nix::unistd::getegid().as_raw();
    if mode & 0o004 != 0 || (mode & 0o040 != 0 && foreign_group) {
        tracing::warn!(
            path = %path.display(),
            mode = %format!("{:04o}", mode & 0o7777),
            "the credentials file is readable by other users; restrict it (chmod 0400 or 0600)"
        );
    }
}

fn oauth_token(token: &str, origin: &str) -> Result<Credentials, CredentialsError> {
    if token.len() > MAX_OAUTH_TOKEN_LEN {
        return Err(CredentialsError::OAuthTokenTooLong {
            origin: origin.to_owned(),
            len: token.len(),
        });
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(CredentialsError::OAuthTokenBadCharacter {
            origin: origin.to_owned(),
        });
    }
    Ok(Credentials::OAuthToken(SecretString::new(token.to_owned())))
}

fn nonempty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    fn public_key(name: &str) -> DecodingKey {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap();
        let pem = json
            .get("public_key")
            .or_else(|| json.get("publicKey"))
            .unwrap()
            .as_str()
            .unwrap();
        DecodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
    }

    #[derive(Debug, Deserialize)]
    struct Claims {
        iss: String,
        aud: String,
        iat: u64,
        exp: u64,
    }

    fn verify(jwt: &str, key: &DecodingKey) -> (jsonwebtoken::Header, Claims) {
        let mut validation = Validation::new(Algorithm::PS256);
        validation.set_audience(&[JWT_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Claims>(jwt, key, &validation).expect("signature verifies");
        (data.header, data.claims)
    }

    #[test]
    fn key_with_preamble_signs_a_verifiable_ps256_jwt() {
        let key = ServiceAccountKey::from_file(&fixture("sa-key-rsa2048.json")).unwrap();
        assert_eq!(key.key_id(), "ajetestkey2048pkcs8xx");
        assert_eq!(key.service_account_id(), "ajetestserviceaccount");

        let now = SystemTime::now();
        let jwt = key.sign_jwt(now).unwrap();
        let (header, claims) = verify(jwt.expose_secret(), &public_key("sa-key-rsa2048.json"));
        assert_eq!(header.alg, Algorithm::PS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some("ajetestkey2048pkcs8xx"));
        assert_eq!(claims.iss, "ajetestserviceaccount");
        assert_eq!(claims.aud, JWT_AUDIENCE);
        let now_secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(claims.iat, now_secs);
        assert_eq!(claims.exp - claims.iat, 3600);
    }

    #[test]
    fn jwt_header_is_exactly_what_iam_expects() {
        use base64::Engine;
        let key = ServiceAccountKey::from_file(&fixture("sa-key-rsa2048.json")).unwrap();
        let jwt = key.sign_jwt(SystemTime::now()).unwrap();
        let header_b64 = jwt.expose_secret().split('.').next().unwrap();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header_b64)
            .unwrap();
        assert_eq!(
            String::from_utf8(header).unwrap(),
            r#"{"typ":"JWT","alg":"PS256","kid":"ajetestkey2048pkcs8xx"}"#
        );
    }

    #[test]
    fn pss_signature_uses_a_32_byte_salt() {
        // RFC 7518 §3.5: PS256 uses a salt as long as the digest. Verify the raw signature with a
        // verifier that accepts only that salt length, independently of jsonwebtoken.
        use aws_lc_rs::signature::{RSA_PSS_2048_8192_SHA256, UnparsedPublicKey};
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for name in [
            "sa-key-rsa2048.json",
            "sa-key-rsa4096.json",
            "sa-key-pkcs1-camel.json",
        ] {
            let key = ServiceAccountKey::from_file(&fixture(name)).unwrap();
            let jwt = key.sign_jwt(SystemTime::now()).unwrap();
            let (message, signature) = jwt.expose_secret().rsplit_once('.').unwrap();
            let json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap();
            let pem = json
                .get("public_key")
                .or_else(|| json.get("publicKey"))
                .and_then(|v| v.as_str())
                .unwrap();
            let der = b64_pem_body(pem);
            let public = UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, der);
            public
                .verify(message.as_bytes(), &b64.decode(signature).unwrap())
                .unwrap_or_else(|_| panic!("{name}: PSS signature with 32-byte salt"));
        }
    }

    fn b64_pem_body(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn rsa_4096_and_pkcs1_camel_case_keys_load() {
        let big = ServiceAccountKey::from_file(&fixture("sa-key-rsa4096.json")).unwrap();
        assert_eq!(big.key_id(), "ajetestkey4096pkcs8xx");
        let pkcs1 = ServiceAccountKey::from_file(&fixture("sa-key-pkcs1-camel.json")).unwrap();
        assert_eq!(pkcs1.key_id(), "ajetestkey2048pkcs1xx");
        assert_eq!(pkcs1.service_account_id(), "ajetestserviceaccount");
        let jwt = pkcs1.sign_jwt(SystemTime::now()).unwrap();
        verify(jwt.expose_secret(), &public_key("sa-key-pkcs1-camel.json"));
    }

    #[test]
    fn user_account_key_is_refused_by_name() {
        let err = ServiceAccountKey::from_file(&fixture("user-account-key.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("user account ajetestuseraccountxxx"), "{err}");
        assert!(err.contains("service account"), "{err}");
    }

    #[test]
    fn key_without_pem_block_says_so() {
        let err = ServiceAccountKey::from_file(&fixture("no-pem-key.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-pem-key.json"), "{err}");
        assert!(err.contains("no PEM block"), "{err}");
        assert!(!err.contains("MIIEvQ"), "no key material in errors: {err}");
    }

    #[test]
    fn broken_files_get_clear_errors_without_key_material() {
        let path = Path::new("/etc/key.json");
        let pem = std::fs::read_to_string(fixture("sa-key-rsa2048.json")).unwrap();
        let truncated = &pem[..pem.len() / 2];
        let corrupted_body = pem.replace("MII", "AAA");
        let cases: [(&[u8], &str); 6] = [
            (b"", "ends too early"),
            (b"{\"id\": ", "ends too early"),
            (b"[1,2]", "unexpected JSON value"),
            (
                b"{\"id\":\"a\",\"service_account_id\":\"b\"}",
                "`private_key` is missing",
            ),
            (truncated.as_bytes(), "ends too early"),
            (corrupted_body.as_bytes(), "not a usable RSA private key"),
        ];
        for (json, want) in cases {
            let err = ServiceAccountKey::from_json(json, path)
                .unwrap_err()
                .to_string();
            assert!(err.contains("/etc/key.json"), "{err}");
            assert!(err.contains(want), "want {want:?}: {err}");
            assert!(!err.contains("PRIVATE KEY-----\n"), "{err}");
        }
        let missing = ServiceAccountKey::from_file(Path::new("/nonexistent/key.json"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("cannot read /nonexistent/key.json"),
            "{missing}"
        );
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let key = ServiceAccountKey::from_file(&fixture("sa-key-rsa2048.json")).unwrap();
        let creds = Credentials::ServiceAccountKey(key);
        let shown = format!("{creds:?}");
        assert!(
            shown.contains("ajetestkey2048pkcs8xx") && shown.contains("****"),
            "{shown}"
        );
        assert!(!shown.contains("MII"), "{shown}");
        let oauth = Credentials::OAuthToken(SecretString::new("y0_secret".into()));
        assert_eq!(format!("{oauth:?}"), "OAuthToken(****)");
    }

    #[test]
    fn oauth_token_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  y0_AgAAAAB  \n").unwrap();
        let creds = Credentials::load(&CredentialsSource::OAuthTokenFile(path.clone())).unwrap();
        match creds.identity(SystemTime::now()).unwrap() {
            Identity::YandexPassportOauthToken(t) => assert_eq!(t, "y0_AgAAAAB"),
            Identity::Jwt(_) => panic!("an OAuth token file produced a JWT identity"),
        }
        std::fs::write(&path, "\n").unwrap();
        let err = Credentials::load(&CredentialsSource::OAuthTokenFile(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty"), "{err}");
        std::fs::write(&path, "y0_a b").unwrap();
        let err = Credentials::load(&CredentialsSource::OAuthTokenFile(path))
            .unwrap_err()
            .to_string();
        assert!(err.contains("whitespace"), "{err}");
    }
}
