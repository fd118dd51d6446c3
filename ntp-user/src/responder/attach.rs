//! How the responder goes onto a link: one plan from the requested mode and what the link is,
//! one executor, one outcome, for `serve`, the managed daemon and its repairs alike.
//!
//! Native XDP_TX on a veth delivers only when the far end runs an XDP program, so a native
//! attempt on a veth first gives its peer the pass program, unless the peer runs a program
//! already or is not ours to touch; generic mode works on every device.

use std::fmt;

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use tracing::warn;

use super::pins::Attached;
use super::XdpModePref;

/// What the link is, as far as native XDP_TX cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// A veth whose far end may get the pass program.
    VethPeerOurs,
    /// A veth whose far end runs an XDP program already (a guest's own, a benchmark's
    /// counter): XDP_TX delivers through it.
    VethPeerProgrammed,
    /// A veth whose far end is not ours (not found, or someone else's interface).
    VethPeerForeign,
    /// Anything else: native where the driver has it.
    Device,
}

/// One way of attaching, tried as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub mode: XdpMode,
    /// The pass program goes on the veth peer first, so no XDP_TX reply meets a peer
    /// without one.
    pub pass_on_peer: bool,
}

/// Native mode was asked for on a veth whose peer cannot get the pass program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeNeedsPeer;

impl fmt::Display for NativeNeedsPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("native mode on a veth needs its peer to carry an XDP program, and the peer is not ours")
    }
}

impl std::error::Error for NativeNeedsPeer {}

/// The attempts for `pref` on `link`, in order: each after the one before failed.
pub fn plan(pref: XdpModePref, link: LinkKind) -> Result<Vec<Attempt>, NativeNeedsPeer> {
    let generic = Attempt {
        mode: XdpMode::Skb,
        pass_on_peer: false,
    };
    let native = match link {
        LinkKind::VethPeerOurs => Some(Attempt {
            mode: XdpMode::Driver,
            pass_on_peer: true,
        }),
        LinkKind::VethPeerProgrammed | LinkKind::Device => Some(Attempt {
            mode: XdpMode::Driver,
            pass_on_peer: false,
        }),
        LinkKind::VethPeerForeign => None,
    };
    Ok(match (pref, native) {
        (XdpModePref::Off, _) => Vec::new(),
        (XdpModePref::Generic, _) => vec![generic],
        (XdpModePref::Native, Some(n)) => vec![n],
        (XdpModePref::Native, None) => return Err(NativeNeedsPeer),
        (XdpModePref::Auto, Some(n)) => vec![n, generic],
        (XdpModePref::Auto, None) => vec![generic],
    })
}

/// One thing the executor asks its caller to attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    PassOnPeer,
    Responder(XdpMode),
}

/// Where the responder ended up on one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub mode: XdpMode,
    pub how: Attached,
    /// The pass program on the veth peer, when this attachment (or a native attempt before
    /// it) put it there.
    pub peer_pass: Option<Attached>,
}

impl Attachment {
    pub fn mode_name(&self) -> &'static str {
        mode_name(self.mode)
    }
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({:?}", self.interface, self.mode_name(), self.how)?;
        if let Some(how) = self.peer_pass {
            write!(f, ", pass program on the peer {how:?}")?;
        }
        f.write_str(")")
    }
}

pub fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "the kernel's choice",
    }
}

/// Runs `attempts` on `interface` through `run`, which performs one step; a failed attempt
/// is logged and the next one tried, the last one's failure is the error.
pub fn execute(
    interface: &str,
    attempts: &[Attempt],
    mut run: impl FnMut(Step) -> Result<Attached>,
) -> Result<Attachment> {
    // A pass program an attempt put on the peer stays there when a later attempt is the one
    // that works: the outcome says so, and the repair pass keeps it.
    let mut peer_pass = None;
    for (i, attempt) in attempts.iter().enumerate() {
        let mut one = || -> Result<Attachment> {
            if attempt.pass_on_peer {
                peer_pass = Some(
                    run(Step::PassOnPeer).context("attaching the pass program to the veth peer")?,
                );
            }
            let how = run(Step::Responder(attempt.mode)).with_context(|| {
                format!(
                    "attaching the responder to {interface} in {} mode",
                    mode_name(attempt.mode)
                )
            })?;
            Ok(Attachment {
                interface: interface.to_string(),
                mode: attempt.mode,
                how,
                peer_pass,
            })
        };
        match one() {
            Ok(done) => return Ok(done),
            Err(e) if i + 1 == attempts.len() => return Err(e),
            Err(e) => {
                warn!(interface, error = %format!("{e:#}"), "attachment failed; trying the next mode")
            }
        }
    }
    Err(anyhow::anyhow!("no attachment planned for {interface}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATIVE_WITH_PASS: Attempt = Attempt {
        mode: XdpMode::Driver,
        pass_on_peer: true,
    };
    const NATIVE: Attempt = Attempt {
        mode: XdpMode::Driver,
        pass_on_peer: false,
    };
    const GENERIC: Attempt = Attempt {
        mode: XdpMode::Skb,
        pass_on_peer: false,
    };

    #[test]
    fn plans_per_mode_and_link() {
        use LinkKind::*;
        use XdpModePref::*;
        let table: &[(XdpModePref, LinkKind, Result<Vec<Attempt>, NativeNeedsPeer>)] = &[
            (Auto, VethPeerOurs, Ok(vec![NATIVE_WITH_PASS, GENERIC])),
            (Auto, VethPeerProgrammed, Ok(vec![NATIVE, GENERIC])),
            (Auto, VethPeerForeign, Ok(vec![GENERIC])),
            (Auto, Device, Ok(vec![NATIVE, GENERIC])),
            (Native, VethPeerOurs, Ok(vec![NATIVE_WITH_PASS])),
            (Native, VethPeerProgrammed, Ok(vec![NATIVE])),
            (Native, VethPeerForeign, Err(NativeNeedsPeer)),
            (Native, Device, Ok(vec![NATIVE])),
            (Generic, VethPeerOurs, Ok(vec![GENERIC])),
            (Generic, Device, Ok(vec![GENERIC])),
            (Off, VethPeerOurs, Ok(vec![])),
            (Off, Device, Ok(vec![])),
        ];
        for (pref, link, want) in table {
            assert_eq!(&plan(*pref, *link), want, "{pref:?} on {link:?}");
        }
    }

    #[test]
    fn a_failed_attempt_falls_back_and_the_last_failure_is_the_error() {
        let attempts = plan(XdpModePref::Auto, LinkKind::VethPeerOurs).unwrap();
        let mut steps = Vec::new();
        let done = execute("veth0", &attempts, |step| {
            steps.push(step);
            match step {
                Step::Responder(XdpMode::Driver) => Err(anyhow::anyhow!("no native")),
                _ => Ok(Attached::New),
            }
        })
        .unwrap();
        assert_eq!(
            steps,
            [
                Step::PassOnPeer,
                Step::Responder(XdpMode::Driver),
                Step::Responder(XdpMode::Skb)
            ]
        );
        assert_eq!(done.mode, XdpMode::Skb);
        assert_eq!(
            done.peer_pass,
            Some(Attached::New),
            "the pass program stays on the peer"
        );

        let err = execute("veth0", &[NATIVE_WITH_PASS], |step| match step {
            Step::PassOnPeer => Err(anyhow::anyhow!("peer gone")),
            _ => Ok(Attached::New),
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("pass program"), "{err:#}");
        assert!(execute("veth0", &[], |_| Ok(Attached::New)).is_err());
    }
}
