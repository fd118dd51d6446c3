//! Who the responder answers: the policy (rate limit, kiss-o'-death, guest clock records),
//! the access list and the table sizes, as one value that config and CLI build.

use anyhow::Result;
use ntp_common::policy::ResponderPolicy;

use crate::responder::{AclEntry, Responder, TableSizes};

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
