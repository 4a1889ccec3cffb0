//! Files that must survive a crash: written to a temporary file in the same
//! directory, fsync'd, renamed over the target, and the directory fsync'd,
//! so a reader sees the old content or the new, never half of either.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Mode of files holding secrets.
pub const SECRET_MODE: u32 = 0o600;

/// Atomically replaces `path` with `data`, created with `mode` (the mode
/// applies from the first byte: a secret is never readable by others, not
/// even while it is being written).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // A leftover temp file of a crashed run may have another mode.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Makes `path` a state file only root can read, before anything is
/// written to it: created 0600 when missing (no window with the umask's
/// mode), and set to 0600 when it existed with another mode.
pub fn make_private_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(SECRET_MODE)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SECRET_MODE))
}

/// Creates a directory the agent owns (and its parents), 0700 even when it
/// existed before with a wider mode.
pub fn make_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Removes a file; a file that is already gone is fine.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_with_the_mode_given() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/.secret");
        write_atomic(&p, b"one", SECRET_MODE).unwrap();
        write_atomic(&p, b"two", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        remove_if_exists(&p).unwrap();
        remove_if_exists(&p).unwrap();
    }
}

#[cfg(test)]
mod private_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn state_files_and_dirs_are_private_even_when_they_existed() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        make_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let f = dir.join("x.db");
        make_private_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&f, b"kept").unwrap();
        make_private_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read(&f).unwrap(), b"kept");
    }
}
