//! Arbitrary bytes as an authorized key file (`key.json`).
//!
//! Invariants: `ServiceAccountKey::from_json` never panics, and its error message never echoes
//! key material: no 20-character run of any PEM body line (the lines after a `-----BEGIN` line,
//! split on real newlines or JSON `\n` escapes) appears in the error's Display.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use yc_iam_sidecar::credentials::{CredentialsError, ServiceAccountKey};

const RUN: usize = 20;

fuzz_target!(|data: &[u8]| {
    let Err(error) = ServiceAccountKey::from_json(data, Path::new("fuzz.json")) else {
        return;
    };
    let mut message = error.to_string();
    // The one value an error quotes on purpose: the user account id of a user-account key. It is
    // not key material; take it out so a fuzzer-made id equal to a PEM line is not a finding.
    if let CredentialsError::UserAccountKey {
        user_account_id, ..
    } = &error
        && !user_account_id.is_empty()
    {
        message = message.replace(user_account_id.as_str(), "<user account id>");
    }
    if message.len() < RUN {
        return;
    }

    let mut bodies: Vec<String> = Vec::new();
    // As written in the file (escaped newlines are line breaks too)...
    bodies.push(
        String::from_utf8_lossy(data)
            .replace("\\n", "\n")
            .replace("\\r", "\r"),
    );
    // ...and as JSON decodes it (\u escapes and the like).
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(data) {
        for field in ["private_key", "privateKey"] {
            if let Some(serde_json::Value::String(pem)) = map.get(field) {
                bodies.push(pem.clone());
            }
        }
    }

    for text in &bodies {
        for line in pem_body_lines(text) {
            let line = line.trim_end_matches('\r');
            // Only runs that look like key material: base64 (what a PEM body is made of). A
            // fuzzer-made "body" that repeats the fixed wording of a message is not a leak.
            for run in line
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '='))
                .filter(|run| run.len() >= RUN)
            {
                for start in 0..=run.len() - RUN {
                    let window = &run[start..start + RUN];
                    assert!(
                        !message.contains(window),
                        "key material echoed in an error: {window:?} from PEM line {line:?} \
                         appears in {message:?}"
                    );
                }
            }
        }
    }
});

/// Lines after each `-----BEGIN` line, up to its `-----END` line (or the end).
fn pem_body_lines(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut in_body = false;
    for line in text.split('\n') {
        if line.contains("-----BEGIN") {
            in_body = true;
            continue;
        }
        if line.contains("-----END") {
            in_body = false;
            continue;
        }
        if in_body && line.len() >= RUN {
            out.push(line);
        }
    }
    out
}
