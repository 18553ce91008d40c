//! The IAM token as held in memory: the secret, its expiry on both clocks, and the rule that
//! decides whether it may still be served.

use std::fmt;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::secret::SecretString;

/// IAM tokens live at most 12 hours (Yandex Cloud documentation). A longer `expires_at` is capped.
pub const MAX_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Longest token accepted. Real ones are a few hundred characters; the cap keeps a broken answer
/// from filling memory, headers or files.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Why an IAM answer was refused. Never carries the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    #[error("IAM returned an empty token")]
    Empty,
    #[error("IAM returned a {len}-character token, longer than the {MAX_TOKEN_LEN} accepted")]
    TooLong { len: usize },
    #[error(
        "IAM returned a token with a character not allowed in a bearer token at position {position} \
         (whitespace, control, quote or non-ASCII)"
    )]
    BadCharacter { position: usize },
    #[error("IAM returned a token without expires_at")]
    MissingExpiry,
    #[error("IAM returned an expires_at that is not a valid time")]
    BadExpiry,
    #[error("IAM returned a token that expired {ago} ago (expires_at {expires_at})")]
    AlreadyExpired { expires_at: String, ago: String },
}

/// A token together with its expiry.
///
/// The wall-clock `expires_at` from IAM is converted once, on receipt, into a deadline on tokio's
/// monotonic clock. Serving checks both: the monotonic one survives wall-clock jumps, the wall one
/// catches a suspended machine (the monotonic clock stops while suspended).
pub struct IamToken {
    secret: SecretString,
    expires_at: SystemTime,
    valid_until: Instant,
    margin: Duration,
    received_at: Instant,
}

impl IamToken {
    /// Accepts an IAM answer received at (`mono_now`, `wall_now`). `margin` is the configured safety
    /// margin; it shrinks to a tenth of the lifetime for short-lived tokens. Returns the token and
    /// whether its lifetime had to be capped to 12 hours.
    pub fn accept(
        token: String,
        expires_at: Option<SystemTime>,
        mono_now: Instant,
        wall_now: SystemTime,
        margin: Duration,
    ) -> Result<(Self, bool), InvalidToken> {
        let secret = SecretString::new(token);
        validate_bearer(secret.expose_secret())?;
        let expires_at = expires_at.ok_or(InvalidToken::MissingExpiry)?;
        let lifetime = match expires_at.duration_since(wall_now) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => Duration::ZERO,
            Err(e) => {
                return Err(InvalidToken::AlreadyExpired {
                    expires_at: humantime::format_rfc3339_seconds(expires_at).to_string(),
                    ago: humantime::format_duration(round_secs(e.duration())).to_string(),
                });
            }
        };
        if lifetime.is_zero() {
            return Err(InvalidToken::AlreadyExpired {
                expires_at: humantime::format_rfc3339_seconds(expires_at).to_string(),
                ago: "0s".to_owned(),
            });
        }
        let capped = lifetime > MAX_LIFETIME;
        let lifetime = lifetime.min(MAX_LIFETIME);
        let token = IamToken {
            secret,
            expires_at: wall_now + lifetime,
            valid_until: mono_now + lifetime,
            margin: margin.min(lifetime / 10),
            received_at: mono_now,
        };
        Ok((token, capped))
    }

    /// The token. Call only where it is handed to a client on purpose.
    pub fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }

    /// Wall-clock expiry (capped to 12 hours from receipt).
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Monotonic expiry.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    pub fn received_at(&self) -> Instant {
        self.received_at
    }

    /// The safety margin in force for this token.
    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// Time left before expiry if the token may be served at (`mono_now`, `wall_now`): both clocks
    /// must show more than the margin left. The shorter of the two remainders is returned.
    pub fn servable_for(&self, mono_now: Instant, wall_now: SystemTime) -> Option<Duration> {
        let mono_left = self.valid_until.checked_duration_since(mono_now)?;
        let wall_left = self.expires_at.duration_since(wall_now).ok()?;
        let left = mono_left.min(wall_left);
        (left > self.margin).then_some(left)
    }

    /// Time left on the monotonic clock, zero once expired.
    pub fn remaining(&self, mono_now: Instant) -> Duration {
        self.valid_until.saturating_duration_since(mono_now)
    }

    /// True when both tokens carry the same secret (IAM may hand out the same token again).
    pub fn same_secret(&self, other: &IamToken) -> bool {
        self.secret == other.secret
    }
}

impl fmt::Debug for IamToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IamToken")
            .field("secret", &self.secret)
            .field(
                "expires_at",
                &humantime::format_rfc3339_seconds(self.expires_at),
            )
            .field("margin", &self.margin)
            .finish()
    }
}

/// Checks the RFC 6750 `b64token` grammar: `[A-Za-z0-9-._~+/]+ "="*`. Anything else could break a
/// header, a JSON body or a file line, and no real IAM token contains it.
pub fn validate_bearer(token: &str) -> Result<(), InvalidToken> {
    if token.is_empty() {
        return Err(InvalidToken::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(InvalidToken::TooLong { len: token.len() });
    }
    let body_end = token.trim_end_matches('=').len();
    if body_end == 0 {
        return Err(InvalidToken::BadCharacter { position: 0 });
    }
    for (position, b) in token.bytes().enumerate() {
        let ok = if position < body_end {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        } else {
            b == b'='
        };
        if !ok {
            return Err(InvalidToken::BadCharacter { position });
        }
    }
    Ok(())
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARGIN: Duration = Duration::from_secs(300);

    fn accept(lifetime_secs: i64) -> Result<(IamToken, bool), InvalidToken> {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let expires = if lifetime_secs >= 0 {
            wall + Duration::from_secs(lifetime_secs as u64)
        } else {
            wall - Duration::from_secs((-lifetime_secs) as u64)
        };
        IamToken::accept("t1.abc".into(), Some(expires), Instant::now(), wall, MARGIN)
    }

    #[test]
    fn bearer_grammar() {
        for ok in ["t1.9euelZq-abc_DEF~+/", "t1.x==", "y0_AgAAAA"] {
            assert_eq!(validate_bearer(ok), Ok(()), "{ok}");
        }
        let bad = [
            ("", InvalidToken::Empty),
            ("t1.a b", InvalidToken::BadCharacter { position: 4 }),
            (
                "t1.a\r\nX-Evil: 1",
                InvalidToken::BadCharacter { position: 4 },
            ),
            ("t1.\"", InvalidToken::BadCharacter { position: 3 }),
            ("t1.ы", InvalidToken::BadCharacter { position: 3 }),
            ("t1.a=b", InvalidToken::BadCharacter { position: 4 }),
            ("==", InvalidToken::BadCharacter { position: 0 }),
        ];
        for (token, want) in bad {
            assert_eq!(validate_bearer(token), Err(want), "{token:?}");
        }
        let long = format!("t1.{}", "a".repeat(MAX_TOKEN_LEN));
        assert_eq!(
            validate_bearer(&long),
            Err(InvalidToken::TooLong {
                len: MAX_TOKEN_LEN + 3
            })
        );
    }

    #[test]
    fn expiry_in_the_past_or_now_is_refused() {
        assert!(matches!(
            accept(-5),
            Err(InvalidToken::AlreadyExpired { .. })
        ));
        assert!(matches!(
            accept(0),
            Err(InvalidToken::AlreadyExpired { .. })
        ));
        let wall = SystemTime::now();
        let missing = IamToken::accept("t1.a".into(), None, Instant::now(), wall, MARGIN);
        assert_eq!(missing.unwrap_err(), InvalidToken::MissingExpiry);
    }

    #[test]
    fn lifetime_beyond_twelve_hours_is_capped() {
        let (token, capped) = accept(48 * 3600).unwrap();
        assert!(capped);
        assert_eq!(token.valid_until() - token.received_at(), MAX_LIFETIME);
        let (_, capped) = accept(12 * 3600).unwrap();
        assert!(!capped);
    }

    #[test]
    fn margin_shrinks_for_short_lived_tokens() {
        assert_eq!(accept(12 * 3600).unwrap().0.margin(), MARGIN);
        assert_eq!(accept(60).unwrap().0.margin(), Duration::from_secs(6));
    }

    #[test]
    fn servable_only_while_both_clocks_leave_more_than_the_margin() {
        let mono = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let hour = Duration::from_secs(3600);
        let (token, _) =
            IamToken::accept("t1.a".into(), Some(wall + hour), mono, wall, MARGIN).unwrap();

        assert_eq!(token.servable_for(mono, wall), Some(hour));
        // Ten minutes in on both clocks.
        let ten = Duration::from_secs(600);
        assert_eq!(token.servable_for(mono + ten, wall + ten), Some(hour - ten));
        // Inside the margin.
        let late = hour - MARGIN;
        assert_eq!(token.servable_for(mono + late, wall + late), None);
        // Suspended: the monotonic clock stood still while the wall clock moved past expiry.
        assert_eq!(token.servable_for(mono, wall + hour * 2), None);
        // Wall clock set back a day: the monotonic clock still ends the token on time.
        let day = hour * 24;
        assert_eq!(token.servable_for(mono + late, wall - day), None);
        // Wall clock jumped forward: the shorter remainder is reported.
        assert_eq!(token.servable_for(mono, wall + ten), Some(hour - ten));
    }

    #[test]
    fn debug_redacts_the_token() {
        let (token, _) = accept(3600).unwrap();
        let shown = format!("{token:?}");
        assert!(!shown.contains("t1.abc"), "{shown}");
        assert!(shown.contains("****"), "{shown}");
    }
}
