//! Writes a Kubernetes object as block YAML that every YAML reader takes the same way.
//!
//! serde_norway's serializer writes `on`, `yes`, `y`, `No`, `1_000` and `2024-01-01` as plain
//! scalars: YAML 1.2 strings, but booleans, numbers and timestamps to a YAML 1.1 reader such as
//! the one inside kubectl, which would then refuse a label `enabled: on`. Here a string is left
//! plain only when it cannot be read as anything else under either version; otherwise it is
//! double-quoted (or a literal block, for multi-line text). The layout is kubectl's: two-space
//! indentation, list items at the level of their key.

use std::fmt::Write as _;

use serde_norway::{Mapping, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EmitError {
    #[error("a mapping or list used as a mapping key cannot be written back")]
    ComplexKey,
    #[error("the tagged value {0} cannot be written back; remove the tag")]
    Tagged(String),
}

/// `value` as a YAML document (no `---`), ending in a newline.
pub fn to_yaml(value: &Value) -> Result<String, EmitError> {
    let mut out = String::new();
    match value {
        Value::Mapping(m) if !m.is_empty() => mapping(&mut out, m, 0, false)?,
        Value::Sequence(s) if !s.is_empty() => sequence(&mut out, s, 0, false)?,
        other => {
            scalar(&mut out, other, 0)?;
            out.push('\n');
        }
    }
    Ok(out)
}

/// The entries of `m` at `indent`; the first one continues the current line when `inline`
/// (after a list's `- `).
fn mapping(out: &mut String, m: &Mapping, indent: usize, inline: bool) -> Result<(), EmitError> {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !inline {
            pad(out, indent);
        }
        key(out, k)?;
        out.push(':');
        value_after_key(out, v, indent)?;
    }
    Ok(())
}

/// The items of `s`, each `- ` at `indent`.
fn sequence(out: &mut String, s: &[Value], indent: usize, inline: bool) -> Result<(), EmitError> {
    for (i, item) in s.iter().enumerate() {
        if i > 0 || !inline {
            pad(out, indent);
        }
        out.push_str("- ");
        match item {
            Value::Mapping(m) if !m.is_empty() => mapping(out, m, indent + 2, true)?,
            Value::Sequence(s) if !s.is_empty() => sequence(out, s, indent + 2, true)?,
            other => {
                scalar(out, other, indent + 2)?;
                out.push('\n');
            }
        }
    }
    Ok(())
}

/// What follows `key:`; the key itself sits at `indent`.
fn value_after_key(out: &mut String, v: &Value, indent: usize) -> Result<(), EmitError> {
    match v {
        Value::Mapping(m) if !m.is_empty() => {
            out.push('\n');
            mapping(out, m, indent + 2, false)
        }
        // kubectl's style: a list's dashes line up with its key.
        Value::Sequence(s) if !s.is_empty() => {
            out.push('\n');
            sequence(out, s, indent, false)
        }
        other => {
            out.push(' ');
            scalar(out, other, indent + 2)?;
            out.push('\n');
            Ok(())
        }
    }
}

fn key(out: &mut String, k: &Value) -> Result<(), EmitError> {
    match k {
        Value::String(s) => quoted_or_plain(out, s),
        Value::Mapping(_) | Value::Sequence(_) => return Err(EmitError::ComplexKey),
        other => scalar(out, other, 0)?,
    }
    Ok(())
}

/// A scalar, or `{}`/`[]` for empty collections. Multi-line text becomes a literal block whose
/// lines sit at `indent`.
fn scalar(out: &mut String, v: &Value, indent: usize) -> Result<(), EmitError> {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) if literal_block_ok(s) => literal_block(out, s, indent),
        Value::String(s) => quoted_or_plain(out, s),
        Value::Mapping(_) => out.push_str("{}"),
        Value::Sequence(_) => out.push_str("[]"),
        Value::Tagged(t) => return Err(EmitError::Tagged(t.tag.to_string())),
    }
    Ok(())
}

fn quoted_or_plain(out: &mut String, s: &str) {
    if plain_ok(s) {
        out.push_str(s);
    } else if single_quote_ok(s) {
        out.push('\'');
        out.push_str(&s.replace('\'', "''"));
        out.push('\'');
    } else {
        double_quoted(out, s);
    }
}

/// Only strings that no YAML 1.1 or 1.2 reader takes for anything but a string: a conservative
/// alphabet without spaces, no indicator first, no `:` last, nothing that reads as a number or
/// timestamp, and none of the 1.1 words for booleans and null.
fn plain_ok(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "y", "n", "yes", "no", "true", "false", "on", "off", "null", "nan", "inf",
    ];
    let Some(first) = s.chars().next() else {
        return false;
    };
    (first.is_ascii_alphanumeric() || matches!(first, '/' | '.' | '_' | '-' | '+'))
        && s != "-"
        && !s.ends_with(':')
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | '@' | '+')
        })
        && !looks_numeric(s)
        && !WORDS.contains(&s.to_ascii_lowercase().as_str())
}

/// True for anything a YAML 1.1 or 1.2 reader could resolve to an int, float or timestamp
/// (decimal, `0x`, `0o`, `0b`, old-style octal, `1_000`, `1:30` sexagesimal, `1e3`, `.inf`,
/// `2024-01-01`), and for some strings that only look close; those are merely quoted.
fn looks_numeric(s: &str) -> bool {
    let t = s.strip_prefix(['+', '-']).unwrap_or(s);
    let lower = t.to_ascii_lowercase();
    if lower == ".inf" || lower == ".nan" {
        return true;
    }
    let b = t.as_bytes();
    if !b.first().is_some_and(|c| c.is_ascii_digit() || *c == b'.') {
        return false;
    }
    if b.len() >= 5 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' {
        return true;
    }
    let digits = |rest: &str, ok: fn(char) -> bool| {
        !rest.is_empty() && rest.chars().all(|c| c == '_' || ok(c))
    };
    if let Some(rest) = lower.strip_prefix("0x") {
        return digits(rest, |c| c.is_ascii_hexdigit());
    }
    if let Some(rest) = lower.strip_prefix("0o") {
        return digits(rest, |c| c.is_digit(8));
    }
    if let Some(rest) = lower.strip_prefix("0b") {
        return digits(rest, |c| c.is_digit(2));
    }
    t.chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '_' | '.' | ':' | 'e' | 'E' | '+' | '-'))
}

/// One printable line without tabs: single quotes keep it as it is ('' for a quote).
fn single_quote_ok(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c != '\t' && !needs_escape(c))
}

/// YAML's double-quoted style, escaping everything a reader could change: quotes, backslashes,
/// control characters, and what YAML 1.1 counts as line breaks (NEL, LS, PS) or a BOM.
fn double_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Outside YAML's printable set, or a line break or BOM to YAML 1.1.
fn needs_escape(c: char) -> bool {
    let printable =
        matches!(u32::from(c), 0x20..=0x7E | 0xA0..=0xD7FF | 0xE000..=0xFFFD | 0x10000..);
    !printable || matches!(c, '\u{2028}' | '\u{2029}' | '\u{FEFF}')
}

/// Multi-line text that a literal block keeps exactly: printable, no carriage returns, no
/// leading space (which would set the block's indentation) and at most one final newline.
fn literal_block_ok(s: &str) -> bool {
    s.contains('\n')
        && !s.starts_with([' ', '\n', '\t'])
        && !s.ends_with("\n\n")
        && s.chars()
            .all(|c| c == '\n' || c == '\t' || !needs_escape(c))
}

fn literal_block(out: &mut String, s: &str, indent: usize) {
    let (body, header) = match s.strip_suffix('\n') {
        Some(body) => (body, "|"),
        None => (s, "|-"),
    };
    out.push_str(header);
    for line in body.split('\n') {
        out.push('\n');
        if !line.is_empty() {
            pad(out, indent);
            out.push_str(line);
        }
    }
}

fn pad(out: &mut String, indent: usize) {
    out.extend(std::iter::repeat_n(' ', indent));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: &Value) -> String {
        let text = to_yaml(v).unwrap();
        let back: Value = serde_norway::from_str(&text)
            .unwrap_or_else(|e| panic!("output does not parse: {e}\n{text}"));
        assert_eq!(&back, v, "changed in a round trip:\n{text}");
        text
    }

    #[test]
    fn yaml_1_1_booleans_numbers_and_timestamps_are_quoted() {
        for s in [
            "on",
            "On",
            "OFF",
            "yes",
            "Y",
            "n",
            "No",
            "true",
            "False",
            "null",
            "~",
            "1_000",
            "0x1F",
            "0o17",
            "012",
            "1.10",
            "2024-01-01",
            ".inf",
            "-.NaN",
            "+1",
            "-",
            "=",
            "<<",
            "",
            " lead",
            "trail ",
            "a: b",
            "#x",
            "@x",
            "`x",
            "!x",
            "&a",
            "*a",
            "{a}",
            "[a]",
            "|",
            ">",
            "%x",
            "'",
            "\"",
            "?",
            "a #b",
            "1e3",
            "1e+3",
            "-1",
            "+1.5",
            "1:20:30",
            "0b101",
            "-.inf",
            "a:",
            "2001-12-14t21:59:43.10-05:00",
            "12:30",
        ] {
            let mut m = Mapping::new();
            m.insert(Value::String("k".into()), Value::String(s.into()));
            let text = round_trip(&Value::Mapping(m));
            assert!(
                text.starts_with("k: \"") || text.starts_with("k: '"),
                "{s:?} was not quoted: {text}"
            );
        }
    }

    #[test]
    fn ordinary_names_stay_plain() {
        for s in [
            "web",
            "kith.dev/inject",
            "Always",
            "ghcr.io/kith-dev/kith",
            "a_b-c.d",
        ] {
            let mut m = Mapping::new();
            m.insert(Value::String("k".into()), Value::String(s.into()));
            assert_eq!(round_trip(&Value::Mapping(m)), format!("k: {s}\n"));
        }
    }

    #[test]
    fn awkward_characters_survive_a_round_trip() {
        let strings = [
            "tab\there",
            "bell\u{7}",
            "del\u{7f}",
            "nel\u{85}",
            "ls\u{2028}ps\u{2029}",
            "bom\u{feff}",
            "emoji \u{1F600}",
            "back\\slash \"quote\"",
            "cr\r\nlf",
            "\u{fffe}\u{ffff}",
            "two\nlines\n",
            "no final newline\nhere",
            "  indented\nblock\n",
            "\nleading newline",
            "trailing newlines\n\n",
            "---\n...\n",
            "  \n \n",
        ];
        for s in strings {
            let mut m = Mapping::new();
            m.insert(Value::String(s.into()), Value::String(s.into()));
            round_trip(&Value::Mapping(m));
            round_trip(&Value::Sequence(vec![Value::String(s.into())]));
        }
    }

    #[test]
    fn generated_strings_survive_a_round_trip() {
        // A deterministic sweep over short strings from an alphabet of YAML's special characters.
        let alphabet: Vec<char> = " \n\t-:#'\"{}[],&*!|>%@`?.0x1yon~\\".chars().collect();
        let mut seed: u64 = 0x5eed;
        for _ in 0..5000 {
            let len = (seed % 7) as usize;
            let s: String = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            let mut m = Mapping::new();
            m.insert(Value::String("k".into()), Value::String(s.clone()));
            m.insert(
                Value::String("l".into()),
                Value::Sequence(vec![Value::String(s)]),
            );
            round_trip(&Value::Mapping(m));
            seed = seed.wrapping_add(1);
        }
    }

    #[test]
    fn layout_is_kubectls() {
        let v: Value = serde_norway::from_str(
            "spec: {containers: [{name: a, args: [x, '1'], env: []}, {name: b, ports: [{containerPort: 80}]}], volumes: {}}\n\
             m: [[1, 2], []]\nscript: \"set -e\\necho hi\\n\"\nf: 1.5\nz: null",
        )
        .unwrap();
        assert_eq!(
            round_trip(&v),
            "spec:\n  containers:\n  - name: a\n    args:\n    - x\n    - '1'\n    env: []\n  \
             - name: b\n    ports:\n    - containerPort: 80\n  volumes: {}\nm:\n- - 1\n  - 2\n- []\n\
             script: |\n  set -e\n  echo hi\nf: 1.5\nz: null\n"
        );
    }

    #[test]
    fn tags_and_complex_keys_are_refused() {
        let v: Value = serde_norway::from_str("a: !custom x").unwrap();
        assert!(matches!(to_yaml(&v), Err(EmitError::Tagged(_))));
        let v: Value = serde_norway::from_str("? [a]\n: b").unwrap();
        assert_eq!(to_yaml(&v), Err(EmitError::ComplexKey));
    }
}
