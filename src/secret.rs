//! A string that must never be printed: tokens, JWTs, key material. Zeroized on drop.

use std::fmt;

use zeroize::Zeroizing;

/// Secret text. `Debug` prints `****`; there is no `Display`, no `Serialize`, and the only way to
/// read it is [`SecretString::expose_secret`], whose name is the warning.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The secret itself. Call it only where the value leaves the process on purpose: a gRPC
    /// request, an HTTP response body, a file sink.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let secret = SecretString::new("t1.very-secret".to_owned());
        assert_eq!(format!("{secret:?}"), "****");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(****)");
        assert_eq!(secret.expose_secret(), "t1.very-secret");
    }
}
