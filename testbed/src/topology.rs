//! A guest namespace and a VIP namespace joined by a veth, as on a VIP host: the VIP side holds
//! a service address and the clock aliases; the guest routes the clock addresses via the
//! service address.

use anyhow::Result;

use crate::netns::Netns;
use crate::{ip, unique_name, CLOCK_V4, CLOCK_V6};

/// Guest ↔ VIP over one veth.
pub struct Topology {
    pub guest: Netns,
    pub vip: Netns,
    pub vip_if: String,
    pub guest_if: String,
    pub service_v4: String,
    pub guest_v4: String,
    pub service_v6: String,
    pub guest_v6: String,
}

impl Topology {
    /// `subnet` picks 169.254.<subnet>.0/24 and fd00:ec2:<subnet>::/64 for the link.
    pub fn new(subnet: u8) -> Result<Topology> {
        Self::with_queues(subnet, None)
    }

    /// The same with `queues` rx/tx queue pairs on each veth end (the kernel's default, one,
    /// when `None`): a load spread over every core needs one pair per core.
    pub fn with_queues(subnet: u8, queues: Option<usize>) -> Result<Topology> {
        let guest = Netns::new("ntg")?;
        let vip = Netns::new("ntv")?;
        let vip_if = unique_name("nv");
        let guest_if = unique_name("ng");
        let queues = queues.map(|q| q.to_string());
        let queue_args: Vec<&str> = match &queues {
            Some(q) => vec!["numtxqueues", q, "numrxqueues", q],
            None => vec![],
        };
        let mut add = vec!["link", "add", &vip_if, "netns", &vip.name];
        add.extend(&queue_args);
        add.extend([
            "type",
            "veth",
            "peer",
            "name",
            &guest_if,
            "netns",
            &guest.name,
        ]);
        add.extend(&queue_args);
        ip(&add)?;
        let t = Topology {
            service_v4: format!("169.254.{subnet}.1"),
            guest_v4: format!("169.254.{subnet}.2"),
            service_v6: format!("fd00:ec2:{subnet}::1"),
            guest_v6: format!("fd00:ec2:{subnet}::2"),
            guest,
            vip,
            vip_if,
            guest_if,
        };
        let v = &t.vip;
        v.ip(&[
            "addr",
            "add",
            &format!("{}/24", t.service_v4),
            "dev",
            &t.vip_if,
        ])?;
        v.ip(&["addr", "add", &format!("{CLOCK_V4}/32"), "dev", &t.vip_if])?;
        v.ip(&[
            "addr",
            "add",
            &format!("{}/64", t.service_v6),
            "dev",
            &t.vip_if,
            "nodad",
        ])?;
        v.ip(&[
            "addr",
            "add",
            &format!("{CLOCK_V6}/128"),
            "dev",
            &t.vip_if,
            "nodad",
        ])?;
        v.ip(&["link", "set", &t.vip_if, "up"])?;
        let g = &t.guest;
        g.ip(&[
            "addr",
            "add",
            &format!("{}/24", t.guest_v4),
            "dev",
            &t.guest_if,
        ])?;
        g.ip(&[
            "addr",
            "add",
            &format!("{}/64", t.guest_v6),
            "dev",
            &t.guest_if,
            "nodad",
        ])?;
        g.ip(&["link", "set", &t.guest_if, "up"])?;
        // What DHCP option 121 gives a guest: the clock address via the service address.
        g.ip(&[
            "route",
            "add",
            &format!("{CLOCK_V4}/32"),
            "via",
            &t.service_v4,
        ])?;
        g.ip(&[
            "-6",
            "route",
            "add",
            &format!("{CLOCK_V6}/128"),
            "via",
            &t.service_v6,
        ])?;
        Ok(t)
    }

    /// Whether any XDP program is attached to the VIP end or the guest end.
    pub fn xdp_attached(&self) -> Result<(bool, bool)> {
        let v = self.vip.ip(&["link", "show", &self.vip_if])?;
        let g = self.guest.ip(&["link", "show", &self.guest_if])?;
        Ok((v.contains("prog/xdp"), g.contains("prog/xdp")))
    }
}
