//! The host's own fleet files, in `[fleet] state_dir`: the configuration it runs
//! (`applied.toml`), the one before it (`previous.toml`, to fall back to), and what the agent
//! was doing (`state.json`) — so that a restart into a new configuration, and a start that
//! fails with it, both know where they stand without the store.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::host::files::write_atomic;
use serde::{Deserialize, Serialize};

/// A configuration version: the cluster config's revision and the host override's (0: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub revision: i64,
    pub override_revision: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalState {
    /// What `applied.toml` is (None: the host runs its local file).
    pub applied: Option<Version>,
    /// Staged and being started: the restart into it has not finished yet.
    pub applying: Option<Version>,
    /// The last version that failed here, and why (never tried again).
    pub failed: Option<(Version, String)>,
    /// A restart command being carried out (its id), reported done after the restart.
    pub restarting_for: Option<String>,
}

pub struct LocalFiles {
    dir: PathBuf,
}

impl LocalFiles {
    pub fn new(dir: &Path) -> LocalFiles {
        LocalFiles {
            dir: dir.to_path_buf(),
        }
    }

    pub fn applied_config(&self) -> PathBuf {
        self.dir.join("applied.toml")
    }

    fn previous_config(&self) -> PathBuf {
        self.dir.join("previous.toml")
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn state(&self) -> Result<LocalState> {
        match std::fs::read_to_string(self.state_file()) {
            Ok(t) => serde_json::from_str(&t)
                .with_context(|| format!("{}: not the agent's state", self.state_file().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LocalState::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.state_file().display())),
        }
    }

    pub fn save(&self, s: &LocalState) -> Result<()> {
        write_atomic(
            &self.state_file(),
            serde_json::to_string_pretty(s)?.as_bytes(),
        )
    }

    /// Makes `text` the configuration to start with next, keeping the current one to fall
    /// back to.
    pub fn stage(&self, text: &str, version: Version) -> Result<()> {
        let applied = self.applied_config();
        if applied.exists() {
            std::fs::copy(&applied, self.previous_config())
                .with_context(|| format!("keeping {}", applied.display()))?;
        } else {
            let _ = std::fs::remove_file(self.previous_config());
        }
        write_atomic(&applied, text.as_bytes())?;
        let mut s = self.state()?;
        s.applying = Some(version);
        self.save(&s)
    }

    /// `text` was applied in place (no restart): it is the applied one now.
    pub fn record_applied(&self, text: &str, version: Version) -> Result<()> {
        let applied = self.applied_config();
        if applied.exists() {
            std::fs::copy(&applied, self.previous_config())
                .with_context(|| format!("keeping {}", applied.display()))?;
        }
        write_atomic(&applied, text.as_bytes())?;
        let mut s = self.state()?;
        s.applied = Some(version);
        s.applying = None;
        self.save(&s)
    }

    /// The staged configuration started: it is the applied one now.
    pub fn mark_applied(&self) -> Result<Option<Version>> {
        let mut s = self.state()?;
        let Some(v) = s.applying.take() else {
            return Ok(None);
        };
        s.applied = Some(v);
        self.save(&s)?;
        Ok(Some(v))
    }

    /// The staged configuration failed to start: back to the one before it (or to the local
    /// file when there was none), the failure remembered. False when nothing was staged.
    pub fn roll_back(&self, why: &str) -> Result<bool> {
        let mut s = self.state()?;
        let Some(v) = s.applying.take() else {
            return Ok(false);
        };
        if self.previous_config().exists() {
            std::fs::rename(self.previous_config(), self.applied_config())?;
        } else {
            let _ = std::fs::remove_file(self.applied_config());
            s.applied = None;
        }
        s.failed = Some((v, why.to_string()));
        self.save(&s)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_config_is_applied_or_rolled_back() {
        let dir = std::env::temp_dir().join(format!("fleet-local-{}", rand::random::<u64>()));
        let f = LocalFiles::new(&dir);
        let v1 = Version {
            revision: 5,
            override_revision: 2,
        };
        f.stage("a = 1\n", v1).unwrap();
        assert_eq!(f.mark_applied().unwrap(), Some(v1));
        assert_eq!(f.state().unwrap().applied, Some(v1));
        let v2 = Version {
            revision: 7,
            override_revision: 2,
        };
        f.stage("a = 2\n", v2).unwrap();
        assert_eq!(
            std::fs::read_to_string(f.applied_config()).unwrap(),
            "a = 2\n"
        );
        assert!(f.roll_back("no such interface").unwrap());
        assert_eq!(
            std::fs::read_to_string(f.applied_config()).unwrap(),
            "a = 1\n"
        );
        let s = f.state().unwrap();
        assert_eq!(s.applied, Some(v1));
        assert_eq!(s.failed, Some((v2, "no such interface".into())));
        assert!(!f.roll_back("again").unwrap(), "nothing staged");
        // The first pushed config failing: back to the local file.
        let g = LocalFiles::new(&dir.join("g"));
        g.stage("a = 3\n", v2).unwrap();
        assert!(g.roll_back("x").unwrap());
        assert!(!g.applied_config().exists());
        assert_eq!(g.state().unwrap().applied, None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
