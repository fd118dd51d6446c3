//! Names, paths and other words from a configuration, checked as it is read (serde `try_from`),
//! so a value that could add a line to a generated file (keepalived.conf, radvd.conf) or an
//! argument to a helper's command line never gets past parsing, whether it came from a local
//! file or a fleet push. [`super::parse`] names the field a refused value was read from.
//!
//! - [`NetnsName`]: 1-64 of `A-Z a-z 0-9 _ . -`, the first a letter, digit or `_` (a file
//!   under /run/netns: never `.`, `..` or something read as an option).
//! - [`InterfaceName`]: the same set, 1-15 bytes (Linux's IFNAMSIZ less the NUL; Linux also
//!   refuses `/`, `:` and whitespace, which the set leaves out).
//! - [`SafePath`]: an absolute path of `A-Z a-z 0-9 / . _ -`, at most 4095 bytes: what
//!   keepalived's script line and a command line can carry without quoting.
//! - [`Token`]: one word of printable ASCII without quotes or backslashes, for values that
//!   reach a log or another program but no file: etcd endpoints and user, upstream addresses.

use std::fmt;
use std::path::Path;

/// Why a value was refused: the value, escaped, and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not {what}")]
pub struct BadName {
    value: String,
    what: &'static str,
}

fn name_chars(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_netns_name(s: &str) -> bool {
    s.len() <= 64 && name_chars(s)
}

fn is_interface_name(s: &str) -> bool {
    s.len() <= 15 && name_chars(s)
}

fn is_safe_path(s: &str) -> bool {
    s.starts_with('/')
        && s.len() <= 4095
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"'\\".contains(&b))
}

/// A string newtype checked by `check` when made; read as `str` (or `Path` for paths).
macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "type": "string", "description": concat!("A string: ", $what, ".") })
            }
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = BadName;
            fn try_from(value: String) -> Result<Self, BadName> {
                if $check(&value) {
                    Ok($name(value))
                } else {
                    Err(BadName { value, what: $what })
                }
            }
        }

        impl TryFrom<&str> for $name {
            type Error = BadName;
            fn try_from(value: &str) -> Result<Self, BadName> {
                value.to_string().try_into()
            }
        }

        impl std::str::FromStr for $name {
            type Err = BadName;
            fn from_str(value: &str) -> Result<Self, BadName> {
                value.try_into()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
    };
}

checked_string!(
    /// A named network namespace (see the module's description).
    NetnsName,
    is_netns_name,
    "a namespace name (1-64 of A-Z a-z 0-9 _ . -, not starting with . or -)"
);
checked_string!(
    /// A network interface name (see the module's description).
    InterfaceName,
    is_interface_name,
    "an interface name (1-15 of A-Z a-z 0-9 _ . -, not starting with . or -)"
);
checked_string!(
    /// An absolute path that every generated file and command line can carry as it is.
    SafePath,
    is_safe_path,
    "an absolute path of A-Z a-z 0-9 / . _ - (at most 4095 bytes)"
);
checked_string!(
    /// One word of printable ASCII (see the module's description).
    Token,
    is_token,
    "one word of printable ASCII without quotes or backslashes"
);

macro_rules! deref_to {
    ($name:ident, $target:ty, $how:expr) => {
        impl std::ops::Deref for $name {
            type Target = $target;
            fn deref(&self) -> &$target {
                $how(self.0.as_str())
            }
        }
    };
}

deref_to!(NetnsName, str, |s| s);
deref_to!(InterfaceName, str, |s| s);
deref_to!(Token, str, |s| s);
deref_to!(SafePath, Path, Path::new);

impl AsRef<Path> for SafePath {
    fn as_ref(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl From<SafePath> for std::path::PathBuf {
    fn from(p: SafePath) -> std::path::PathBuf {
        p.0.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_takes_its_set_and_refuses_the_rest() {
        for ok in ["ntpxdp-vip", "a", "_x.1-2", &"n".repeat(64)] {
            assert!(NetnsName::try_from(ok).is_ok(), "{ok:?}");
        }
        for ok in ["eth0", "ntpxdp-v0", "br_int.100", &"i".repeat(15)] {
            assert!(InterfaceName::try_from(ok).is_ok(), "{ok:?}");
        }
        for ok in ["/", "/run/ntp-xdp/ntpxdp-vip/control.sock", "/etc/a_b.pem"] {
            assert!(SafePath::try_from(ok).is_ok(), "{ok:?}");
        }
        for ok in [
            "https://169.254.0.1:2379",
            "ntp1.example:123",
            "[fd00::1]:123",
        ] {
            assert!(Token::try_from(ok).is_ok(), "{ok:?}");
        }
        let long = "n".repeat(65);
        for bad in [
            "", ".", "..", "-x", ".x", "a/b", "a b", "a\nb", "a\"b", "a\0b", "a\\b", "a'b", "a{b",
            "a#b", "a$b", "é", &long,
        ] {
            assert!(NetnsName::try_from(bad).is_err(), "{bad:?}");
            assert!(InterfaceName::try_from(bad).is_err(), "{bad:?}");
        }
        assert!(InterfaceName::try_from("i".repeat(16)).is_err());
        for bad in [
            "",
            "relative.sock",
            "/a b",
            "/a\nb",
            "/a\"b",
            "/a\0b",
            "/a\\b",
            "/a'b",
            "/a#b",
            "/a$b",
            "/é",
        ] {
            assert!(SafePath::try_from(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "",
            "a b",
            "a\nb",
            "a\0b",
            "a\rb",
            "\u{1b}[2J",
            "a\"b",
            "a'b",
            "a\\b",
            "é",
        ] {
            assert!(Token::try_from(bad).is_err(), "{bad:?}");
        }
        let e = NetnsName::try_from("a\nb\"").unwrap_err().to_string();
        assert!(
            e.contains(r#""a\nb\"""#) && e.contains("namespace name"),
            "{e}"
        );
    }
}
