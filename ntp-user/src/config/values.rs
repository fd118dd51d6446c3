//! Values read from a configuration in their own types, parsed as they are read (a refused
//! value's error names its field through [`super::read`]): durations and reference IDs.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as operators write it: `500ms`, `30s`, `1h`, `1d` (humantime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(s: u64) -> HumanDuration {
        HumanDuration(Duration::from_secs(s))
    }

    pub const fn from_millis(ms: u64) -> HumanDuration {
        HumanDuration(Duration::from_millis(ms))
    }
}

impl std::str::FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| format!("{s:?} is not a duration like 30s or 1h ({e})"))
    }
}

impl std::ops::Deref for HumanDuration {
    type Target = Duration;
    fn deref(&self) -> &Duration {
        &self.0
    }
}

impl From<Duration> for HumanDuration {
    fn from(d: Duration) -> HumanDuration {
        HumanDuration(d)
    }
}

/// In the largest unit that holds it whole (`1000s`, `1d`, `200ms`), as an operator writes it;
/// read back as the same duration.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = self.0.as_nanos();
        let units: [(u128, &str); 7] = [
            (86_400_000_000_000, "d"),
            (3_600_000_000_000, "h"),
            (60_000_000_000, "m"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
            (1, "ns"),
        ];
        match units.iter().find(|(unit, _)| ns % unit == 0 && ns > 0) {
            Some((unit, name)) => write!(f, "{}{name}", ns / unit),
            None => f.write_str("0s"),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for HumanDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "duration",
            "description": "A duration: a number and a unit (ns, us, ms, s, m, h, d), or several, e.g. `500ms`, `30s`, `1h`, `1d`, `1m 30s`.",
        })
    }
}

/// A reference ID: an IPv4 address (the stratum 2+ convention) or 1-4 printable ASCII
/// characters, NUL-padded (stratum 1 and local clocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefId(pub [u8; 4]);

/// Parses a reference ID (see [`RefId`]).
pub fn parse_refid(s: &str) -> Result<[u8; 4], String> {
    if let Ok(v4) = s.parse::<Ipv4Addr>() {
        return Ok(v4.octets());
    }
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "{s:?} is neither an IPv4 address nor 1-4 printable ASCII characters"
        ));
    }
    let mut id = [0u8; 4];
    id[..s.len()].copy_from_slice(s.as_bytes());
    Ok(id)
}

impl std::str::FromStr for RefId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_refid(s).map(RefId)
    }
}

impl<'de> Deserialize<'de> for RefId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// As read when it is ASCII; an address otherwise.
impl fmt::Display for RefId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.split(|b| *b == 0).next().unwrap_or_default();
        match std::str::from_utf8(text) {
            Ok(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) => f.write_str(s),
            _ => write!(f, "{}", Ipv4Addr::from(self.0)),
        }
    }
}

impl Serialize for RefId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl schemars::JsonSchema for RefId {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RefId".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "format": "refid",
            "description": "A reference ID: an IPv4 address or 1-4 printable ASCII characters.",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_refids_read_as_written() {
        assert_eq!(
            "1h".parse::<HumanDuration>().unwrap(),
            HumanDuration::from_secs(3600)
        );
        let e = "forever".parse::<HumanDuration>().unwrap_err();
        assert!(e.contains("\"forever\"") && e.contains("30s or 1h"), "{e}");
        for (d, text) in [
            (HumanDuration::from_millis(200), "200ms"),
            (HumanDuration::from_secs(1000), "1000s"),
            (HumanDuration::from_secs(86400), "1d"),
            (HumanDuration::from_secs(90), "90s"),
            (HumanDuration::from_secs(0), "0s"),
        ] {
            assert_eq!(d.to_string(), text);
            assert_eq!(text.parse::<HumanDuration>().unwrap(), d);
        }
        assert_eq!("GPS".parse::<RefId>().unwrap().0, [b'G', b'P', b'S', 0]);
        assert_eq!("169.254.0.1".parse::<RefId>().unwrap().0, [169, 254, 0, 1]);
        assert!("TOOLONG".parse::<RefId>().is_err());
        assert_eq!(RefId(*b"LOCL").to_string(), "LOCL");
        assert_eq!(RefId([169, 254, 0, 1]).to_string(), "169.254.0.1");
    }
}
