//! Generated passwords: random, created once (0600, atomically: a reader
//! sees no file or the whole password, and two processes creating it at
//! the same moment end up with the same one), never logged.

use super::{io, NatsServerError};
use base64::Engine as _;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Random bytes in a generated password (192 bits).
const BYTES: usize = 24;

/// The password in `path`, if it can be read and is not empty.
pub fn read(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let p = text.trim();
    (!p.is_empty()).then(|| p.to_string())
}

/// The password in `path`, generated first when there is none.
pub fn ensure(path: &Path) -> Result<String, NatsServerError> {
    if let Some(p) = read(path) {
        return Ok(p);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io("cannot create", dir))?;
    let password = generate();
    let tmp = dir.join(format!(
        ".{}.new-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(crate::fsutil::SECRET_MODE)
            .open(&tmp)?;
        f.write_all(format!("{password}\n").as_bytes())?;
        f.sync_all()?;
        // link(2) never replaces: if another process was first, its
        // password stands and is the one returned.
        let linked = fs::hard_link(&tmp, path);
        fs::remove_file(&tmp)?;
        match linked {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io("cannot write", path)(e));
    }
    read(path).ok_or_else(|| NatsServerError::Config(format!("{} is empty", path.display())))
}

/// A new random password (URL-safe base64: no quoting trouble anywhere).
pub fn generate() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; BYTES];
    // The kernel's generator (getrandom); it does not fail on Linux.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random generator is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_password_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nats/device/password");
        let first = ensure(&p).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(ensure(&p).unwrap(), first);
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_ne!(generate(), generate());
        // Nothing but the password is left in the directory.
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
