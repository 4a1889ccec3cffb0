//! The keys of signed actions: public keys as configured
//! (`dms.signing.keys`, each `kid:key`), private key files as the signer
//! reads and writes them (PKCS#8 PEM, what `openssl genpkey -algorithm
//! ed25519` writes too, mode 0600).
//!
//! A private key never appears in an error message: errors name the file
//! and what is wrong with it, never its content.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::path::Path;

/// A key id: 1 to 64 letters, digits, `.`, `-`, `_` (no `:` or `,`, which
/// separate entries in `snap set iot-agent dms.signing.keys=...`).
pub fn check_kid(kid: &str) -> Result<(), String> {
    let ok = !kid.is_empty()
        && kid.len() <= 64
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key id {kid:?} must be 1 to 64 letters, digits, '.', '-' or '_'"
        ))
    }
}

/// Reads one configured entry: `kid:key`, the key the 32 bytes of an
/// Ed25519 public key in base64url (padding and the standard alphabet are
/// taken too).
pub fn parse_entry(entry: &str) -> Result<(String, VerifyingKey), String> {
    let entry = entry.trim();
    let Some((kid, key)) = entry.split_once(':') else {
        return Err(format!(
            "{entry:?} is not kid:key (a key id, a colon, the public key in base64url)"
        ));
    };
    check_kid(kid)?;
    let normalized: String = key
        .trim()
        .trim_end_matches('=')
        .chars()
        .map(|c| match c {
            '+' => '-',
            '/' => '_',
            c => c,
        })
        .collect();
    let bytes = URL_SAFE_NO_PAD
        .decode(&normalized)
        .map_err(|e| format!("the public key of {kid:?} is not base64url: {e}"))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "the public key of {kid:?} has {} bytes; an Ed25519 public key has 32",
            b.len()
        )
    })?;
    let key = VerifyingKey::from_bytes(&bytes)
        .map_err(|_| format!("the public key of {kid:?} is not a valid Ed25519 point"))?;
    if key.is_weak() {
        return Err(format!(
            "the public key of {kid:?} is a weak (small-order) key: anyone could sign for it"
        ));
    }
    Ok((kid.to_string(), key))
}

/// The configuration entry of a public key: `kid:base64url`.
pub fn entry(kid: &str, key: &VerifyingKey) -> String {
    format!("{kid}:{}", URL_SAFE_NO_PAD.encode(key.to_bytes()))
}

/// A new key from the operating system's random source.
pub fn generate() -> Result<SigningKey, String> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| "the system's random source failed".to_string())?;
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    Ok(key)
}

/// Reads a private key file (PKCS#8 PEM). A file that others can read is
/// refused, as ssh does: the key is what makes an action the operator's.
pub fn read_private(path: &Path) -> Result<SigningKey, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read the key file {shown}: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the key file {shown} can be read by others (mode {mode:o}): `chmod 600 {shown}` first"
        ));
    }
    let text =
        Wiped(std::fs::read(path).map_err(|e| format!("cannot read the key file {shown}: {e}"))?);
    let text = std::str::from_utf8(&text.0)
        .map_err(|_| format!("the key file {shown} is not a PEM text file"))?;
    SigningKey::from_pkcs8_pem(text).map_err(|_| {
        format!(
            "the key file {shown} is not an Ed25519 private key in PKCS#8 PEM \
             (`iot-agent sign --keygen` or `openssl genpkey -algorithm ed25519` writes one)"
        )
    })
}

/// Bytes wiped when dropped (the key file's text).
struct Wiped(Vec<u8>);

impl Drop for Wiped {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|b| *b = 0);
    }
}

/// Writes a new private key file, 0600 from its first byte; an existing
/// file is never replaced (it may be the only copy of a key in use).
pub fn write_new_private(path: &Path, key: &SigningKey) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    // PKCS#8 v1 (the private key alone), as `openssl genpkey` writes it:
    // OpenSSL 3.0 and Python's cryptography refuse the v2 form (with the
    // public key) that the key type would write by itself.
    let v1 = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    let pem = v1
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|_| "cannot encode the key as PKCS#8".to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::fsutil::SECRET_MODE)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                format!("{shown} exists; not replacing it (it may be a key in use)")
            }
            _ => format!("cannot create the key file {shown}: {e}"),
        })?;
    let written = f.write_all(pem.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(format!("cannot write the key file {shown}: {e}"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_ones_say_why() {
        let k = SigningKey::from_bytes(&[9; 32]).verifying_key();
        let e = entry("ops-2026", &k);
        assert_eq!(parse_entry(&e).unwrap(), ("ops-2026".to_string(), k));
        // Standard alphabet with padding, as another tool may print it.
        let std_b64 = base64::engine::general_purpose::STANDARD.encode(k.to_bytes());
        assert_eq!(parse_entry(&format!("x:{std_b64}")).unwrap().1, k);
        for (bad, why) in [
            ("nokey", "kid:key"),
            ("a b:AAAA", "key id"),
            ("a:AAAA", "32"),
            ("a:!!", "base64url"),
            // The identity point: small order.
            ("a:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "weak"),
        ] {
            let err = parse_entry(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn key_files_are_private_never_replaced_and_never_echoed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.key");
        let key = generate().unwrap();
        write_new_private(&path, &key).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(read_private(&path).unwrap(), key);
        let again = write_new_private(&path, &generate().unwrap()).unwrap_err();
        assert!(again.contains("not replacing"), "{again}");
        assert_eq!(read_private(&path).unwrap(), key, "the first key is kept");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_private(&path).unwrap_err().contains("chmod 600"));

        // A file that is not a key: the error names the file, not its text.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "SECRET-CONTENT").unwrap();
        std::fs::set_permissions(&junk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = read_private(&junk).unwrap_err();
        assert!(err.contains("PKCS#8") && !err.contains("SECRET"), "{err}");
    }
}
