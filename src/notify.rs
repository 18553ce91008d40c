//! The systemd notify protocol (`sd_notify(3)`): datagrams to `$NOTIFY_SOCKET` saying READY,
//! STATUS, WATCHDOG, RELOADING and STOPPING.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A connection to the service manager, when there is one.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// Connects to `$NOTIFY_SOCKET` if set (a path, or `@name` for an abstract socket).
    pub fn from_env() -> Option<Self> {
        let target = std::env::var_os("NOTIFY_SOCKET")?;
        let target = target.to_string_lossy().into_owned();
        let addr = if let Some(name) = target.strip_prefix('@') {
            abstract_addr(name)?
        } else {
            SocketAddr::from_pathname(&target).ok()?
        };
        let socket = match UnixDatagram::unbound() {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!(%error, "cannot open a socket for systemd notifications");
                return None;
            }
        };
        let _ = socket.set_nonblocking(true);
        Some(Self { socket, addr })
    }

    /// Sends one message like `READY=1` or `STATUS=...`. Failures are logged, never fatal.
    pub fn notify(&self, message: &str) {
        if let Err(error) = self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            tracing::debug!(%error, "systemd notification not delivered");
        }
    }

    /// `RELOADING=1` with the monotonic timestamp systemd asks for.
    pub fn reloading(&self) {
        let usec = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
            .unwrap_or(0);
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }
}

#[cfg(target_os = "linux")]
fn abstract_addr(name: &str) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes()).ok()
}

#[cfg(not(target_os = "linux"))]
fn abstract_addr(_name: &str) -> Option<SocketAddr> {
    None
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when it is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.trim() != std::process::id().to_string()
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}
