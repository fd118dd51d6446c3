//! Cookies (RFC 8915 §6): a client's two session keys, sealed under a server key that
//! rotates, so that the server keeps no per-client state. Sans IO: randomness comes in as
//! values, the keys go out as JSON for the caller to store.
//!
//! A cookie is `key id (4) ‖ nonce (16) ‖ AES-SIV-CMAC-256(server key, nonce, C2S ‖ S2C)`:
//! 100 bytes (a multiple of 4, so its extension field needs no padding). Only
//! AEAD_AES_SIV_CMAC_256 is negotiated, so the algorithm is not in the cookie.

use aes_siv::siv::Aes128Siv;
use aes_siv::KeyInit as _;
use serde::{Deserialize, Serialize};

/// Server keys kept: the current one and this many less one older (a cookie stays good for
/// that many rotations, so a client polling rarely is not forced to a new key exchange).
pub const KEYS_KEPT: usize = 4;
pub const COOKIE_LEN: usize = 4 + 16 + 16 + 64;

/// The two keys of one client's association, exported from its TLS session.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    pub c2s: [u8; 32],
    pub s2c: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerKey {
    pub id: u32,
    key: Vec<u8>,
    /// When it was made (Unix seconds): rotation is due `rotation` after the newest.
    pub created_unix: u64,
}

/// The server keys, newest last.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CookieKeys {
    keys: Vec<ServerKey>,
}

impl std::fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.id, k.created_unix)))
            .finish()
    }
}

impl CookieKeys {
    /// One fresh key.
    pub fn new(fresh: [u8; 32], id: u32, now_unix: u64) -> CookieKeys {
        CookieKeys {
            keys: vec![ServerKey {
                id,
                key: fresh.to_vec(),
                created_unix: now_unix,
            }],
        }
    }

    pub fn current(&self) -> &ServerKey {
        self.keys.last().expect("never empty")
    }

    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Adds a new current key when the newest is `rotation_s` old (or from the future: a
    /// clock set back); drops the oldest beyond [`KEYS_KEPT`]. True when it rotated.
    pub fn rotate_if_due(&mut self, now_unix: u64, rotation_s: u64, fresh: [u8; 32]) -> bool {
        let newest = self.current();
        let age = now_unix.checked_sub(newest.created_unix);
        if age.is_some_and(|a| a < rotation_s) {
            return false;
        }
        let id = newest.id.wrapping_add(1);
        self.keys.push(ServerKey {
            id,
            key: fresh.to_vec(),
            created_unix: now_unix,
        });
        let excess = self.keys.len().saturating_sub(KEYS_KEPT);
        self.keys.drain(..excess);
        true
    }

    /// Seals `session` under the current key.
    pub fn seal(&self, session: &SessionKeys, nonce: [u8; 16]) -> Vec<u8> {
        let key = self.current();
        let mut plain = [0u8; 64];
        plain[..32].copy_from_slice(&session.c2s);
        plain[32..].copy_from_slice(&session.s2c);
        let sealed = siv(&key.key)
            .encrypt([&key.id.to_be_bytes()[..], &nonce[..]], &plain)
            .expect("AES-SIV seals any length");
        let mut out = Vec::with_capacity(COOKIE_LEN);
        out.extend_from_slice(&key.id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The session keys in `cookie`, if it was sealed by a key still kept and is intact.
    pub fn open(&self, cookie: &[u8]) -> Option<SessionKeys> {
        if cookie.len() != COOKIE_LEN {
            return None;
        }
        let id = u32::from_be_bytes(cookie[..4].try_into().ok()?);
        let key = self.keys.iter().find(|k| k.id == id)?;
        let plain = siv(&key.key)
            .decrypt([&cookie[..4], &cookie[4..20]], &cookie[20..])
            .ok()?;
        Some(SessionKeys {
            c2s: plain[..32].try_into().ok()?,
            s2c: plain[32..].try_into().ok()?,
        })
    }

    /// Checks what was read from a file: keys of the right size, distinct ids.
    pub fn check(&self) -> Result<(), String> {
        if self.keys.is_empty() {
            return Err("no key".into());
        }
        if let Some(k) = self.keys.iter().find(|k| k.key.len() != 32) {
            return Err(format!("key {} is {} bytes, not 32", k.id, k.key.len()));
        }
        let mut ids = self.ids();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.keys.len() {
            return Err("two keys share an id".into());
        }
        Ok(())
    }
}

/// The key that seals the cookie keys in the fleet's store: 32 bytes every host of a
/// cluster has in a file and the store never sees.
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey([u8; 32]);

impl SealKey {
    pub fn new(bytes: [u8; 32]) -> SealKey {
        SealKey(bytes)
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// The cookie keys as the fleet's store holds them: AES-SIV under the [`SealKey`], bound to
/// the store key they are kept under (so a value copied from another cluster does not open).
/// Whoever reads the store learns nothing of the keys; whoever writes it can replace the
/// value, and hosts then refuse what does not open and keep their keys.
#[derive(Serialize, Deserialize)]
struct SealedKeys {
    nonce: Vec<u8>,
    sealed: Vec<u8>,
}

/// Why a stored value gave no keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredKeysError {
    /// Not a sealed value (keys in clear, or anything else): replaceable.
    NotSealed,
    /// Sealed, but not by this seal key for this store key (another seal key, another
    /// cluster's value, or altered): left alone.
    DoesNotOpen,
    /// It opened, but the keys inside are not usable.
    Invalid(String),
}

impl std::fmt::Display for StoredKeysError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredKeysError::NotSealed => f.write_str("not sealed keys"),
            StoredKeysError::DoesNotOpen => f.write_str(
                "sealed keys that do not open with this host's seal key (is \
                 fleet.nts_seal_key_file the same on every host?)",
            ),
            StoredKeysError::Invalid(why) => write!(f, "sealed keys that are not usable: {why}"),
        }
    }
}

impl CookieKeys {
    /// The keys sealed for the store, where they are kept under `store_key`.
    pub fn seal_for_store(&self, seal: &SealKey, store_key: &str, nonce: [u8; 16]) -> String {
        let plain = serde_json::to_vec(self).expect("keys serialize");
        let sealed = siv(&seal.0)
            .encrypt([store_key.as_bytes(), &nonce[..]], &plain)
            .expect("AES-SIV seals any length");
        serde_json::to_string(&SealedKeys {
            nonce: nonce.to_vec(),
            sealed,
        })
        .expect("bytes serialize")
    }

    /// The keys in a value read from the store under `store_key`.
    pub fn open_from_store(
        text: &str,
        seal: &SealKey,
        store_key: &str,
    ) -> Result<CookieKeys, StoredKeysError> {
        let value: SealedKeys =
            serde_json::from_str(text).map_err(|_| StoredKeysError::NotSealed)?;
        let plain = siv(&seal.0)
            .decrypt([store_key.as_bytes(), &value.nonce[..]], &value.sealed)
            .map_err(|_| StoredKeysError::DoesNotOpen)?;
        let keys: CookieKeys =
            serde_json::from_slice(&plain).map_err(|e| StoredKeysError::Invalid(e.to_string()))?;
        keys.check().map_err(StoredKeysError::Invalid)?;
        Ok(keys)
    }
}

pub(super) fn siv(key: &[u8]) -> Aes128Siv {
    Aes128Siv::new_from_slice(key).expect("a 32-byte key")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionKeys {
        SessionKeys {
            c2s: [1; 32],
            s2c: [2; 32],
        }
    }

    #[test]
    fn a_cookie_opens_to_its_keys_and_a_tampered_one_does_not() {
        let keys = CookieKeys::new([9; 32], 7, 1000);
        let cookie = keys.seal(&session(), [3; 16]);
        assert_eq!(cookie.len(), COOKIE_LEN);
        assert_eq!(keys.open(&cookie), Some(session()));
        for i in 0..cookie.len() {
            let mut bad = cookie.clone();
            bad[i] ^= 0x10;
            assert_eq!(keys.open(&bad), None, "byte {i} flipped");
        }
        assert_eq!(keys.open(&cookie[..99]), None);
        let other = CookieKeys::new([8; 32], 7, 1000);
        assert_eq!(other.open(&cookie), None);
    }

    #[test]
    fn rotation_keeps_old_cookies_working_for_a_while() {
        let mut keys = CookieKeys::new([0; 32], 1, 1000);
        let cookie = keys.seal(&session(), [3; 16]);
        assert!(!keys.rotate_if_due(1000 + 59, 60, [1; 32]));
        for n in 1..KEYS_KEPT {
            assert!(keys.rotate_if_due(1000 + 60 * n as u64, 60, [n as u8 + 1; 32]));
            assert_eq!(keys.open(&cookie), Some(session()), "after {n} rotations");
        }
        assert_eq!(keys.current().id, KEYS_KEPT as u32);
        let fresh = keys.seal(&session(), [4; 16]);
        assert!(keys.rotate_if_due(1000 + 60 * KEYS_KEPT as u64, 60, [99; 32]));
        assert_eq!(keys.open(&cookie), None, "its key is gone");
        assert_eq!(keys.open(&fresh), Some(session()));
        assert_eq!(keys.ids().len(), KEYS_KEPT);
        // A clock set back rotates rather than keep one key for ever.
        assert!(keys.rotate_if_due(10, 60, [5; 32]));
    }

    #[test]
    fn sealed_keys_open_only_with_their_seal_key_under_their_store_key() {
        let mut keys = CookieKeys::new([0xa5; 32], 1, 1000);
        keys.rotate_if_due(2000, 60, [0x5a; 32]);
        let seal = SealKey::new([7; 32]);
        let at = "/ntp-xdp/az1/nts_keys";
        let text = keys.seal_for_store(&seal, at, [1; 16]);
        assert_eq!(
            CookieKeys::open_from_store(&text, &seal, at),
            Ok(keys.clone())
        );
        // Nothing of the keys is readable in it: not the bytes, not their JSON.
        let clear = serde_json::to_string(&keys).unwrap();
        for k in &keys.keys {
            let json = serde_json::to_string(&k.key).unwrap();
            assert!(!text.contains(&json[1..json.len() - 1]), "{text}");
            assert!(!text.as_bytes().windows(32).any(|w| w == k.key.as_slice()));
        }
        assert!(!text.contains("created_unix") && text != clear, "{text}");
        // Another seal key, another cluster's store key, an altered value: nothing.
        let other = SealKey::new([8; 32]);
        assert_eq!(
            CookieKeys::open_from_store(&text, &other, at),
            Err(StoredKeysError::DoesNotOpen)
        );
        assert_eq!(
            CookieKeys::open_from_store(&text, &seal, "/ntp-xdp/az2/nts_keys"),
            Err(StoredKeysError::DoesNotOpen)
        );
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["sealed"][20] = (v["sealed"][20].as_u64().unwrap() ^ 1).into();
        assert_eq!(
            CookieKeys::open_from_store(&v.to_string(), &seal, at),
            Err(StoredKeysError::DoesNotOpen)
        );
        // Keys in clear are not taken from the store.
        assert_eq!(
            CookieKeys::open_from_store(&clear, &seal, at),
            Err(StoredKeysError::NotSealed)
        );
        // Two seals of the same keys differ (fresh nonce), both open.
        let again = keys.seal_for_store(&seal, at, [2; 16]);
        assert_ne!(again, text);
        assert_eq!(CookieKeys::open_from_store(&again, &seal, at), Ok(keys));
    }

    #[test]
    fn keys_survive_a_round_trip_through_json() {
        let mut keys = CookieKeys::new([5; 32], 1, 1000);
        keys.rotate_if_due(2000, 60, [6; 32]);
        let json = serde_json::to_string(&keys).unwrap();
        let back: CookieKeys = serde_json::from_str(&json).unwrap();
        assert_eq!(back, keys);
        back.check().unwrap();
        let bad: CookieKeys =
            serde_json::from_str(r#"{"keys":[{"id":1,"key":[1,2],"created_unix":0}]}"#).unwrap();
        assert!(bad.check().unwrap_err().contains("not 32"));
    }
}
