//! Who the responder answers: the policy (rate limit, kiss-o'-death, guest clock records),
//! the access list and the table sizes, as one value that config and CLI build.

use std::net::IpAddr;

use anyhow::Result;
use aya::maps::lpm_trie::Key as LpmKey;
use ipnet::IpNet;
use ntp_common::policy::ResponderPolicy;
use ntp_common::wire::ipv4_mapped_key;

use crate::responder::{Responder, TableSizes};

#[derive(Debug, Clone)]
pub struct AdmissionSpec {
    pub policy: ResponderPolicy,
    pub acl: Vec<AclEntry>,
    pub tables: TableSizes,
}

impl AdmissionSpec {
    /// Everyone answered without limit, nothing recorded (benchmarks, `--no-rate-limit`).
    pub fn open() -> AdmissionSpec {
        AdmissionSpec {
            policy: ResponderPolicy::OPEN,
            acl: Vec::new(),
            tables: TableSizes::default(),
        }
    }

    /// Writes the policy and the access list into the responder's maps.
    pub fn apply(&self, responder: &mut Responder) -> Result<()> {
        responder.set_access_list(&self.acl)?;
        responder.set_policy(self.policy)
    }
}

/// The policy and access-list maps, held apart from the responder (see
/// [`Responder::admission_writer`]).
pub struct AdmissionWriter {
    pub(crate) policy: aya::maps::Array<aya::maps::MapData, ResponderPolicy>,
    pub(crate) acl: aya::maps::LpmTrie<aya::maps::MapData, [u8; 16], u8>,
}

impl AdmissionWriter {
    /// Writes `spec`'s policy and access list (the table sizes are fixed at load).
    pub fn apply(&mut self, spec: &AdmissionSpec) -> Result<()> {
        super::write_access_list(&mut self.acl, &spec.acl)?;
        self.policy
            .set(0, spec.policy, 0)
            .map_err(|e| anyhow::anyhow!("writing POLICY: {e}"))
    }
}

/// An access-list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    pub prefix: IpNet,
    pub allow: bool,
}

/// The LPM key of a prefix: IPv4 as ::ffff:a.b.c.d/(96 + len).
pub fn acl_key(prefix: IpNet) -> LpmKey<[u8; 16]> {
    let prefix = prefix.trunc();
    match prefix {
        IpNet::V4(n) => LpmKey::new(
            96 + n.prefix_len() as u32,
            ipv4_mapped_key(n.addr().octets()),
        ),
        IpNet::V6(n) => LpmKey::new(n.prefix_len() as u32, n.addr().octets()),
    }
}

/// Address of a map key (IPv4-mapped or IPv6).
pub fn key_address(key: &[u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}
