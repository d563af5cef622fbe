//! File-system helpers shared by the writers of the `emma` crate.

use crate::error::{io_err, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically (see [`tensor::atomic_file`]): readers see either the
/// old file or the whole new one; on failure the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    tensor::atomic_file::write_atomic(path, |w| w.write_all(bytes)).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let err = write_atomic(&dir.path().join("missing/a.json"), b"x").unwrap_err();
        assert!(err.to_string().contains("missing/a.json"), "{err}");
    }
}
