//! The one way the helpers' configuration files (keepalived.conf, radvd.conf) are made: each
//! file is a fixed template in which every value goes through [`Syntax::word`] (one bare
//! token) or [`Syntax::command`] (keepalived's quoted script string), which refuse a value the
//! helper would read as anything but that token; [`ConfFile`], the only thing
//! [`crate::vip::helper::write_config`] writes, is made by [`Syntax::file`], which checks the
//! whole text once more (printable ASCII lines, quotes closed on their line, braces balanced).
//!
//! A bare token is made of `A-Z a-z 0-9 / . _ - :` (names, addresses, prefixes, numbers and
//! [`crate::config::names::SafePath`]s): no whitespace, quote, backslash, brace, `;`, comment
//! (`#`, `!`) or parameter (`$`, `@`, `~`) character of either format.

use std::fmt;

/// The file formats written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Syntax {
    /// keepalived.conf: whitespace-separated tokens, `{ }` blocks, `"..."` strings.
    Keepalived,
    /// radvd.conf: tokens, `{ };` blocks, `;`-terminated options; no value is quoted.
    Radvd,
}

impl fmt::Display for Syntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Syntax::Keepalived => "keepalived.conf",
            Syntax::Radvd => "radvd.conf",
        })
    }
}

/// A value that cannot be written so that the helper reads it back as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} cannot be written into {syntax}: {why}")]
pub struct Unwritable {
    pub value: String,
    pub syntax: Syntax,
    pub why: &'static str,
}

/// A generated configuration file, every value in it checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfFile(String);

impl ConfFile {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_bare(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/._-:".contains(&b)
}

impl Syntax {
    fn refuse(self, value: &str, why: &'static str) -> Unwritable {
        Unwritable {
            value: value.to_string(),
            syntax: self,
            why,
        }
    }

    /// `value` as one bare token.
    pub fn word(self, value: impl fmt::Display) -> Result<String, Unwritable> {
        let value = value.to_string();
        if value.is_empty() {
            return Err(self.refuse(&value, "an empty token is no token"));
        }
        if !value.bytes().all(is_bare) {
            return Err(self.refuse(
                &value,
                "a token may hold only A-Z a-z 0-9 / . _ - : (no whitespace, quote, \
                 backslash, brace, comment or control character)",
            ));
        }
        Ok(value)
    }

    /// A command line as keepalived runs a script: one quoted string that keepalived splits at
    /// whitespace into the program and its arguments, so each one must be a bare token.
    pub fn command<S: AsRef<str>>(self, args: &[S]) -> Result<String, Unwritable> {
        if self != Syntax::Keepalived {
            return Err(self.refuse("", "this format has no quoted strings"));
        }
        if args.is_empty() {
            return Err(self.refuse("", "a command needs a program"));
        }
        let words = args
            .iter()
            .map(|a| self.word(a.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(format!("\"{}\"", words.join(" ")))
    }

    /// The finished text of a template whose values came from [`Syntax::word`] and
    /// [`Syntax::command`], checked as a whole.
    pub fn file(self, text: String) -> Result<ConfFile, Unwritable> {
        if let Some(line) = text
            .split('\n')
            .find(|l| !l.bytes().all(|b| b == b' ' || b.is_ascii_graphic()))
        {
            return Err(self.refuse(line, "a line holds a control or non-ASCII character"));
        }
        let mut depth = 0usize;
        for line in text.split('\n') {
            if line.trim_start().starts_with('#') {
                continue;
            }
            let quotes = line.bytes().filter(|&b| b == b'"').count();
            if quotes % 2 != 0 || (quotes > 0 && self == Syntax::Radvd) || line.contains('\\') {
                return Err(self.refuse(line, "a quoted string is not closed on its line"));
            }
            for b in line.bytes() {
                match b {
                    b'{' => depth += 1,
                    b'}' => {
                        depth = depth
                            .checked_sub(1)
                            .ok_or_else(|| self.refuse(line, "a block closed that was not open"))?
                    }
                    _ => {}
                }
            }
        }
        if depth != 0 {
            return Err(self.refuse("", "a block is not closed"));
        }
        Ok(ConfFile(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_bare_tokens_and_the_rest_is_refused() {
        let k = Syntax::Keepalived;
        for ok in [
            "ntpxdp-v0",
            "169.254.100.1/24",
            "fd00:ec2::123/128",
            "0.5",
            "/run/x.sock",
        ] {
            assert_eq!(k.word(ok).unwrap(), ok);
        }
        for bad in [
            "", "a b", "a\tb", "a\nb", "a\rb", "a\0b", "a\"b", "a'b", "a\\b", "a{b", "a}b", "a;b",
            "a#b", "a!b", "a$b", "a@b", "a~b", "é",
        ] {
            let e = k.word(bad).unwrap_err();
            assert_eq!(e.value, bad);
            assert!(Syntax::Radvd.word(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            k.command(&["/usr/bin/ntp-xdp", "health", "--socket", "/run/c.sock"])
                .unwrap(),
            "\"/usr/bin/ntp-xdp health --socket /run/c.sock\""
        );
        assert!(k.command(&["/usr/bin/ntp user", "health"]).is_err());
        assert!(k.command(&["/x\"", "health"]).is_err());
        assert!(k.command::<&str>(&[]).is_err());
        assert!(Syntax::Radvd.command(&["/x"]).is_err());
    }

    #[test]
    fn a_whole_file_is_checked_again() {
        let k = Syntax::Keepalived;
        assert!(k.file("a {\n  b \"c d\"\n}\n# any \"text\n".into()).is_ok());
        for bad in [
            "a {\n",
            "}\n",
            "a \"b\n",
            "a \0\n",
            "a \u{1b}\n",
            "a\rb\n",
            "a b\r\n",
            "a \\\"b\n",
        ] {
            assert!(k.file(bad.into()).is_err(), "{bad:?}");
        }
        assert!(Syntax::Radvd.file("a \"b\";\n".into()).is_err());
    }
}
