//! Who the responder answers: the policy (rate limit, kiss-o'-death, guest clock records),
//! the access list, the VLANs and the table sizes, as one value that config and CLI build,
//! and the writes that put it in the kernel's maps while they serve.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData};
use ipnet::IpNet;
use ntp_common::policy::{ResponderPolicy, ACL_ALLOW, ACL_DENY, POLICY_ACL, POLICY_DEFAULT_DENY};
use ntp_common::wire::ipv4_mapped_key;

/// Sizes of the per-source table, set when the object is loaded: it holds the larger of
/// the two (a source's rate state and its guest clock record share one entry); sources
/// beyond it evict the longest idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableSizes {
    /// Sources whose rate is limited.
    pub rate_sources: u32,
    /// Guests whose clocks are recorded.
    pub guests: u32,
}

impl Default for TableSizes {
    fn default() -> Self {
        TableSizes {
            rate_sources: 65_536,
            guests: 65_536,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdmissionSpec {
    pub policy: ResponderPolicy,
    pub acl: Vec<AclEntry>,
    /// VLAN IDs whose tagged requests are answered (untagged ones always are).
    pub vlans: Vec<u16>,
    pub tables: TableSizes,
}

impl AdmissionSpec {
    /// Everyone answered without limit, nothing recorded (the kernel fixtures start from it);
    /// tagged frames only on no VLAN.
    pub fn open() -> AdmissionSpec {
        AdmissionSpec {
            policy: ResponderPolicy::OPEN,
            acl: Vec::new(),
            vlans: Vec::new(),
            tables: TableSizes::default(),
        }
    }

    /// The `POLICY_*` flags its access list implies (see [`acl_policy_flags`]).
    pub fn acl_policy_flags(&self) -> u8 {
        acl_policy_flags(&self.acl)
    }
}

/// The `POLICY_*` flags an access list implies: consulted when it has entries; with any
/// allow entry, what matches nothing is denied.
pub fn acl_policy_flags(entries: &[AclEntry]) -> u8 {
    let mut flags = 0;
    if !entries.is_empty() {
        flags |= POLICY_ACL;
    }
    if entries.iter().any(|e| e.allow) {
        flags |= POLICY_DEFAULT_DENY;
    }
    flags
}

/// The policy, access-list and VLAN maps, held apart from the responder (see
/// [`Responder::admission_writer`]).
pub struct AdmissionWriter {
    pub(crate) policy: Array<MapData, ResponderPolicy>,
    pub(crate) acl: LpmTrie<MapData, [u8; 16], u8>,
    pub(crate) vlans: HashMap<MapData, u16, u8>,
}

impl AdmissionWriter {
    /// Writes `spec`'s policy, access list and VLANs in place, while the responder serves
    /// (the table sizes are fixed at load). No source is refused or let through on the way
    /// unless the old or the new spec says so (see [`AclRewrite`]).
    pub fn apply(&mut self, spec: &AdmissionSpec) -> Result<()> {
        let AdmissionWriter { policy, acl, vlans } = self;
        write_vlans(vlans, &spec.vlans)?;
        write_access_list(acl, &spec.acl, || {
            policy
                .set(0, spec.policy, 0)
                .map_err(|e| anyhow::anyhow!("writing POLICY: {e}"))
        })
    }
}

/// An access-list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AclEntry {
    pub prefix: IpNet,
    pub allow: bool,
}

/// A key of the access-list trie: IPv6 as is, IPv4 as ::ffff:a.b.c.d/(96 + length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AclKey {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}

impl AclKey {
    /// `::/0`: matches every source, IPv4 ones included; it holds the default verdict.
    pub const DEFAULT: AclKey = AclKey {
        prefix_len: 0,
        addr: [0; 16],
    };

    pub fn of(prefix: IpNet) -> AclKey {
        match prefix.trunc() {
            IpNet::V4(n) => AclKey {
                prefix_len: 96 + n.prefix_len() as u32,
                addr: ipv4_mapped_key(n.addr().octets()),
            },
            IpNet::V6(n) => AclKey {
                prefix_len: n.prefix_len() as u32,
                addr: n.addr().octets(),
            },
        }
    }

    /// The prefix this key stands for (IPv4 for keys inside ::ffff:0:0/96).
    pub fn prefix(&self) -> IpNet {
        match key_address(&self.addr) {
            IpAddr::V4(a) if self.prefix_len >= 96 => {
                IpNet::new(IpAddr::V4(a), (self.prefix_len - 96) as u8)
            }
            _ => IpNet::new(IpAddr::V6(self.addr.into()), self.prefix_len.min(128) as u8),
        }
        .expect("prefix lengths are within the address")
    }

    pub fn lpm(self) -> LpmKey<[u8; 16]> {
        LpmKey::new(self.prefix_len, self.addr)
    }

    /// Whether `source` (a full trie address) lies in this prefix.
    pub fn contains(&self, source: &[u8; 16]) -> bool {
        let bits = self.prefix_len.min(128) as usize;
        let (whole, rest) = (bits / 8, bits % 8);
        self.addr[..whole] == source[..whole]
            && (rest == 0 || (self.addr[whole] ^ source[whole]) >> (8 - rest) == 0)
    }
}

impl std::fmt::Display for AclKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.prefix().fmt(f)
    }
}

/// The LPM key of a prefix: IPv4 as ::ffff:a.b.c.d/(96 + len).
pub fn acl_key(prefix: IpNet) -> LpmKey<[u8; 16]> {
    AclKey::of(prefix).lpm()
}

/// What the trie holds for `entries`: each entry, and `::/0` with the default verdict
/// (denied when the list allows anything, else allowed) unless the list names `::/0` itself.
/// With the default in the trie, every source has a match in every state a rewrite passes
/// through, so no state falls back on a policy flag that belongs to one list or the other.
pub fn acl_contents(entries: &[AclEntry]) -> Vec<(AclKey, u8)> {
    let mut out: Vec<(AclKey, u8)> = entries
        .iter()
        .map(|e| {
            let value = if e.allow { ACL_ALLOW } else { ACL_DENY };
            (AclKey::of(e.prefix), value)
        })
        .collect();
    if !out.iter().any(|(k, _)| *k == AclKey::DEFAULT) {
        let default_deny = acl_policy_flags(entries) & POLICY_DEFAULT_DENY != 0;
        let value = if default_deny { ACL_DENY } else { ACL_ALLOW };
        out.push((AclKey::DEFAULT, value));
    }
    out
}

/// The writes that turn the trie from what it holds into what a new list needs, in place:
/// first every entry the new list adds or changes, longest prefix first; then every stale
/// entry removed, shortest prefix first. The policy is written between the two.
///
/// Why every state on the way answers each source as the old list or as the new one (so a
/// source both deny is never let through, one both allow never refused). Let m be the
/// source's longest match in some state; there always is one, both lists holding `::/0`.
/// - While entries go in, every old entry is still there. If m holds its old value, no old
///   entry longer than m matches (it would be there and longer): m decides as in the old
///   list. If m holds its new value, it went in after every longer new entry, which are all
///   there and none matches: m decides as in the new list.
/// - While stale entries go, every new entry is there. If m is one, no longer new entry
///   matches: the new list's verdict. If m is stale, every longer old entry is there still
///   (new, or stale and removed after m): the old list's verdict.
///
/// The policy's flags follow: `POLICY_ACL` off lets everyone through, as a list that is only
/// `::/0` allowed would; `POLICY_DEFAULT_DENY` is never consulted while `::/0` is there. So a
/// reader that took either policy and then read any of these states (the kernel reads the
/// policy before the trie, the userspace path holds its own copy) decides as one of the
/// lists. Emptying the trie first, as a plain rewrite does, breaks this: in the gap every
/// source falls to the policy's default, which denies allowed guests (with DENY kiss-o'-death)
/// or lets denied ones through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRewrite {
    pub put: Vec<(AclKey, u8)>,
    pub remove: Vec<AclKey>,
}

impl AclRewrite {
    pub fn plan(current: &[(AclKey, u8)], target: &[(AclKey, u8)]) -> AclRewrite {
        let mut put: Vec<(AclKey, u8)> = target
            .iter()
            .filter(|t| !current.contains(t))
            .copied()
            .collect();
        put.sort_by_key(|(k, _)| std::cmp::Reverse(k.prefix_len));
        let mut remove: Vec<AclKey> = current
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| !target.iter().any(|(t, _)| t == k))
            .collect();
        remove.sort_by_key(|k| k.prefix_len);
        AclRewrite { put, remove }
    }

    /// Every content the trie passes through from `current`, in the writer's order, the
    /// first and the last included.
    pub fn states(&self, current: &[(AclKey, u8)]) -> Vec<Vec<(AclKey, u8)>> {
        let mut trie = current.to_vec();
        let mut out = vec![trie.clone()];
        for (key, value) in &self.put {
            trie.retain(|(k, _)| k != key);
            trie.push((*key, *value));
            out.push(trie.clone());
        }
        for key in &self.remove {
            trie.retain(|(k, _)| k != key);
            out.push(trie.clone());
        }
        out
    }
}

/// Makes the access list in `map` exactly `entries` in place ([`AclRewrite`]), running
/// `between` (the policy's write) once the new entries are in and before stale ones go.
pub(crate) fn write_access_list<T>(
    map: &mut LpmTrie<T, [u8; 16], u8>,
    entries: &[AclEntry],
    between: impl FnOnce() -> Result<()>,
) -> Result<()>
where
    T: std::borrow::BorrowMut<MapData>,
{
    let current = map
        .iter()
        .map(|r| {
            r.map(|(k, v)| {
                let key = AclKey {
                    prefix_len: k.prefix_len(),
                    addr: k.data(),
                };
                (key, v)
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .context("reading the access list")?;
    let plan = AclRewrite::plan(&current, &acl_contents(entries));
    for (key, value) in plan.put {
        map.insert(&key.lpm(), value, 0)
            .with_context(|| format!("adding {key} to the access list"))?;
    }
    between()?;
    for key in plan.remove {
        map.remove(&key.lpm())
            .with_context(|| format!("removing {key} from the access list"))?;
    }
    Ok(())
}

/// Makes the VLAN map exactly `vlans`: new ones in first, stale ones out last (each ID is a
/// key of its own, so no state refuses a VLAN both sets list).
pub(crate) fn write_vlans<T>(map: &mut HashMap<T, u16, u8>, vlans: &[u16]) -> Result<()>
where
    T: std::borrow::BorrowMut<MapData>,
{
    let current: Vec<u16> = map
        .keys()
        .collect::<Result<_, _>>()
        .context("reading the VLAN map")?;
    for id in vlans.iter().filter(|id| !current.contains(id)) {
        map.insert(id, 1, 0)
            .with_context(|| format!("adding VLAN {id}"))?;
    }
    for id in current.iter().filter(|id| !vlans.contains(id)) {
        map.remove(id)
            .with_context(|| format!("removing VLAN {id}"))?;
    }
    Ok(())
}

/// Address of a map key (IPv4-mapped or IPv6).
pub fn key_address(key: &[u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(*key);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's decision, modelled: the policy's flags, then the longest match.
    fn denied(policy_flags: u8, trie: &[(AclKey, u8)], source: &[u8; 16]) -> bool {
        if policy_flags & POLICY_ACL == 0 {
            return false;
        }
        let longest = trie
            .iter()
            .filter(|(k, _)| k.contains(source))
            .max_by_key(|(k, _)| k.prefix_len);
        match longest {
            Some((_, v)) => *v != ACL_ALLOW,
            None => policy_flags & POLICY_DEFAULT_DENY != 0,
        }
    }

    /// What a list decides for a source: its entries alone, and the policy's default.
    fn verdict(entries: &[AclEntry], source: &[u8; 16]) -> bool {
        let trie: Vec<(AclKey, u8)> = entries
            .iter()
            .map(|e| {
                (
                    AclKey::of(e.prefix),
                    if e.allow { ACL_ALLOW } else { ACL_DENY },
                )
            })
            .collect();
        denied(acl_policy_flags(entries), &trie, source)
    }

    /// Checks every state of a rewrite from `old` to `new`, as read with either list's
    /// policy: the first source decided neither as `old` nor as `new` does, if any. The last
    /// state must be `new`'s trie.
    fn first_violation(
        old: &[AclEntry],
        new: &[AclEntry],
        states: &[Vec<(AclKey, u8)>],
    ) -> Option<String> {
        let sources = sources(old, new);
        for (step, trie) in states.iter().enumerate() {
            for flags in [acl_policy_flags(old), acl_policy_flags(new)] {
                for s in &sources {
                    let got = denied(flags, trie, s);
                    if got != verdict(old, s) && got != verdict(new, s) {
                        return Some(format!(
                            "after {step} writes, {} is {} (policy flags {flags:#x})",
                            key_address(s),
                            if got { "denied" } else { "allowed" }
                        ));
                    }
                }
            }
        }
        let mut got = states.last().expect("a first state").clone();
        let mut want = acl_contents(new);
        got.sort();
        want.sort();
        assert_eq!(got, want, "the rewrite did not end at the new list");
        None
    }

    /// The states of emptying the trie, then filling it: the plain rewrite.
    fn emptied_then_filled(old: &[AclEntry], new: &[AclEntry]) -> Vec<Vec<(AclKey, u8)>> {
        let current = acl_contents(old);
        let empty = AclRewrite {
            put: Vec::new(),
            remove: current.iter().map(|(k, _)| *k).collect(),
        };
        let fill = AclRewrite {
            put: acl_contents(new),
            remove: Vec::new(),
        };
        let mut states = empty.states(&current);
        let emptied = states.pop().expect("a last state");
        states.extend(fill.states(&emptied));
        states
    }

    /// Sources that tell the lists apart: each prefix's first and last address, and their
    /// neighbours just outside.
    fn sources(old: &[AclEntry], new: &[AclEntry]) -> Vec<[u8; 16]> {
        let mut out = vec![ipv4_mapped_key([198, 51, 100, 1]), [0xfd; 16]];
        for e in old.iter().chain(new) {
            let (first, last) = (e.prefix.network(), e.prefix.broadcast());
            for a in [first, last] {
                let key = crate::responder::served_address_key(a);
                let n = u128::from_be_bytes(key);
                for x in [n.wrapping_sub(1), n, n.wrapping_add(1)] {
                    out.push(x.to_be_bytes());
                }
            }
        }
        out
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random list of nested and overlapping prefixes in a small space (169.254.0.0/22,
    /// fd00::/16 and the whole spaces), without repeats, as the config allows them.
    fn random_list(rng: &mut Rng) -> Vec<AclEntry> {
        let mut out: Vec<AclEntry> = Vec::new();
        for _ in 0..rng.below(7) {
            let prefix: IpNet = match rng.below(10) {
                0 => "0.0.0.0/0".parse().unwrap(),
                1 => "::/0".parse().unwrap(),
                2 | 3 => format!(
                    "fd00:0:{:x}::/{}",
                    rng.below(4),
                    [16, 32, 48][rng.below(3) as usize]
                )
                .parse()
                .unwrap(),
                _ => format!(
                    "169.254.{}.{}/{}",
                    rng.below(4),
                    rng.below(256),
                    [16, 22, 23, 24, 26, 30, 32][rng.below(7) as usize]
                )
                .parse()
                .unwrap(),
            };
            let prefix = prefix.trunc();
            if out.iter().all(|e| e.prefix != prefix) {
                out.push(AclEntry {
                    prefix,
                    allow: rng.below(2) == 0,
                });
            }
        }
        out
    }

    fn list(entries: &[(&str, bool)]) -> Vec<AclEntry> {
        entries
            .iter()
            .map(|(p, allow)| AclEntry {
                prefix: p.parse().unwrap(),
                allow: *allow,
            })
            .collect()
    }

    #[test]
    fn every_state_of_a_rewrite_decides_as_the_old_or_the_new_list() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut naive_broke = 0;
        let mut shortest_first_broke = 0;
        for trial in 0..1000 {
            let old = random_list(&mut rng);
            let new = random_list(&mut rng);
            let current = acl_contents(&old);
            let plan = AclRewrite::plan(&current, &acl_contents(&new));
            if let Some(v) = first_violation(&old, &new, &plan.states(&current)) {
                panic!("trial {trial}: {old:?} -> {new:?}: {v}");
            }
            // The checker bites: emptying the trie first, or putting the short prefixes in
            // first, passes through states that neither list would decide so.
            let naive = emptied_then_filled(&old, &new);
            naive_broke += first_violation(&old, &new, &naive).is_some() as u32;
            let mut reversed = plan;
            reversed.put.reverse();
            let reversed = reversed.states(&current);
            shortest_first_broke += first_violation(&old, &new, &reversed).is_some() as u32;
        }
        assert!(naive_broke > 300, "{naive_broke}");
        assert!(shortest_first_broke > 100, "{shortest_first_broke}");
    }

    #[test]
    fn an_allow_list_turned_into_a_deny_list_keeps_both_guests_right() {
        // The live test's two lists: guest .30 allowed and .33 denied by both, the default
        // flipping each time.
        let allow_list = list(&[("169.254.84.0/24", true), ("169.254.84.32/27", false)]);
        let deny_list = list(&[("169.254.84.33/32", false)]);
        for (old, new) in [(&allow_list, &deny_list), (&deny_list, &allow_list)] {
            let current = acl_contents(old);
            let plan = AclRewrite::plan(&current, &acl_contents(new));
            assert_eq!(first_violation(old, new, &plan.states(&current)), None);
            assert!(first_violation(old, new, &emptied_then_filled(old, new)).is_some());
            // Only what differs is written.
            assert!(plan.put.len() + plan.remove.len() <= 4, "{plan:?}");
        }
        let plan = AclRewrite::plan(&acl_contents(&deny_list), &acl_contents(&allow_list));
        assert_eq!(
            plan.put
                .iter()
                .map(|(k, _)| k.to_string())
                .collect::<Vec<_>>(),
            ["169.254.84.32/27", "169.254.84.0/24", "::/0"]
        );
        assert_eq!(
            plan.remove,
            [AclKey::of("169.254.84.33/32".parse().unwrap())]
        );
    }

    #[test]
    fn the_default_lives_in_the_trie() {
        let deny = list(&[("169.254.7.0/24", false)]);
        assert!(acl_contents(&deny).contains(&(AclKey::DEFAULT, ACL_ALLOW)));
        let allow = list(&[("169.254.0.0/16", true)]);
        assert!(acl_contents(&allow).contains(&(AclKey::DEFAULT, ACL_DENY)));
        assert_eq!(acl_contents(&[]), [(AclKey::DEFAULT, ACL_ALLOW)]);
        // A list that names ::/0 sets the default itself.
        let own = list(&[("169.254.0.0/16", true), ("::/0", true)]);
        assert_eq!(acl_contents(&own).len(), 2);
        assert!(acl_contents(&own).contains(&(AclKey::DEFAULT, ACL_ALLOW)));
        // ::/0 covers IPv4 sources as the trie keys them.
        assert!(AclKey::DEFAULT.contains(&ipv4_mapped_key([169, 254, 1, 2])));
        let key = AclKey::of("169.254.84.32/27".parse().unwrap());
        assert!(key.contains(&ipv4_mapped_key([169, 254, 84, 63])));
        assert!(!key.contains(&ipv4_mapped_key([169, 254, 84, 64])));
        assert_eq!(key.to_string(), "169.254.84.32/27");
    }
}
