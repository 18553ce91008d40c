//! Arbitrary UTF-8 as a TOML config file.
//!
//! Invariants: neither `config::parse` nor `Settings::from_file_config` panics, and every error
//! is one line (the daemon and `check-config` print it as a single log line).
#![no_main]

use libfuzzer_sys::fuzz_target;
use yc_iam_sidecar::config::{self, Overrides, Settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = match config::parse(text, "fuzz.toml") {
        Ok(file) => file,
        Err(error) => {
            let message = error.to_string();
            assert!(
                !message.contains('\n'),
                "config::parse error is not one line: {message:?}"
            );
            return;
        }
    };
    if let Err(error) =
        Settings::from_file_config(file, "fuzz.toml", &Overrides::default(), &|_| None)
    {
        let message = error.to_string();
        assert!(
            !message.contains('\n'),
            "Settings::from_file_config error is not one line: {message:?}"
        );
    }
});
