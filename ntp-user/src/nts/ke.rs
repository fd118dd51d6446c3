//! The NTS-KE records (RFC 8915 §4), sans IO: a client's request in, the server's response
//! out. The TLS session and the key export are the caller's ([`super::server`]).

use super::{AEAD_AES_SIV_CMAC_256, NEXT_PROTOCOL_NTPV4};

/// Record types (RFC 8915 §4.1).
pub const REC_END: u16 = 0;
pub const REC_NEXT_PROTOCOL: u16 = 1;
pub const REC_ERROR: u16 = 2;
pub const REC_WARNING: u16 = 3;
pub const REC_AEAD: u16 = 4;
pub const REC_NEW_COOKIE: u16 = 5;
pub const REC_SERVER: u16 = 6;
pub const REC_PORT: u16 = 7;
const CRITICAL: u16 = 0x8000;

/// Error codes (RFC 8915 §4.1.3).
pub const ERR_UNRECOGNIZED_CRITICAL: u16 = 0;
pub const ERR_BAD_REQUEST: u16 = 1;
pub const ERR_INTERNAL: u16 = 2;

/// The largest request this server reads: a real one is a few dozen bytes.
pub const MAX_REQUEST: usize = 1024;

/// One record as it is on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    pub critical: bool,
    pub kind: u16,
    pub body: &'a [u8],
}

/// Splits `buf` into records up to and including End of Message. `Ok(None)`: not complete
/// yet (read more).
pub fn split_records(buf: &[u8]) -> Result<Option<Vec<Record<'_>>>, KeError> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let Some(head) = buf.get(at..at + 4) else {
            return if buf.len() > MAX_REQUEST {
                Err(KeError::BadRequest("request too long"))
            } else {
                Ok(None)
            };
        };
        let word = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let Some(body) = buf.get(at + 4..at + 4 + len) else {
            return if buf.len() > MAX_REQUEST {
                Err(KeError::BadRequest("request too long"))
            } else {
                Ok(None)
            };
        };
        let rec = Record {
            critical: word & CRITICAL != 0,
            kind: word & !CRITICAL,
            body,
        };
        at += 4 + len;
        let end = rec.kind == REC_END;
        out.push(rec);
        if end {
            if at != buf.len() {
                return Err(KeError::BadRequest("data after End of Message"));
            }
            return Ok(Some(out));
        }
    }
}

/// Why a key exchange got an Error record instead of cookies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeError {
    UnrecognizedCritical(u16),
    BadRequest(&'static str),
}

impl KeError {
    pub fn code(self) -> u16 {
        match self {
            KeError::UnrecognizedCritical(_) => ERR_UNRECOGNIZED_CRITICAL,
            KeError::BadRequest(_) => ERR_BAD_REQUEST,
        }
    }
}

impl std::fmt::Display for KeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeError::UnrecognizedCritical(t) => write!(f, "unrecognized critical record {t}"),
            KeError::BadRequest(why) => write!(f, "bad request: {why}"),
        }
    }
}

/// What the client asked for, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// NTPv4 with AEAD_AES_SIV_CMAC_256: export keys and send cookies.
    NtpV4AesSiv,
    /// The client offers no protocol this server speaks (empty Next Protocol reply).
    NoProtocol,
    /// NTPv4, but no algorithm this server has (empty AEAD reply).
    NoAlgorithm,
}

/// Checks a client's records (RFC 8915 §4.1): exactly one Next Protocol, at most one AEAD,
/// no unknown critical record; server/port records from a client are hints and ignored.
pub fn negotiate(records: &[Record<'_>]) -> Result<Negotiated, KeError> {
    let mut protocols = None;
    let mut algorithms = None;
    for r in records {
        match r.kind {
            REC_END => {}
            REC_NEXT_PROTOCOL => {
                if protocols.replace(r.body).is_some() {
                    return Err(KeError::BadRequest("two Next Protocol records"));
                }
            }
            REC_AEAD => {
                if algorithms.replace(r.body).is_some() {
                    return Err(KeError::BadRequest("two AEAD records"));
                }
            }
            REC_ERROR | REC_WARNING | REC_NEW_COOKIE => {
                return Err(KeError::BadRequest("a record only a server sends"));
            }
            REC_SERVER | REC_PORT => {}
            other if r.critical => return Err(KeError::UnrecognizedCritical(other)),
            _ => {}
        }
    }
    let protocols = protocols.ok_or(KeError::BadRequest("no Next Protocol record"))?;
    if protocols.len() % 2 != 0 || algorithms.is_some_and(|a| a.len() % 2 != 0) {
        return Err(KeError::BadRequest("odd-length identifier list"));
    }
    let has = |list: &[u8], id: u16| list.chunks(2).any(|c| c == id.to_be_bytes());
    if !has(protocols, NEXT_PROTOCOL_NTPV4) {
        return Ok(Negotiated::NoProtocol);
    }
    match algorithms {
        Some(a) if has(a, AEAD_AES_SIV_CMAC_256) => Ok(Negotiated::NtpV4AesSiv),
        // The AEAD record is required with NTPv4 (§4.1.5).
        None => Err(KeError::BadRequest("no AEAD Algorithm record")),
        Some(_) => Ok(Negotiated::NoAlgorithm),
    }
}

fn push(out: &mut Vec<u8>, critical: bool, kind: u16, body: &[u8]) {
    let word = kind | if critical { CRITICAL } else { 0 };
    out.extend_from_slice(&word.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
}

/// Next Protocol NTPv4 (critical), then the AEAD record: AES-SIV, or empty (none agreed).
fn push_ntpv4(out: &mut Vec<u8>, aes_siv: bool, aead_critical: bool) {
    push(
        out,
        true,
        REC_NEXT_PROTOCOL,
        &NEXT_PROTOCOL_NTPV4.to_be_bytes(),
    );
    let aead = AEAD_AES_SIV_CMAC_256.to_be_bytes();
    push(
        out,
        aead_critical,
        REC_AEAD,
        if aes_siv { &aead[..] } else { &[] },
    );
}

/// The server's answer to a successful negotiation: protocol, algorithm, the NTP server
/// to use (`server`, an address or name, and `port` when not 123), the cookies, End.
pub fn response(
    negotiated: Negotiated,
    server: Option<&str>,
    port: Option<u16>,
    cookies: &[Vec<u8>],
) -> Vec<u8> {
    let mut out = Vec::new();
    match negotiated {
        Negotiated::NoProtocol => push(&mut out, true, REC_NEXT_PROTOCOL, &[]),
        Negotiated::NoAlgorithm => push_ntpv4(&mut out, false, true),
        Negotiated::NtpV4AesSiv => {
            push_ntpv4(&mut out, true, true);
            if let Some(server) = server {
                push(&mut out, true, REC_SERVER, server.as_bytes());
            }
            if let Some(port) = port.filter(|p| *p != 123) {
                push(&mut out, true, REC_PORT, &port.to_be_bytes());
            }
            for c in cookies {
                push(&mut out, false, REC_NEW_COOKIE, c);
            }
        }
    }
    push(&mut out, true, REC_END, &[]);
    out
}

/// What a client sends: NTPv4 with AEAD_AES_SIV_CMAC_256 (the tests' own client).
pub fn client_request() -> Vec<u8> {
    let mut out = Vec::new();
    // A client may send its AEAD record critical or not (RFC 8915 §4.1.5); ours does not.
    push_ntpv4(&mut out, true, false);
    push(&mut out, true, REC_END, &[]);
    out
}

/// An Error record and End of Message.
pub fn error_response(e: KeError) -> Vec<u8> {
    let mut out = Vec::new();
    push(&mut out, true, REC_ERROR, &e.code().to_be_bytes());
    push(&mut out, true, REC_END, &[]);
    out
}

/// The TLS exporter context for one direction (RFC 8915 §5.1): protocol, algorithm, 0 for
/// client-to-server, 1 for server-to-client.
pub fn exporter_context(s2c: bool) -> [u8; 5] {
    let p = NEXT_PROTOCOL_NTPV4.to_be_bytes();
    let a = AEAD_AES_SIV_CMAC_256.to_be_bytes();
    [p[0], p[1], a[0], a[1], s2c as u8]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(critical: bool, kind: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        push(&mut v, critical, kind, body);
        v
    }

    fn request(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    fn chrony_like() -> Vec<u8> {
        let r = request(&[
            rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
            rec(false, REC_AEAD, &[0, 15]),
            rec(true, REC_END, &[]),
        ]);
        assert_eq!(client_request(), r);
        r
    }

    #[test]
    fn a_typical_request_negotiates_ntpv4_with_aes_siv() {
        let buf = chrony_like();
        let recs = split_records(&buf).unwrap().unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(negotiate(&recs), Ok(Negotiated::NtpV4AesSiv));
    }

    #[test]
    fn a_partial_request_asks_for_more() {
        let buf = chrony_like();
        for cut in 0..buf.len() {
            assert_eq!(split_records(&buf[..cut]), Ok(None), "cut at {cut}");
        }
        let mut long = buf.clone();
        long.push(0);
        assert!(split_records(&long).is_err());
        assert!(split_records(&vec![0x80; MAX_REQUEST + 8]).is_err());
    }

    #[test]
    fn requests_are_checked_as_the_rfc_says() {
        let cases: &[(&[Vec<u8>], Result<Negotiated, KeError>)] = &[
            (
                &[rec(true, REC_END, &[])],
                Err(KeError::BadRequest("no Next Protocol record")),
            ),
            (
                &[
                    rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
                    rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
                    rec(false, REC_AEAD, &[0, 15]),
                    rec(true, REC_END, &[]),
                ],
                Err(KeError::BadRequest("two Next Protocol records")),
            ),
            (
                &[
                    rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
                    rec(true, 0x1234, &[]),
                    rec(false, REC_AEAD, &[0, 15]),
                    rec(true, REC_END, &[]),
                ],
                Err(KeError::UnrecognizedCritical(0x1234)),
            ),
            (
                &[
                    rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
                    rec(false, 0x1234, &[1, 2, 3]),
                    rec(false, REC_AEAD, &[0, 1, 0, 15]),
                    rec(false, REC_SERVER, b"example"),
                    rec(true, REC_END, &[]),
                ],
                Ok(Negotiated::NtpV4AesSiv),
            ),
            (
                &[
                    rec(true, REC_NEXT_PROTOCOL, &[0x80, 1]),
                    rec(false, REC_AEAD, &[0, 15]),
                    rec(true, REC_END, &[]),
                ],
                Ok(Negotiated::NoProtocol),
            ),
            (
                &[
                    rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
                    rec(false, REC_AEAD, &[0, 30]),
                    rec(true, REC_END, &[]),
                ],
                Ok(Negotiated::NoAlgorithm),
            ),
            (
                &[
                    rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
                    rec(true, REC_END, &[]),
                ],
                Err(KeError::BadRequest("no AEAD Algorithm record")),
            ),
            (
                &[
                    rec(true, REC_NEXT_PROTOCOL, &[0, 0]),
                    rec(false, REC_AEAD, &[0, 15]),
                    rec(false, REC_NEW_COOKIE, &[1; 8]),
                    rec(true, REC_END, &[]),
                ],
                Err(KeError::BadRequest("a record only a server sends")),
            ),
        ];
        for (parts, want) in cases {
            let buf = request(parts);
            let recs = split_records(&buf).unwrap().unwrap();
            assert_eq!(negotiate(&recs), *want, "{parts:?}");
        }
    }

    #[test]
    fn the_response_carries_cookies_and_the_server() {
        let cookies = vec![vec![7u8; 100]; 8];
        let out = response(
            Negotiated::NtpV4AesSiv,
            Some("169.254.169.123"),
            Some(123),
            &cookies,
        );
        let recs = split_records(&out).unwrap().unwrap();
        let kinds: Vec<u16> = recs.iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                REC_NEXT_PROTOCOL,
                REC_AEAD,
                REC_SERVER,
                REC_NEW_COOKIE,
                REC_NEW_COOKIE,
                REC_NEW_COOKIE,
                REC_NEW_COOKIE,
                REC_NEW_COOKIE,
                REC_NEW_COOKIE,
                REC_NEW_COOKIE,
                REC_NEW_COOKIE,
                REC_END
            ]
        );
        assert_eq!(recs[1].body, [0, 15]);
        assert_eq!(recs[2].body, b"169.254.169.123");
        assert!(recs[0].critical && recs[11].critical && !recs[3].critical);
        let err = error_response(KeError::BadRequest("x"));
        assert_eq!(err, [0x80, 2, 0, 2, 0, 1, 0x80, 0, 0, 0]);
    }
}
