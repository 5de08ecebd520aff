//! The file-operation error shared by set-up's modules (apt, passt, rootfs, kernel, provenance).

use std::path::{Path, PathBuf};

use thiserror::Error;

/// A file operation failed: what was being done, on which path.
#[derive(Debug, Error)]
#[error("{action} {}", path.display())]
pub struct IoError {
    /// What was being done (`cannot write`, ...).
    pub action: &'static str,
    /// The path.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

/// A `map_err` adapter: wraps an `io::Error` of `action` on `path` into an [`IoError`] (which
/// `?` then converts into the module's error).
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.to_path_buf();
    move |source| IoError {
        action,
        path,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_action_and_path() {
        let e = io_err("cannot write", Path::new("/x/y"))(std::io::Error::from(
            std::io::ErrorKind::NotFound,
        ));
        let chain = gatevm_abi::error_chain(&e);
        assert!(chain.starts_with("cannot write /x/y: "), "{chain}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
