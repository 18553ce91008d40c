//! The file sink: writes the token to a file on every renewal, atomically, with the configured
//! mode and owner, then optionally runs a command or signals a process.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use zeroize::Zeroizing;

use crate::config::{SinkFormat, SinkSettings};
use crate::token::IamToken;

/// How long a post-write command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write token file {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("cannot signal the process in {pid_file}: {reason}")]
    Signal { pid_file: PathBuf, reason: String },
    #[error("token file command {program:?} {outcome}")]
    Command { program: String, outcome: String },
}

/// Parses `HUP`, `SIGHUP` or `sighup`.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| format!("{text:?} is not a signal name like \"HUP\""))
}

/// Writes tokens to a file as configured.
#[derive(Debug, Clone)]
pub struct FileSink {
    settings: SinkSettings,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileSink {
    pub fn new(settings: SinkSettings) -> Self {
        Self { settings }
    }

    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// Writes `token` atomically: a temporary file in the same directory, created with the
    /// mode, owned as configured, synced, then renamed over the target and the directory synced.
    /// Readers see the old file or the new one, never a partial one.
    pub fn write(&self, token: &IamToken) -> Result<(), SinkError> {
        let body = Zeroizing::new(match self.settings.format {
            SinkFormat::Raw => token.expose_secret().to_owned(),
            SinkFormat::Json => format!(
                "{{\"access_token\":\"{}\",\"token_type\":\"Bearer\",\"expires_at\":\"{}\"}}\n",
                token.expose_secret(),
                humantime::format_rfc3339_seconds(token.expires_at())
            ),
        });
        write_atomically(&self.settings, body.as_bytes())
    }

    /// Removes the file, so no reader picks up a token that is no longer valid.
    pub fn remove(&self) -> Result<(), SinkError> {
        match std::fs::remove_file(&self.settings.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SinkError::Io {
                path: self.settings.path.clone(),
                action: "remove",
                source,
            }),
        }
    }

    /// Runs the command and sends the signal configured to follow a write.
    pub async fn notify_consumers(&self) -> Result<(), SinkError> {
        if let Some(program) = self.settings.command.first() {
            let mut command = tokio::process::Command::new(program);
            command
                .args(&self.settings.command[1..])
                .env("YC_IAM_SIDECAR_TOKEN_FILE", &self.settings.path)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true);
            let outcome = match tokio::time::timeout(COMMAND_TIMEOUT, command.status()).await {
                Err(_) => Some(format!("did not finish within {COMMAND_TIMEOUT:?}")),
                Ok(Err(e)) => Some(format!("could not start: {e}")),
                Ok(Ok(status)) if status.success() => None,
                Ok(Ok(status)) => Some(format!("failed: {status}")),
            };
            if let Some(outcome) = outcome {
                return Err(SinkError::Command {
                    program: program.clone(),
                    outcome,
                });
            }
        }
        if let (Some(signal), Some(pid_file)) = (&self.settings.signal, &self.settings.pid_file) {
            let fail = |reason: String| SinkError::Signal {
                pid_file: pid_file.clone(),
                reason,
            };
            let signal = parse_signal(signal).map_err(fail)?;
            let text = std::fs::read_to_string(pid_file).map_err(|e| fail(e.to_string()))?;
            let pid: i32 = text
                .trim()
                .parse()
                .ok()
                .filter(|pid| *pid > 1)
                .ok_or_else(|| fail(format!("{:?} is not a process id", text.trim())))?;
            nix::sys::signal::kill(Pid::from_raw(pid), signal)
                .map_err(|e| fail(format!("kill({pid}, {signal}): {e}")))?;
        }
        Ok(())
    }
}

fn write_atomically(settings: &SinkSettings, body: &[u8]) -> Result<(), SinkError> {
    let path = &settings.path;
    let io = |action: &'static str| {
        move |source: std::io::Error| SinkError::Io {
            path: path.clone(),
            action,
            source,
        }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(settings.mode)
            .open(&temp)
            .map_err(io("create a temporary file"))?;
        // The umask may have cleared bits; owner and mode are applied on every write.
        file.set_permissions(Permissions::from_mode(settings.mode))
            .map_err(io("set the mode"))?;
        if settings.owner.is_some() || settings.group.is_some() {
            std::os::unix::fs::fchown(&file, settings.owner, settings.group)
                .map_err(io("set the owner"))?;
        }
        file.write_all(body).map_err(io("write"))?;
        file.sync_all().map_err(io("fsync"))?;
        std::fs::rename(&temp, path).map_err(io("rename into place"))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync the directory"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::SystemTime;
    use tokio::time::Instant;

    fn token(secret: &str) -> IamToken {
        let now = SystemTime::now();
        IamToken::accept(
            secret.into(),
            Some(now + Duration::from_secs(3600)),
            Instant::now(),
            now,
            Duration::from_secs(300),
        )
        .unwrap()
        .0
    }

    fn settings(path: PathBuf) -> SinkSettings {
        SinkSettings {
            path,
            format: SinkFormat::Raw,
            mode: 0o600,
            owner: None,
            group: None,
            command: Vec::new(),
            signal: None,
            pid_file: None,
        }
    }

    #[test]
    fn writes_raw_and_json_with_the_mode_and_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        FileSink::new(settings(path.clone()))
            .write(&token("t1.first"))
            .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "t1.first");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);

        // A mode changed behind our back is re-applied on the next write.
        std::fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        let json = SinkSettings {
            format: SinkFormat::Json,
            mode: 0o640,
            ..settings(path.clone())
        };
        FileSink::new(json).write(&token("t1.second")).unwrap();
        let value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(value["access_token"], "t1.second");
        assert_eq!(value["token_type"], "Bearer");
        assert!(value["expires_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);

        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["token".to_owned()]);
    }

    #[test]
    fn owner_and_group_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let me = std::fs::metadata(dir.path()).unwrap();
        // Our own ids always work; as root also a foreign one.
        let (uid, gid) = if nix::unistd::geteuid().is_root() {
            (4242, 4343)
        } else {
            (me.uid(), me.gid())
        };
        let owned = SinkSettings {
            owner: Some(uid),
            group: Some(gid),
            ..settings(path.clone())
        };
        FileSink::new(owned).write(&token("t1.owned")).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    }

    #[test]
    fn readers_never_see_a_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let sink = FileSink::new(settings(path.clone()));
        sink.write(&token(&format!("t1.{}", "a".repeat(4000))))
            .unwrap();
        let reader_path = path.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_reader = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut reads = 0;
            while !stop_reader.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&reader_path).unwrap();
                assert_eq!(text.len(), 4003, "partial read");
                assert!(
                    text == format!("t1.{}", "a".repeat(4000))
                        || text == format!("t1.{}", "b".repeat(4000))
                );
                reads += 1;
            }
            reads
        });
        for i in 0..300 {
            let fill = if i % 2 == 0 { "b" } else { "a" };
            sink.write(&token(&format!("t1.{}", fill.repeat(4000))))
                .unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    #[test]
    fn write_into_a_missing_directory_names_the_file() {
        let sink = FileSink::new(settings("/nonexistent-dir/token".into()));
        let err = sink.write(&token("t1.x")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent-dir/token"), "{err}");
        assert!(!err.contains("t1.x"));
    }

    #[test]
    fn signal_names() {
        assert_eq!(parse_signal("HUP"), Ok(Signal::SIGHUP));
        assert_eq!(parse_signal("sigusr1"), Ok(Signal::SIGUSR1));
        assert!(parse_signal("BOGUS").is_err());
    }

    #[tokio::test]
    async fn command_and_signal_follow_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let marker = dir.path().join("ran");
        // A real child process that records the signal it gets. USR1, not HUP: a shell started
        // under nohup ignores HUP and cannot trap it.
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "trap 'echo usr1 > {}; exit 0' USR1; while :; do sleep 0.05; done",
                dir.path().join("signalled").display()
            ))
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pid_file = dir.path().join("app.pid");
        std::fs::write(&pid_file, format!("{}\n", child.id().unwrap())).unwrap();
        let sink = FileSink::new(SinkSettings {
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("cp \"$YC_IAM_SIDECAR_TOKEN_FILE\" {}", marker.display()),
            ],
            signal: Some("USR1".into()),
            pid_file: Some(pid_file),
            ..settings(path.clone())
        });
        sink.write(&token("t1.cmd")).unwrap();
        sink.notify_consumers().await.unwrap();
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "t1.cmd");
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("signalled")).unwrap(),
            "usr1\n"
        );

        let failing = FileSink::new(SinkSettings {
            command: vec!["false".into()],
            ..settings(path)
        });
        let err = failing.notify_consumers().await.unwrap_err().to_string();
        assert!(err.contains("\"false\" failed"), "{err}");
    }
}
