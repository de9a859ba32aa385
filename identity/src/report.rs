//! An error with its causes on one line (`what failed: why: the cause under it`), the way the
//! binary prints a fatal error, for logs and for tests that look for a cause's text.

use std::error::Error;
use std::fmt;

/// `error`, then each of its sources after `: `; a source whose text the line already holds
/// (a message that quotes its cause) is not repeated.
pub fn chain(error: &dyn Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// [`chain`] as a `Display` value, for `tracing` fields: `error = %Chain(&e)`.
pub struct Chain<'a>(pub &'a dyn Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_on_one_line() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
        assert_eq!(Chain(&e).to_string(), "outer: inner");
    }
}
