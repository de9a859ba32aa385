//! What a person reads from `kith ca`: list tables show times as RFC 3339, and a log sent to a
//! file carries no terminal colour codes.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use crate::common;
use crate::common::{ca_serve_command, kith, stop};
use integration::eventually;

#[test]
fn lists_show_rfc3339_times_and_a_redirected_log_has_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    let log_path = dir.path().join("ca.log");
    // Text logs (the default format) to a file, as an init system or `2> ca.log` would.
    let child = ca_serve_command(&data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let ca = common::Ca {
        child,
        addr: String::new(),
        metrics_addr: String::new(),
        log: Default::default(),
    };
    let log = eventually("the CA to say it serves", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("kith ca serving") {
            Ok(log)
        } else {
            Err(log)
        }
    });
    assert!(
        !log.contains('\x1b'),
        "a log redirected to a file must carry no ANSI codes:\n{log:?}"
    );

    let (code, _, err) = kith(&["ca", "token", "create", "--name", "host-a", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = kith(&["ca", "token", "list", "--data-dir", d]);
    assert_eq!(code, 0, "{err}");
    let row = out.lines().nth(1).unwrap_or_default();
    let expires = row.split_whitespace().nth(2).unwrap_or_default();
    assert!(
        time::OffsetDateTime::parse(expires, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "EXPIRES_AT is RFC 3339, not Unix seconds: {out}"
    );
    // JSON keeps the number for scripts.
    let (_, json, _) = kith(&["ca", "token", "list", "--data-dir", d, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v[0]["expires_at"].is_i64(), "{json}");
    stop(ca);
}
