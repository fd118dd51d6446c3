//! NTS-protected NTP packets (RFC 8915 §5), sans IO: a request's extension fields parsed and
//! authenticated with the keys in its cookie, and the protected reply (or the NTS NAK) built
//! around a header the caller computed as for any request.

use super::cookie::{siv, CookieKeys, SessionKeys};
use ntp_common::wire::NTP_HEADER_LEN;

pub const EF_UNIQUE_ID: u16 = 0x0104;
pub const EF_COOKIE: u16 = 0x0204;
pub const EF_COOKIE_PLACEHOLDER: u16 = 0x0304;
pub const EF_AUTHENTICATOR: u16 = 0x0404;

/// Cookies a reply carries at most (the one used, plus one per placeholder).
pub const MAX_COOKIES_PER_REPLY: usize = 8;
/// The kiss code of an NTS negative acknowledgement.
pub const KISS_NTSN: [u8; 4] = *b"NTSN";

/// An NTS request's parts, borrowed from the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NtsRequest<'a> {
    /// The Unique Identifier field's body, echoed in the reply.
    pub unique_id: &'a [u8],
    pub cookie: &'a [u8],
    /// Placeholders as long as the cookie: each asks for one more cookie.
    pub placeholders: usize,
    /// Where the authenticator field starts: everything before it is associated data.
    auth_start: usize,
    nonce: &'a [u8],
    ciphertext: &'a [u8],
}

/// What a request is, as NTS sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// No NTS field: answered as any request.
    NotNts,
    /// NTS fields that do not make a request (no identifier, two cookies, a bad
    /// authenticator field): never answered.
    Malformed(&'static str),
    Request(NtsRequest<'a>),
}

/// What the userspace path does with an NTS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Authenticated: these are its session keys.
    Authentic(SessionKeys),
    /// The cookie is not one of ours (any more): an NTS NAK tells the client to do a new
    /// key exchange.
    UnknownCookie,
    /// The cookie opened but the request does not authenticate with its key: a NAK too
    /// (RFC 8915 §5.7), never time.
    BadAuthenticator,
}

fn fields(packet: &[u8]) -> impl Iterator<Item = Result<(u16, usize, &[u8]), ()>> {
    let mut at = NTP_HEADER_LEN;
    std::iter::from_fn(move || {
        if at >= packet.len() {
            return None;
        }
        let Some(head) = packet.get(at..at + 4) else {
            at = packet.len();
            return Some(Err(()));
        };
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let Some(body) = packet
            .get(at + 4..at + len)
            .filter(|_| len >= 4 && len % 4 == 0)
        else {
            at = packet.len();
            return Some(Err(()));
        };
        let start = at;
        at += len;
        Some(Ok((kind, start, body)))
    })
}

fn is_nts(kind: u16) -> bool {
    matches!(
        kind,
        EF_UNIQUE_ID | EF_COOKIE | EF_COOKIE_PLACEHOLDER | EF_AUTHENTICATOR
    )
}

/// Parses the extension fields of `packet` (a client request, header included).
pub fn parse(packet: &[u8]) -> Parsed<'_> {
    let mut unique_id = None;
    let mut cookie = None;
    let mut placeholders = Vec::new();
    let mut auth = None;
    let mut seen_nts = false;
    for f in fields(packet) {
        let Ok((kind, start, body)) = f else {
            // Not extension fields at all (a legacy MAC, say) unless NTS ones came first.
            return if seen_nts {
                Parsed::Malformed("extension fields do not add up")
            } else {
                Parsed::NotNts
            };
        };
        seen_nts |= is_nts(kind);
        if auth.is_some() {
            return Parsed::Malformed("a field after the authenticator");
        }
        match kind {
            EF_UNIQUE_ID if unique_id.is_some() => return Parsed::Malformed("two identifiers"),
            EF_UNIQUE_ID => unique_id = Some(body),
            EF_COOKIE if cookie.is_some() => return Parsed::Malformed("two cookies"),
            EF_COOKIE => cookie = Some(body),
            EF_COOKIE_PLACEHOLDER => placeholders.push(body.len()),
            EF_AUTHENTICATOR => auth = Some((start, body)),
            _ => {}
        }
    }
    if !seen_nts {
        return Parsed::NotNts;
    }
    let Some(unique_id) = unique_id.filter(|u| u.len() >= 32) else {
        return Parsed::Malformed("no unique identifier of 32 bytes or more");
    };
    let Some(cookie) = cookie else {
        return Parsed::Malformed("no cookie");
    };
    let Some((auth_start, body)) = auth else {
        return Parsed::Malformed("no authenticator");
    };
    let Some((nonce, ciphertext)) = authenticator_parts(body) else {
        return Parsed::Malformed("authenticator field does not add up");
    };
    Parsed::Request(NtsRequest {
        unique_id,
        cookie,
        placeholders: placeholders.iter().filter(|l| **l == cookie.len()).count(),
        auth_start,
        nonce,
        ciphertext,
    })
}

/// Nonce and ciphertext of an authenticator field's body (§5.6), each padded to 4 bytes.
fn authenticator_parts(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nonce_len = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let ct_len = u16::from_be_bytes(body.get(2..4)?.try_into().ok()?) as usize;
    let nonce = body.get(4..4 + nonce_len)?;
    let ct_at = 4 + nonce_len.next_multiple_of(4);
    let ciphertext = body.get(ct_at..ct_at + ct_len)?;
    // AES-SIV-CMAC-256 asks for a nonce of 16 bytes or more (§5.6), and a tag is 16.
    (nonce_len >= 16 && ct_len >= 16).then_some((nonce, ciphertext))
}

/// Opens the request's cookie and checks its authenticator over everything before it.
pub fn verify(packet: &[u8], req: &NtsRequest<'_>, keys: &CookieKeys) -> Verdict {
    let Some(session) = keys.open(req.cookie) else {
        return Verdict::UnknownCookie;
    };
    let ad = &packet[..req.auth_start];
    match siv(&session.c2s).decrypt([ad, req.nonce], req.ciphertext) {
        // The plaintext holds encrypted fields a client may send; none asks anything of us.
        Ok(_) => Verdict::Authentic(session),
        Err(_) => Verdict::BadAuthenticator,
    }
}

fn push_field(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    let len = 4 + body.len().next_multiple_of(4);
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + (len - 4 - body.len()), 0);
}

/// How many cookies the reply carries: the one spent and one per placeholder, bounded. Never
/// more bytes than the request, since each placeholder is as long as a cookie.
pub fn cookies_wanted(req: &NtsRequest<'_>) -> usize {
    (1 + req.placeholders).min(MAX_COOKIES_PER_REPLY)
}

/// The protected reply: `header`, the request's identifier, and an authenticator whose
/// encrypted part holds `cookies`, sealed with the server-to-client key under `nonce`.
pub fn protected_reply(
    header: &[u8; NTP_HEADER_LEN],
    req: &NtsRequest<'_>,
    session: &SessionKeys,
    cookies: &[Vec<u8>],
    nonce: [u8; 16],
) -> Vec<u8> {
    let mut out = header.to_vec();
    push_field(&mut out, EF_UNIQUE_ID, req.unique_id);
    let mut plain = Vec::new();
    for c in cookies {
        push_field(&mut plain, EF_COOKIE, c);
    }
    push_authenticator(&mut out, &session.s2c, nonce, &plain);
    out
}

/// Appends the authenticator field: `plain` sealed with `key` under `nonce`, everything
/// already in `out` as associated data (§5.6).
fn push_authenticator(out: &mut Vec<u8>, key: &[u8; 32], nonce: [u8; 16], plain: &[u8]) {
    let sealed = siv(key)
        .encrypt([&out[..], &nonce[..]], plain)
        .expect("AES-SIV seals any length");
    let mut body = Vec::with_capacity(4 + 16 + sealed.len());
    body.extend_from_slice(&16u16.to_be_bytes());
    body.extend_from_slice(&(sealed.len() as u16).to_be_bytes());
    body.extend_from_slice(&nonce);
    body.extend_from_slice(&sealed);
    push_field(out, EF_AUTHENTICATOR, &body);
}

/// An NTS NAK (§5.7): a kiss-o'-death header with code NTSN and the request's identifier,
/// nothing else.
pub fn nak(kod_header: &[u8; NTP_HEADER_LEN], unique_id: &[u8]) -> Vec<u8> {
    let mut out = kod_header.to_vec();
    push_field(&mut out, EF_UNIQUE_ID, unique_id);
    out
}

/// A client's request, for tests and the benchmark: `header`, identifier, cookie,
/// `placeholders`, authenticator with `c2s` under `nonce`.
pub fn client_request(
    header: &[u8; NTP_HEADER_LEN],
    unique_id: &[u8; 32],
    cookie: &[u8],
    placeholders: usize,
    c2s: &[u8; 32],
    nonce: [u8; 16],
) -> Vec<u8> {
    let mut out = header.to_vec();
    push_field(&mut out, EF_UNIQUE_ID, unique_id);
    push_field(&mut out, EF_COOKIE, cookie);
    for _ in 0..placeholders {
        push_field(&mut out, EF_COOKIE_PLACEHOLDER, &vec![0; cookie.len()]);
    }
    push_authenticator(&mut out, c2s, nonce, &[]);
    out
}

/// What a client learns from a reply to its request with `unique_id`: the cookies, if the
/// reply authenticates with `s2c`; None for anything else (a NAK included).
pub fn client_open_reply(reply: &[u8], unique_id: &[u8], s2c: &[u8; 32]) -> Option<Vec<Vec<u8>>> {
    let mut uid_ok = false;
    for f in fields(reply) {
        let (kind, start, body) = f.ok()?;
        match kind {
            EF_UNIQUE_ID => uid_ok = body == unique_id,
            EF_AUTHENTICATOR if uid_ok => {
                let (nonce, ct) = authenticator_parts(body)?;
                let plain = siv(s2c).decrypt([&reply[..start], nonce], ct).ok()?;
                let mut cookies = Vec::new();
                let mut at = 0;
                while at + 4 <= plain.len() {
                    let kind = u16::from_be_bytes([plain[at], plain[at + 1]]);
                    let len = u16::from_be_bytes([plain[at + 2], plain[at + 3]]) as usize;
                    let body = plain.get(at + 4..at + len.max(4))?;
                    if kind == EF_COOKIE {
                        cookies.push(body.to_vec());
                    }
                    at += len.max(4);
                }
                return Some(cookies);
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nts::cookie::COOKIE_LEN;

    fn session() -> SessionKeys {
        SessionKeys {
            c2s: [1; 32],
            s2c: [2; 32],
        }
    }

    fn keys() -> CookieKeys {
        CookieKeys::new([9; 32], 3, 0)
    }

    fn request(placeholders: usize) -> Vec<u8> {
        let mut header = [0u8; 48];
        header[0] = 0x23;
        let cookie = keys().seal(&session(), [5; 16]);
        client_request(&header, &[7; 32], &cookie, placeholders, &[1; 32], [6; 16])
    }

    #[test]
    fn a_client_request_parses_and_authenticates() {
        let req = request(2);
        let Parsed::Request(r) = parse(&req) else {
            panic!("{:?}", parse(&req))
        };
        assert_eq!(r.unique_id, [7; 32]);
        assert_eq!(r.cookie.len(), COOKIE_LEN);
        assert_eq!(r.placeholders, 2);
        assert_eq!(cookies_wanted(&r), 3);
        assert_eq!(verify(&req, &r, &keys()), Verdict::Authentic(session()));
    }

    #[test]
    fn any_changed_byte_fails_and_a_foreign_cookie_is_unknown() {
        let req = request(1);
        for i in 0..req.len() {
            let mut bad = req.clone();
            bad[i] ^= 0x01;
            match parse(&bad) {
                Parsed::Request(r) => {
                    assert_ne!(
                        verify(&bad, &r, &keys()),
                        Verdict::Authentic(session()),
                        "byte {i}"
                    )
                }
                Parsed::Malformed(_) | Parsed::NotNts => {}
            }
        }
        let Parsed::Request(r) = parse(&req) else {
            panic!()
        };
        let other = CookieKeys::new([8; 32], 3, 0);
        assert_eq!(verify(&req, &r, &other), Verdict::UnknownCookie);
    }

    #[test]
    fn plain_and_malformed_requests_are_told_apart() {
        let plain = [0x23u8; 48];
        assert_eq!(parse(&plain), Parsed::NotNts);
        // A legacy MAC (key id + 16-byte digest) is not NTS.
        let mut mac = plain.to_vec();
        mac.extend_from_slice(&[0; 20]);
        assert_eq!(parse(&mac), Parsed::NotNts);
        // An unknown extension field alone is not NTS either.
        let mut unknown = plain.to_vec();
        push_field(&mut unknown, 0x2005, &[0; 12]);
        assert_eq!(parse(&unknown), Parsed::NotNts);
        let mut no_cookie = plain.to_vec();
        push_field(&mut no_cookie, EF_UNIQUE_ID, &[1; 32]);
        push_field(&mut no_cookie, EF_AUTHENTICATOR, &[0; 40]);
        assert_eq!(parse(&no_cookie), Parsed::Malformed("no cookie"));
        let mut short_uid = plain.to_vec();
        push_field(&mut short_uid, EF_UNIQUE_ID, &[1; 16]);
        assert!(matches!(parse(&short_uid), Parsed::Malformed(_)));
        let mut truncated = request(0);
        truncated.truncate(truncated.len() - 4);
        assert!(matches!(parse(&truncated), Parsed::Malformed(_)));
        let mut after = request(0);
        push_field(&mut after, 0x2005, &[0; 12]);
        assert_eq!(
            parse(&after),
            Parsed::Malformed("a field after the authenticator")
        );
    }

    #[test]
    fn the_reply_authenticates_for_the_client_and_is_no_bigger_than_the_request() {
        for placeholders in [0, 1, 7, 12] {
            let req = request(placeholders);
            let Parsed::Request(r) = parse(&req) else {
                panic!()
            };
            let Verdict::Authentic(s) = verify(&req, &r, &keys()) else {
                panic!()
            };
            let cookies: Vec<Vec<u8>> = (0..cookies_wanted(&r))
                .map(|i| keys().seal(&s, [i as u8; 16]))
                .collect();
            let header = [0x24u8; 48];
            let reply = protected_reply(&header, &r, &s, &cookies, [4; 16]);
            assert!(reply.len() <= req.len(), "{} > {}", reply.len(), req.len());
            let got = client_open_reply(&reply, &[7; 32], &[2; 32]).expect("authentic");
            assert_eq!(got, cookies);
            for c in &got {
                assert_eq!(keys().open(c), Some(session()));
            }
            // Not for another identifier, not with the other key, not when changed.
            assert!(client_open_reply(&reply, &[8; 32], &[2; 32]).is_none());
            assert!(client_open_reply(&reply, &[7; 32], &[1; 32]).is_none());
            let mut bad = reply.clone();
            bad[40] ^= 1;
            assert!(client_open_reply(&bad, &[7; 32], &[2; 32]).is_none());
        }
    }

    #[test]
    fn a_nak_carries_only_the_identifier() {
        let n = nak(&[0; 48], &[7; 32]);
        assert_eq!(n.len(), 48 + 36);
        assert!(client_open_reply(&n, &[7; 32], &[2; 32]).is_none());
    }
}
