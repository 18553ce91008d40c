//! Opt-in client authentication: a shared secret read from a file (re-read when the file
//! changes) that clients present as `Authorization: Bearer <secret>`, compared in constant time.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::time::Instant;

use crate::secret::SecretString;

/// How often the file is checked for changes, at most.
const RECHECK: Duration = Duration::from_secs(1);

/// Shortest secret accepted without a warning.
const SHORT_SECRET: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read http.client_secret_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("http.client_secret_file {path} is empty")]
    Empty { path: PathBuf },
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    modified: i64,
    modified_nsec: i64,
    len: u64,
    inode: u64,
}

struct Loaded {
    secret: SecretString,
    stamp: Stamp,
}

/// The shared secret, cached and refreshed from its file.
pub struct ClientSecret {
    path: PathBuf,
    current: ArcSwap<Loaded>,
    /// When the file was last checked; only one request re-checks at a time.
    checked: Mutex<Instant>,
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSecret")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ClientSecret {
    /// Reads the secret; errors if the file is unreadable or empty.
    pub fn load(path: &Path) -> Result<Self, SecretFileError> {
        let loaded = read(path)?;
        if loaded.secret.len() < SHORT_SECRET {
            tracing::warn!(
                path = %path.display(),
                "http.client_secret_file holds a short secret; use at least {SHORT_SECRET} random characters"
            );
        }
        Ok(Self {
            path: path.to_owned(),
            current: ArcSwap::from_pointee(loaded),
            checked: Mutex::new(Instant::now()),
        })
    }

    /// True if `header` is `Bearer <secret>` with the current secret.
    pub fn verify(&self, header: Option<&HeaderValue>) -> bool {
        self.refresh_if_changed();
        let Some(presented) = header.and_then(|h| h.as_bytes().strip_prefix(b"Bearer ")) else {
            return false;
        };
        let current = self.current.load();
        constant_time_eq(presented, current.secret.expose_secret().as_bytes())
    }

    fn refresh_if_changed(&self) {
        let Ok(mut checked) = self.checked.try_lock() else {
            return; // another request is checking right now
        };
        if checked.elapsed() < RECHECK {
            return;
        }
        *checked = Instant::now();
        let Ok(meta) = std::fs::metadata(&self.path) else {
            tracing::warn!(path = %self.path.display(), "client secret file unreadable; keeping the previous secret");
            return;
        };
        if stamp(&meta) == self.current.load().stamp {
            return;
        }
        match read(&self.path) {
            Ok(loaded) => {
                self.current.store(std::sync::Arc::new(loaded));
                tracing::info!(path = %self.path.display(), "client secret reloaded");
            }
            Err(error) => {
                tracing::warn!(%error, "client secret not reloaded; keeping the previous secret")
            }
        }
    }
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    Stamp {
        modified: meta.mtime(),
        modified_nsec: meta.mtime_nsec(),
        len: meta.len(),
        inode: meta.ino(),
    }
}

fn read(path: &Path) -> Result<Loaded, SecretFileError> {
    let fail = |source| SecretFileError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    let text = zeroize::Zeroizing::new(std::io::read_to_string(file).map_err(fail)?);
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(Loaded {
        secret: SecretString::new(secret.to_owned()),
        stamp: stamp(&meta),
    })
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess was
/// right. (The length of the secret is not treated as secret.)
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[tokio::test(start_paused = true)]
    async fn secret_is_checked_and_reloaded_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first-secret-0123456789\n").unwrap();
        let secret = ClientSecret::load(&path).unwrap();
        let header = |v: &str| HeaderValue::from_str(v).unwrap();
        assert!(secret.verify(Some(&header("Bearer first-secret-0123456789"))));
        assert!(!secret.verify(Some(&header("Bearer first-secret-012345678"))));
        assert!(!secret.verify(Some(&header("first-secret-0123456789"))));
        assert!(!secret.verify(None));

        std::fs::write(&path, "second-secret-0123456789-longer").unwrap();
        tokio::time::advance(RECHECK + Duration::from_millis(1)).await;
        assert!(secret.verify(Some(&header("Bearer second-secret-0123456789-longer"))));
        assert!(!secret.verify(Some(&header("Bearer first-secret-0123456789"))));

        // An emptied file is refused: the previous secret stays.
        std::fs::write(&path, "").unwrap();
        tokio::time::advance(RECHECK + Duration::from_millis(1)).await;
        assert!(secret.verify(Some(&header("Bearer second-secret-0123456789-longer"))));
        assert!(!format!("{secret:?}").contains("second"));
    }

    #[test]
    fn missing_or_empty_file_is_an_error_naming_it() {
        let err = ClientSecret::load(Path::new("/nonexistent/secret")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/secret"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, " \n").unwrap();
        assert!(
            ClientSecret::load(&path)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
