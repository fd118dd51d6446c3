//! Key exchanges in progress, counted per source so that no guest can hold them all. An
//! exchange holds a descriptor and a TLS session until it ends; a guest that opens
//! connections and sends nothing would otherwise keep every other guest waiting. Sans IO.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// How many exchanges may run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotLimits {
    /// From one address.
    pub per_address: usize,
    /// From one IPv6 /64.
    pub per_v6_prefix: usize,
    /// In all.
    pub total: usize,
}

impl SlotLimits {
    /// A client needs one exchange at a time; four cover a few clients behind one address
    /// or a client retrying. A guest can use any address of its /64, so the /64 has its own
    /// cap; a /64 may also be a subnet several guests share, so that cap is larger. The
    /// total bounds descriptors and TLS state well under the common 1024-descriptor limit.
    pub const DEFAULT: SlotLimits = SlotLimits {
        per_address: 4,
        per_v6_prefix: 16,
        total: 256,
    };
}

/// Why an exchange may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its address has `per_address` exchanges running.
    Address,
    /// Its IPv6 /64 has `per_v6_prefix` running.
    V6Prefix,
    /// The server has `total` running.
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceKey {
    Address(IpAddr),
    V6Prefix([u8; 8]),
}

/// The keys a source counts under: its address (IPv4-mapped ones as IPv4), and its /64.
fn keys_of(source: IpAddr) -> [Option<SourceKey>; 2] {
    match source.to_canonical() {
        IpAddr::V4(a) => [Some(SourceKey::Address(IpAddr::V4(a))), None],
        IpAddr::V6(a) => {
            let prefix: [u8; 8] = a.octets()[..8].try_into().expect("8 of 16 bytes");
            [
                Some(SourceKey::Address(IpAddr::V6(a))),
                Some(SourceKey::V6Prefix(prefix)),
            ]
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_source: HashMap<SourceKey, usize>,
}

/// The exchanges running now, by source.
#[derive(Debug)]
pub struct ExchangeSlots {
    limits: SlotLimits,
    counts: Mutex<Counts>,
}

/// One running exchange's place; freed when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ExchangeSlots>,
    keys: [Option<SourceKey>; 2],
}

impl ExchangeSlots {
    pub fn new(limits: SlotLimits) -> Arc<ExchangeSlots> {
        Arc::new(ExchangeSlots {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    /// A place for an exchange from `source`, if its address, its /64 and the server have
    /// room (checked in that order: a source at its own cap is told so first).
    pub fn try_take(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refused> {
        let keys = keys_of(source);
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys.iter().flatten() {
            let (cap, refused) = match key {
                SourceKey::Address(_) => (self.limits.per_address, Refused::Address),
                SourceKey::V6Prefix(_) => (self.limits.per_v6_prefix, Refused::V6Prefix),
            };
            if c.by_source.get(key).copied().unwrap_or(0) >= cap {
                return Err(refused);
            }
        }
        if c.total >= self.limits.total {
            return Err(Refused::Busy);
        }
        c.total += 1;
        for key in keys.iter().flatten() {
            *c.by_source.entry(*key).or_insert(0) += 1;
        }
        Ok(Slot {
            slots: self.clone(),
            keys,
        })
    }

    /// Exchanges running now.
    #[cfg(test)]
    fn running(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Sources with exchanges running (addresses and /64s): the table never outgrows them.
    #[cfg(test)]
    fn sources_tracked(&self) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_source
            .len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        for key in self.keys.iter().flatten() {
            if let Some(n) = c.by_source.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    c.by_source.remove(key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: SlotLimits = SlotLimits {
        per_address: 2,
        per_v6_prefix: 3,
        total: 5,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_gets_its_cap_and_no_more_until_one_ends() {
        let slots = ExchangeSlots::new(SMALL);
        let a = slots.try_take(ip("169.254.1.10")).unwrap();
        let _b = slots.try_take(ip("169.254.1.10")).unwrap();
        assert_eq!(
            slots.try_take(ip("169.254.1.10")).unwrap_err(),
            Refused::Address
        );
        // Another address is not affected.
        let _c = slots.try_take(ip("169.254.1.11")).unwrap();
        drop(a);
        let _d = slots.try_take(ip("169.254.1.10")).unwrap();
        assert_eq!(slots.running(), 3);
    }

    #[test]
    fn an_ipv4_mapped_address_counts_as_the_ipv4_one() {
        let slots = ExchangeSlots::new(SMALL);
        let _a = slots.try_take(ip("169.254.1.10")).unwrap();
        let _b = slots.try_take(ip("::ffff:169.254.1.10")).unwrap();
        assert_eq!(
            slots.try_take(ip("169.254.1.10")).unwrap_err(),
            Refused::Address
        );
        assert_eq!(
            slots.try_take(ip("::ffff:169.254.1.10")).unwrap_err(),
            Refused::Address
        );
    }

    #[test]
    fn the_addresses_of_one_v6_prefix_share_its_cap() {
        let slots = ExchangeSlots::new(SMALL);
        let _a = slots.try_take(ip("fd00:1:2:3::1")).unwrap();
        let _b = slots.try_take(ip("fd00:1:2:3::2")).unwrap();
        let c = slots.try_take(ip("fd00:1:2:3:ffff::9")).unwrap();
        // A fourth address of the same /64: its own count is 0, the /64's is full.
        assert_eq!(
            slots.try_take(ip("fd00:1:2:3::4")).unwrap_err(),
            Refused::V6Prefix
        );
        // The next /64 is another source.
        let _d = slots.try_take(ip("fd00:1:2:4::1")).unwrap();
        drop(c);
        let _e = slots.try_take(ip("fd00:1:2:3::4")).unwrap();
        // The per-address cap still holds inside a /64 with room.
        let slots = ExchangeSlots::new(SMALL);
        let _f = slots.try_take(ip("fd00::1")).unwrap();
        let _g = slots.try_take(ip("fd00::1")).unwrap();
        assert_eq!(slots.try_take(ip("fd00::1")).unwrap_err(), Refused::Address);
    }

    #[test]
    fn the_total_caps_many_sources_and_is_freed_again() {
        let slots = ExchangeSlots::new(SMALL);
        let held: Vec<Slot> = (1..=5)
            .map(|i| slots.try_take(ip(&format!("169.254.1.{i}"))).unwrap())
            .collect();
        assert_eq!(
            slots.try_take(ip("169.254.1.99")).unwrap_err(),
            Refused::Busy
        );
        // A source at its own cap hears that first.
        let slots2 = ExchangeSlots::new(SlotLimits { total: 2, ..SMALL });
        let _x = slots2.try_take(ip("169.254.1.1")).unwrap();
        let _y = slots2.try_take(ip("169.254.1.1")).unwrap();
        assert_eq!(
            slots2.try_take(ip("169.254.1.1")).unwrap_err(),
            Refused::Address
        );
        drop(held);
        assert_eq!(slots.running(), 0);
        assert_eq!(slots.sources_tracked(), 0, "entries of ended exchanges go");
        let _z = slots.try_take(ip("169.254.1.99")).unwrap();
    }

    #[test]
    fn counts_stay_exact_under_any_order_of_takes_and_drops() {
        use proptest::prelude::*;
        let sources = [
            "169.254.1.1",
            "169.254.1.2",
            "fd00::1",
            "fd00::2",
            "fd00::3",
            "fd00:0:0:1::1",
        ];
        proptest!(|(ops in proptest::collection::vec((0usize..6, any::<bool>()), 0..200))| {
            let slots = ExchangeSlots::new(SMALL);
            let mut held: Vec<(usize, Slot)> = Vec::new();
            for (s, take) in ops {
                if take {
                    let count = |f: &dyn Fn(usize) -> bool| held.iter().filter(|(i, _)| f(*i)).count();
                    let src = ip(sources[s]);
                    let same_addr = count(&|i| i == s);
                    let prefix = |i: usize| match ip(sources[i]) {
                        IpAddr::V6(a) => Some(a.octets()[..8].to_vec()),
                        IpAddr::V4(_) => None,
                    };
                    let same_prefix = prefix(s).map(|p| count(&|i| prefix(i).as_ref() == Some(&p)));
                    let want = if same_addr >= SMALL.per_address {
                        Err(Refused::Address)
                    } else if same_prefix.is_some_and(|n| n >= SMALL.per_v6_prefix) {
                        Err(Refused::V6Prefix)
                    } else if held.len() >= SMALL.total {
                        Err(Refused::Busy)
                    } else {
                        Ok(())
                    };
                    match slots.try_take(src) {
                        Ok(slot) => {
                            prop_assert_eq!(want, Ok(()));
                            held.push((s, slot));
                        }
                        Err(e) => prop_assert_eq!(want, Err(e)),
                    }
                } else if !held.is_empty() {
                    held.remove(s % held.len());
                }
                prop_assert_eq!(slots.running(), held.len());
            }
            drop(held);
            prop_assert_eq!(slots.sources_tracked(), 0);
        });
    }
}
