//! `yc-iam-sidecar` keeps a fresh Yandex Cloud IAM token in memory and serves it on loopback.
//!
//! How a token flows:
//!
//! - [`config`] turns the TOML file, flags and environment into validated [`config::Settings`].
//! - [`credentials`] loads a service-account key (or OAuth token) and signs a fresh JWT per call.
//! - [`iam`] calls `IamTokenService/Create` over gRPC (the [`iam::IamApi`] seam) and
//!   classifies failures as transient or permanent.
//! - [`token`] validates the answer and converts its wall-clock expiry to the monotonic clock.
//! - [`refresh`] is the only writer: it stores each token in the [`cell`] and schedules the next
//!   renewal (`refresh_in`) or retry (`retry_in`).
//! - [`server`] answers `/token`, the VM metadata path and the health probes from the cell,
//!   lock-free, never waiting on the network.
//! - [`sink`] optionally writes each new token to a file, atomically, before it is stored.
//! - [`metrics`] counts attempts and requests for `/metrics`; [`notify`] tells systemd.
//! - [`daemon`] wires them together; [`emulator`] is a local IAM for `dev` and the tests.
//! - [`secret`] is the redacting, zeroizing string every secret lives in; [`auth`] checks the
//!   optional client secret on authenticated listeners.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cell;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod emulator;
pub mod iam;
pub mod metrics;
pub mod notify;
pub mod refresh;
pub mod secret;
pub mod server;
pub mod sink;
pub mod token;
