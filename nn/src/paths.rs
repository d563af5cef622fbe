//! Paths read from data or checkpoint files, kept inside the folder they are relative to.

use std::path::{Component, Path, PathBuf};

/// `rel` (a path read from a file) resolved against `folder`. It is refused, with the reason,
/// when it is absolute, climbs out with `..`, or leads outside `folder` through a symbolic link
/// (checked when the target exists).
pub fn inside(folder: &Path, rel: &str) -> Result<PathBuf, String> {
    let path = Path::new(rel);
    if rel.is_empty() {
        return Err("the path is empty".to_owned());
    }
    if path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::RootDir | Component::Prefix(_)))
    {
        return Err(format!(
            "{rel:?} is an absolute path, outside {}",
            folder.display()
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{rel:?} climbs out of {} with '..'", folder.display()));
    }
    let joined = folder.join(path);
    if let (Ok(real), Ok(root)) = (joined.canonicalize(), folder.canonicalize()) {
        if !real.starts_with(&root) {
            return Err(format!(
                "{rel:?} is a link to {}, outside {}",
                real.display(),
                root.display()
            ));
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::inside;

    #[test]
    fn paths_that_leave_their_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::write(root.join("images/a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        assert_eq!(inside(&root, "images/a.png").unwrap(), root.join("images/a.png"));
        assert!(
            inside(&root, "images/missing.png").is_ok(),
            "a missing file is the caller's error"
        );
        let abs = inside(&root, "/etc/passwd").unwrap_err();
        assert!(abs.contains("absolute"), "{abs}");
        let up = inside(&root, "images/../../secret").unwrap_err();
        assert!(up.contains("'..'"), "{up}");
        assert!(inside(&root, "").is_err());
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("secret"), root.join("images/link.png")).unwrap();
            let link = inside(&root, "images/link.png").unwrap_err();
            assert!(link.contains("is a link to") && link.contains("secret"), "{link}");
        }
    }
}
