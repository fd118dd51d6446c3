//! Upstream names and the upstreams they became, sans IO: the IO resolves what
//! [`UpstreamNames::due`] lists and reports each answer with [`UpstreamNames::resolved`].

use std::net::SocketAddr;

use crate::clock::system::System;

/// The configured upstream names and the upstreams they became (sans IO): a name that never
/// resolved is tried again, and so is one whose upstream was lost (eight polls unanswered),
/// since the name may point elsewhere now. Literal addresses are never re-resolved.
#[derive(Debug, Default)]
pub struct UpstreamNames {
    entries: Vec<(String, Option<usize>)>,
}

impl UpstreamNames {
    pub fn new(names: &[String]) -> UpstreamNames {
        UpstreamNames {
            entries: names.iter().map(|n| (n.clone(), None)).collect(),
        }
    }

    fn is_literal(name: &str) -> bool {
        literal_address(name).is_some()
    }

    /// The upstream `name` first resolved to is the system's upstream `id`.
    pub fn bind(&mut self, name: &str, id: usize) {
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|(n, bound)| n == name && bound.is_none())
        {
            e.1 = Some(id);
        }
    }

    /// Names to resolve now.
    pub fn due(&self, system: &System) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(name, id)| match id {
                None => true,
                Some(i) => !Self::is_literal(name) && system.upstream_is_lost(*i),
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `name` resolved to `addr`: a new upstream, a moved one, or nothing new. Returns what
    /// changed, for the log.
    pub fn resolved(
        &mut self,
        name: &str,
        addr: SocketAddr,
        system: &mut System,
        now_ns: u64,
    ) -> Option<String> {
        let entry = self.entries.iter_mut().find(|(n, _)| n == name)?;
        match entry.1 {
            None => {
                system.add_upstream(addr, now_ns);
                entry.1 = Some(system.upstream_count() - 1);
                Some(format!("{name} resolved to {addr}"))
            }
            Some(i) if system.upstream_addr(i) != Some(addr) => {
                let old = system.upstreams[i].addr;
                system.replace_upstream(i, addr, now_ns);
                Some(format!("{name} moved from {old} to {addr}"))
            }
            Some(_) => None,
        }
    }
}

/// An upstream given as an address, not a name: `a.b.c.d`, `a.b.c.d:port`, a bare IPv6
/// address or `[v6]:port` (port 123 unless given). Never needs DNS.
pub fn literal_address(name: &str) -> Option<SocketAddr> {
    if let Ok(a) = name.parse::<SocketAddr>() {
        return Some(a);
    }
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, 123));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::discipline::ClockModel;
    use crate::clock::system::SystemConfig;

    #[test]
    fn names_are_resolved_again_when_their_upstream_is_lost() {
        let a: SocketAddr = "169.254.1.1:123".parse().unwrap();
        let b: SocketAddr = "169.254.1.2:123".parse().unwrap();
        let initial = ClockModel::new(0, 3_900_000_000 * 1_000_000_000);
        let mut system = System::new(SystemConfig::default(), &[a], initial, 0);
        let names_list = vec!["ntp.example".to_string(), "169.254.1.9".to_string()];
        let mut names = UpstreamNames::new(&names_list);
        names.bind("ntp.example", 0);
        // The literal never resolved (say the first attempt failed): due; the name is not.
        assert_eq!(names.due(&system), ["169.254.1.9"]);
        assert!(names
            .resolved("169.254.1.9", b, &mut system, 0)
            .is_some_and(|c| c.contains("resolved")));
        assert_eq!(system.upstreams.len(), 2);
        assert!(names.due(&system).is_empty());
        // Eight polls, no answer: the name is resolved again (not the literal).
        for i in 0..8u64 {
            for u in &mut system.upstreams {
                u.poll(i * 16_000_000_000, i);
            }
        }
        assert_eq!(names.due(&system), ["ntp.example"]);
        // Same address: nothing changes. Another: the upstream is replaced, fresh.
        assert_eq!(names.resolved("ntp.example", a, &mut system, 1), None);
        let moved: SocketAddr = "169.254.1.3:123".parse().unwrap();
        let change = names
            .resolved("ntp.example", moved, &mut system, 2)
            .unwrap();
        assert!(
            change.contains("169.254.1.1:123") && change.contains("169.254.1.3:123"),
            "{change}"
        );
        assert_eq!(system.upstreams[0].addr, moved);
        assert_eq!(system.upstreams[0].polls, 0);
        assert!(names.due(&system).is_empty());
    }

    #[test]
    fn literal_addresses_need_no_dns() {
        let v4: SocketAddr = "169.254.1.1:123".parse().unwrap();
        assert_eq!(literal_address("169.254.1.1"), Some(v4));
        assert_eq!(literal_address("169.254.1.1:123"), Some(v4));
        assert_eq!(
            literal_address("fd00::1"),
            Some("[fd00::1]:123".parse().unwrap())
        );
        assert_eq!(
            literal_address("[fd00::1]:1123"),
            Some("[fd00::1]:1123".parse().unwrap())
        );
        assert_eq!(literal_address("ntp.example"), None);
        assert_eq!(literal_address("ntp.example:123"), None);
    }
}
