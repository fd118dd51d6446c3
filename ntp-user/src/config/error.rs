//! The one error a configuration gets: which file, which field, and why.

use std::path::{Path, PathBuf};

/// A configuration error: the file (or "(command line)"), the field if one is to blame, and
/// why. Callers that report errors elsewhere (a fleet's config state) downcast to it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {}: {}{reason}", file.display(), field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub field: Option<String>,
    pub reason: String,
}

impl ConfigError {
    pub fn field(file: &Path, field: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            field: Some(field.to_string()),
            reason: reason.into(),
        }
    }

    pub fn file(file: &Path, reason: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.to_path_buf(),
            field: None,
            reason: reason.into(),
        }
    }
}
