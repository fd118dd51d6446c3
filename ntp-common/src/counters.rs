//! The responder's outcome counters: every packet the program sees increments exactly one.

macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, )*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $( $(#[$doc])* $variant, )*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)*];

            /// Stable snake_case name for stats output and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)* }
            }
        }
    };
}

counters! {
    /// Answered an IPv4 request (any leap indicator).
    AnsweredV4 = "answered_ipv4",
    /// Answered an IPv6 request.
    AnsweredV6 = "answered_ipv6",
    /// Frames that are not IPv4/IPv6 (after at most one VLAN tag).
    PassedNotIp = "passed_not_ip",
    /// IP packets to an address the responder does not serve.
    PassedNotServed = "passed_not_served",
    /// Served address, but not UDP to port 123.
    PassedNotNtp = "passed_not_ntp",
    /// IPv4 fragments: left to the kernel's reassembly.
    PassedFragment = "passed_fragment",
    /// IPv6 with extension headers.
    PassedIpv6ExtHeader = "passed_ipv6_ext_header",
    /// NTP requests with extension fields or a MAC (NTS, symmetric keys), admitted by the
    /// access list and not over their source's rate: for the userspace path.
    PassedExtension = "passed_extension",
    /// NTP packets that are not client requests (replies to the host's own client, symmetric
    /// peers, control queries): the host's business, not the responder's.
    PassedNotClient = "passed_not_client",
    /// Frames addressed to another MAC than the interface's (flooded unknown unicast):
    /// answering would teach the bridge a false location of that MAC.
    PassedOtherHost = "passed_other_host",
    /// Frame shorter than its headers or the lengths they announce.
    DroppedShort = "dropped_short",
    /// Header lengths that contradict each other.
    DroppedBadLength = "dropped_bad_length",
    DroppedBadIpChecksum = "dropped_bad_ip_checksum",
    DroppedBadUdpChecksum = "dropped_bad_udp_checksum",
    /// NTP version 0 or 5-7.
    DroppedVersion = "dropped_version",
    /// UDP source port 0: nothing to reply to.
    DroppedSourcePort = "dropped_source_port",
    /// Multicast, broadcast or unspecified source address or MAC: never reflect to those.
    DroppedBadAddress = "dropped_bad_address",
    /// No anchor was ever published: there is no time to give.
    DroppedNoAnchor = "dropped_no_anchor",
    /// Over its source's rate: dropped silently (a KoD went recently).
    DroppedRateLimited = "dropped_rate_limited",
    /// Over its source's rate: answered with a RATE kiss-o'-death instead.
    KodRate = "kod_rate",
    /// Source denied by the access list: dropped silently.
    DroppedDenied = "dropped_denied",
    /// Source denied by the access list: answered with a DENY kiss-o'-death.
    KodDeny = "kod_deny",
    /// Subset of the answered ones: replies that said LI=3 (unsynchronized or stale anchor).
    AnsweredUnsynchronized = "answered_unsynchronized",
    /// VRRP (IP protocol 112) from a configured peer on a shared network: keepalived's.
    PassedVrrpPeer = "passed_vrrp_peer",
    /// VRRP from anyone else on the guests' side: a guest must never move the addresses.
    DroppedVrrp = "dropped_vrrp",
    /// An NTP request tagged with a VLAN that `access.vlans` does not list: dropped, never
    /// passed up (the VLAN is part of a source's rate key, so each unlisted tag would give a
    /// guest a bucket of its own).
    DroppedVlan = "dropped_vlan",
}

pub const COUNTER_COUNT: u32 = Counter::ALL.len() as u32;

/// What a counter counts: the family it belongs to in metrics and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// Requests answered with time.
    Answered,
    /// A subset of the answered ones (counted twice on purpose).
    AnsweredSubset,
    /// Left to the kernel.
    Passed,
    /// Dropped without an answer.
    Dropped,
    /// Answered with a kiss-o'-death instead of time.
    Kod,
}

impl CounterKind {
    /// The prefix every counter name of this kind starts with.
    pub const fn prefix(self) -> &'static str {
        match self {
            CounterKind::Answered | CounterKind::AnsweredSubset => "answered_",
            CounterKind::Passed => "passed_",
            CounterKind::Dropped => "dropped_",
            CounterKind::Kod => "kod_",
        }
    }
}

impl Counter {
    pub const fn kind(self) -> CounterKind {
        use Counter::*;
        match self {
            AnsweredV4 | AnsweredV6 => CounterKind::Answered,
            AnsweredUnsynchronized => CounterKind::AnsweredSubset,
            PassedNotIp | PassedNotServed | PassedNotNtp | PassedFragment | PassedIpv6ExtHeader
            | PassedExtension | PassedNotClient | PassedOtherHost | PassedVrrpPeer => {
                CounterKind::Passed
            }
            DroppedShort
            | DroppedBadLength
            | DroppedBadIpChecksum
            | DroppedBadUdpChecksum
            | DroppedVersion
            | DroppedSourcePort
            | DroppedBadAddress
            | DroppedNoAnchor
            | DroppedRateLimited
            | DroppedDenied
            | DroppedVrrp
            | DroppedVlan => CounterKind::Dropped,
            KodRate | KodDeny => CounterKind::Kod,
        }
    }

    /// The name without its kind's prefix: the reason (or code) label in metrics.
    pub fn reason(self) -> &'static str {
        let name = self.name();
        name.strip_prefix(self.kind().prefix()).unwrap_or(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_indices_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
            for d in &Counter::ALL[i + 1..] {
                assert_ne!(c.name(), d.name());
            }
        }
    }

    #[test]
    fn every_name_starts_with_its_kinds_prefix() {
        for c in Counter::ALL {
            assert!(c.name().starts_with(c.kind().prefix()), "{c:?}");
            assert!(!c.reason().is_empty() && c.reason() != c.name(), "{c:?}");
        }
    }
}
