//! The selectors a registration entry may name: exactly the ones the agent produces, with values
//! in the form it produces them. An entry naming anything else could never match, so it is
//! refused when it is created rather than left to fail silently on every node.

/// Every selector type the agent produces, with the form of its value.
pub const KNOWN: &[(&str, &str)] = &[
    ("unix:uid", "a numeric uid"),
    ("unix:gid", "a numeric gid"),
    ("unix:user", "a user name"),
    ("unix:group", "a group name"),
    (
        "unix:path",
        "an absolute, normalized path of the executable",
    ),
    ("docker:label", "<key>=<value>"),
    (
        "docker:image",
        "an image reference as the container was created with",
    ),
    ("docker:image_id", "sha256:<64 hex digits>"),
    ("docker:name", "a container name"),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("unknown selector type in {selector:?}; known types: {}", known_list())]
    Unknown { selector: String },
    #[error("selector {selector:?}: the value must be {expected}")]
    Malformed {
        selector: String,
        expected: &'static str,
    },
    #[error(
        "an entry with a unix:path selector must also name unix:uid or unix:gid: a path alone can be imitated by a caller that sees another mount namespace, while the uid and gid come from the kernel at connect time"
    )]
    PathWithoutUidOrGid,
}

impl SelectorError {
    /// A stable code for the API and the refusal metric.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unknown { .. } => "unknown_selector",
            Self::Malformed { .. } => "bad_selector",
            Self::PathWithoutUidOrGid => "path_selector_needs_uid_or_gid",
        }
    }
}

/// `unix:uid, unix:gid, ...` for messages.
pub fn known_list() -> String {
    KNOWN.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", ")
}

/// Checks every selector of one entry, and the combination.
pub fn check_entry(selectors: &[String]) -> Result<(), SelectorError> {
    let mut has_path = false;
    let mut has_uid_or_gid = false;
    for s in selectors {
        let kind = check(s)?;
        has_path |= kind == "unix:path";
        has_uid_or_gid |= kind == "unix:uid" || kind == "unix:gid";
    }
    if has_path && !has_uid_or_gid {
        return Err(SelectorError::PathWithoutUidOrGid);
    }
    Ok(())
}

/// Checks one selector; returns its type.
pub fn check(selector: &str) -> Result<&'static str, SelectorError> {
    let Some((kind, expected)) = KNOWN.iter().find(|(t, _)| {
        selector
            .strip_prefix(t)
            .is_some_and(|rest| rest.starts_with(':'))
    }) else {
        return Err(SelectorError::Unknown {
            selector: selector.to_owned(),
        });
    };
    let value = &selector[kind.len() + 1..];
    let ok = !value.is_empty()
        && !value.chars().any(char::is_control)
        && match *kind {
            "unix:uid" | "unix:gid" => {
                value.bytes().all(|b| b.is_ascii_digit())
                    && value.parse::<u32>().is_ok()
                    && (value == "0" || !value.starts_with('0'))
            }
            "unix:user" | "unix:group" => value.len() <= 256 && !value.contains([' ', ':', '/']),
            "unix:path" => normalized_absolute_path(value),
            "docker:label" => value.split_once('=').is_some_and(|(k, _)| !k.is_empty()),
            "docker:image" => !value.contains(char::is_whitespace),
            "docker:image_id" => value.strip_prefix("sha256:").is_some_and(|h| {
                h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            }),
            "docker:name" => {
                value.len() <= 256
                    && value
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                    && value.as_bytes()[0].is_ascii_alphanumeric()
            }
            _ => false,
        };
    if ok {
        Ok(kind)
    } else {
        Err(SelectorError::Malformed {
            selector: selector.to_owned(),
            expected,
        })
    }
}

/// The agent reads the executable through `/proc/<pid>/exe`, which the kernel gives as an
/// absolute path without `.`, `..`, empty segments or a trailing slash.
fn normalized_absolute_path(p: &str) -> bool {
    p.len() > 1
        && p.len() <= 4096
        && p.starts_with('/')
        && p[1..]
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_agent_produces_is_accepted() {
        for s in [
            "unix:uid:0",
            "unix:uid:1000",
            "unix:gid:4294967295",
            "unix:user:www-data",
            "unix:group:docker",
            "unix:path:/usr/bin/app",
            "docker:label:app=web",
            "docker:label:x=a=b",
            "docker:label:empty=",
            "docker:label:kith.dev/service=web",
            "docker:image:kith/web:1.2",
            "docker:image_id:sha256:e050be6b4d0938e8baad28f3754d4b1b339691415b1222da916f75b99817484e",
            "docker:name:web-1",
        ] {
            check(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        }
    }

    #[test]
    fn unknown_types_are_refused_with_the_known_list() {
        for s in [
            "k8s:ns:default",
            "unix:pid:1",
            "docker:id:abc",
            "unix",
            "uid:1",
            "",
        ] {
            let err = check(s).unwrap_err();
            assert_eq!(err.code(), "unknown_selector", "{s}");
            let msg = err.to_string();
            assert!(
                msg.contains("unix:uid") && msg.contains("docker:image_id"),
                "{msg}"
            );
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        for s in [
            "unix:uid:",
            "unix:uid:abc",
            "unix:uid:-1",
            "unix:uid:01",
            "unix:uid:4294967296",
            "unix:gid:1 ",
            "unix:user:a b",
            "unix:path:usr/bin/app",
            "unix:path:/usr/../bin/app",
            "unix:path:/usr//bin",
            "unix:path:/usr/bin/",
            "unix:path:/",
            "docker:label:noequals",
            "docker:label:=v",
            "docker:image:a b",
            "docker:image_id:e050",
            "docker:image_id:sha256:E050BE6B4D0938E8BAAD28F3754D4B1B339691415B1222DA916F75B99817484E",
            "docker:name:/web",
            "docker:name:-web",
            "unix:user:a\nb",
        ] {
            assert_eq!(check(s).unwrap_err().code(), "bad_selector", "{s:?}");
        }
    }

    #[test]
    fn a_path_alone_is_refused() {
        let entry = |s: &[&str]| check_entry(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            entry(&["unix:path:/usr/bin/app"]).unwrap_err(),
            SelectorError::PathWithoutUidOrGid
        );
        assert_eq!(
            entry(&["unix:path:/usr/bin/app", "unix:user:app"]).unwrap_err(),
            SelectorError::PathWithoutUidOrGid
        );
        entry(&["unix:path:/usr/bin/app", "unix:uid:1000"]).unwrap();
        entry(&["unix:gid:10", "unix:path:/usr/bin/app"]).unwrap();
        entry(&["docker:label:app=web"]).unwrap();
    }
}
