//! How `kith ca` prints what the admin socket answers: tables for people, `--json` for scripts,
//! times as RFC 3339.

use std::time::Duration;

use serde_json::{Value, json};

/// `kith ca root status` as text.
pub(super) fn print_roots(v: &Value) {
    let mode = if v["mode"] == "upstream" {
        "upstream (an operator's CA signs kith's intermediates; kith cannot roll it)".to_owned()
    } else {
        format!(
            "self-rooted; a successor is made at {}% of a root's life",
            (v["rollover_at"].as_f64().unwrap_or(0.5) * 100.0).round()
        )
    };
    println!("mode           {mode}");
    let now =
        v["outage_at"].as_i64().unwrap_or(0) - v["time_to_outage_seconds"].as_i64().unwrap_or(0);
    for r in v["roots"].as_array().cloned().unwrap_or_default() {
        let phase = r["phase"].as_str().unwrap_or_default();
        let extra = match phase {
            "retiring" => format!(
                ", leaves the bundle at {} (its last leaf's end)",
                r["until"].as_i64().and_then(rfc3339).unwrap_or_default()
            ),
            "published" => ", in the bundle, not signing yet".to_owned(),
            _ => String::new(),
        };
        println!(
            "root           {} {:<9} ends {} (in {}){}\n               sha256 {}",
            r["id"].as_str().unwrap_or_default(),
            phase,
            r["not_after"]
                .as_i64()
                .and_then(rfc3339)
                .unwrap_or_default(),
            secs(&json!(r["not_after"].as_i64().unwrap_or(0) - now)),
            extra,
            r["sha256"].as_str().unwrap_or_default(),
        );
    }
    match waiting_line(&v["waiting"]) {
        Some(line) => println!("switch         {line}"),
        None => {
            if let Some(due) = v["successor_due_at"].as_i64() {
                println!("next rollover  {}", rfc3339(due).unwrap_or_default());
            }
        }
    }
    if let Some(w) = v["warning"].as_str() {
        println!("WARNING        {w}");
    }
    println!(
        "time to outage {} (cause: {}: {})",
        secs(&v["time_to_outage_seconds"]),
        v["time_to_outage_cause"].as_str().unwrap_or_default(),
        v["time_to_outage_detail"].as_str().unwrap_or_default()
    );
}

/// What a waiting switch waits for, in words.
pub(super) fn waiting_line(w: &Value) -> Option<String> {
    let deadline = w["deadline"].as_i64().and_then(rfc3339).unwrap_or_default();
    match w["waiting_for"].as_str()? {
        "propagation" => Some(format!(
            "waits for the new bundle to reach every caller (the longest SVID TTL) until {}; switches at the latest at {deadline}",
            w["until"].as_i64().and_then(rfc3339).unwrap_or_default()
        )),
        "callers" => {
            let callers: Vec<String> = w["callers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            Some(format!(
                "waits for {} caller(s) that renewed without reporting the new root: {}; switches at the latest at {deadline}",
                callers.len(),
                callers.join(", ")
            ))
        }
        _ => None,
    }
}

pub(super) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub(super) fn secs(v: &Value) -> String {
    match v.as_i64() {
        Some(s) if s >= 0 => humantime::format_duration(Duration::from_secs(s as u64)).to_string(),
        Some(s) => format!(
            "EXPIRED {} ago",
            humantime::format_duration(Duration::from_secs(s.unsigned_abs()))
        ),
        None => "-".into(),
    }
}

/// Unix seconds as RFC 3339 in UTC (`2026-12-07T02:38:42Z`).
pub(super) fn rfc3339(unix: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// A plain table of selected columns (times as RFC 3339), or the JSON as is.
pub(super) fn table(v: &Value, json: bool, columns: &[&str]) {
    if json {
        return print_json(v);
    }
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("(none)");
        return;
    }
    let cell = |row: &Value, c: &str| match &row[c] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        // Time columns (`at`, `*_at`) are Unix seconds on the wire; people read RFC 3339.
        Value::Number(n) if c == "at" || c.ends_with("_at") => n
            .as_i64()
            .and_then(rfc3339)
            .unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!(
        "{}",
        line(columns.iter().map(|c| c.to_uppercase()).collect())
    );
    for r in &rows {
        println!("{}", line(columns.iter().map(|c| cell(r, c)).collect()));
    }
}
