//! PEM files on disk: loading a certificate chain and key, noticing when they change, and
//! writing them atomically.

use std::fs;
use std::io::{self, Write as _};
use std::path::Path;
use std::time::SystemTime;

use rustls::pki_types::PrivateKeyDer;

use crate::x509::{self, KeyProblem, LeafInfo};
use crate::{CertError, CertifiedKey, der};

/// Loads a production certificate chain and its private key from PEM files.
///
/// `cert_path` holds one or more `CERTIFICATE` blocks, leaf first (as ACME clients write
/// `fullchain.pem`). `key_path` holds the leaf's private key as PKCS#8 (`PRIVATE KEY`),
/// PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`); the first key found is used and is
/// converted to PKCS#8. Both may be the same file.
///
/// Fails if a file cannot be read, holds no certificate or no key, if a certificate does
/// not parse, if rustls cannot use the key, or if the key is not the leaf's. An expired
/// certificate still loads: check [`CertifiedKey::is_valid_at`] to warn about it.
///
/// # Errors
///
/// [`CertError::Io`] (with the path) when a file cannot be read,
/// [`CertError::NoCertificate`] / [`CertError::NoKey`] when a file holds no such PEM block,
/// [`CertError::Parse`] when PEM or a certificate is malformed,
/// [`CertError::UnsupportedKey`] when rustls cannot sign with the key, and
/// [`CertError::KeyMismatch`] when the key is not the leaf certificate's.
pub fn load_pem_files(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, CertError> {
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let (certified, _) = parse_pem_pair(&cert_pem, &key_pem, cert_path, key_path)?;
    Ok(certified)
}

/// Builds a [`CertifiedKey`] from PEM text, with what the leaf says; the paths are only used
/// in errors.
pub(crate) fn parse_pem_pair(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<(CertifiedKey, LeafInfo), CertError> {
    let parse_error = |path: &Path, reason: String| CertError::Parse { path: path.to_path_buf(), reason };

    let chain_der = rustls_pemfile::certs(&mut &cert_pem[..])
        .map(|cert| cert.map(|cert| cert.as_ref().to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| parse_error(cert_path, format!("bad PEM: {err}")))?;
    let Some(cert_der) = chain_der.first().cloned() else {
        return Err(CertError::NoCertificate { path: cert_path.to_path_buf() });
    };
    let leaf = x509::inspect(&cert_der).map_err(|reason| parse_error(cert_path, reason))?;
    for (index, der) in chain_der.iter().enumerate().skip(1) {
        x509::check_parses(der)
            .map_err(|reason| parse_error(cert_path, format!("certificate {} of the chain: {reason}", index + 1)))?;
    }

    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|err| parse_error(key_path, format!("bad PEM: {err}")))?
        .ok_or_else(|| CertError::NoKey { path: key_path.to_path_buf() })?;
    let unsupported =
        |reason: &str| CertError::UnsupportedKey { path: key_path.to_path_buf(), reason: reason.to_owned() };
    let key_der = match &key {
        PrivateKeyDer::Pkcs8(pkcs8) => pkcs8.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(pkcs1) => der::pkcs1_to_pkcs8(pkcs1.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(sec1) => der::sec1_to_pkcs8(sec1.secret_sec1_der(), leaf.ec_curve_oid.as_deref())
            .ok_or_else(|| unsupported("EC key without a named curve, or malformed SEC1"))?,
        _ => return Err(unsupported("unknown private key encoding")),
    };
    match x509::check_key_matches(&cert_der, &key_der) {
        Ok(()) => {}
        Err(KeyProblem::Unsupported(reason)) => return Err(unsupported(&reason)),
        Err(KeyProblem::Mismatch) => {
            return Err(CertError::KeyMismatch {
                cert_path: cert_path.to_path_buf(),
                key_path: key_path.to_path_buf(),
            });
        }
    }

    let certified =
        CertifiedKey { cert_der, chain_der, key_der, not_before: leaf.not_before, not_after: leaf.not_after };
    Ok((certified, leaf))
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|err| CertError::io(path, err))
}

/// A fingerprint of a certificate file and a key file, for noticing that they changed.
///
/// Two stamps of the same paths compare equal while neither file was rewritten: it records
/// each file's length and modification time, and on Unix its device and inode, so an
/// atomic replacement (rename over the old file, as ACME clients do) shows up even if the
/// length and time happen to match. Symlinks are followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    cert: FileMeta,
    key: FileMeta,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FileMeta {
    len: u64,
    modified: SystemTime,
    /// `(device, inode)` on Unix; `None` elsewhere.
    identity: Option<(u64, u64)>,
}

/// Takes a [`FileStamp`] of the two files, so the server can poll for changes and reload
/// with [`load_pem_files`] when the stamp differs from the last one.
///
/// # Errors
///
/// [`CertError::Io`] with the path when a file's metadata cannot be read (for example it
/// does not exist, possibly only for a moment while it is being replaced).
pub fn pem_files_stamp(cert_path: &Path, key_path: &Path) -> Result<FileStamp, CertError> {
    Ok(FileStamp { cert: file_meta(cert_path)?, key: file_meta(key_path)? })
}

fn file_meta(path: &Path) -> Result<FileMeta, CertError> {
    let meta = fs::metadata(path).map_err(|err| CertError::io(path, err))?;
    let modified = meta.modified().map_err(|err| CertError::io(path, err))?;
    #[cfg(unix)]
    let identity = {
        use std::os::unix::fs::MetadataExt as _;
        Some((meta.dev(), meta.ino()))
    };
    #[cfg(not(unix))]
    let identity = None;
    Ok(FileMeta { len: meta.len(), modified, identity })
}

/// Creates `dir` and its parents; directories created here are private (0700 on Unix).
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|err| CertError::io(dir, err))
}

/// Whether a file may be read by others once written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Visibility {
    /// Certificates: 0644 on Unix.
    Public,
    /// Private keys: 0600 on Unix.
    Private,
}

/// Replaces `path` with `contents` so that readers see either the old or the new file,
/// never a partial one: write a temporary file in the same directory, fsync it, rename it
/// over `path`, then fsync the directory so the rename itself survives a crash.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], visibility: Visibility) -> Result<(), CertError> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path.file_name().map_or_else(|| "file".into(), |name| name.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));

    let written = write_new_file(&tmp, contents, visibility)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|err| CertError::io(path, err));
    if written.is_err() {
        // Best effort: the temporary file is useless now, and the error above matters more.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir).map_err(|err| CertError::io(dir, err))
}

fn write_new_file(tmp: &Path, contents: &[u8], visibility: Visibility) -> io::Result<()> {
    // A leftover from a crashed run with the same process id is removed; creating with
    // `create_new` then never follows a symlink someone placed there.
    match fs::remove_file(tmp) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(match visibility {
            Visibility::Public => 0o644,
            Visibility::Private => 0o600,
        });
    }
    #[cfg(not(unix))]
    let _ = visibility;
    let mut file = options.open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    // Windows cannot open a directory as a file to flush it; the rename is still atomic.
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::DevIdentity;

    /// A directory with a development pair in `current.*` and `next.*`.
    fn fixture() -> (tempfile::TempDir, DevIdentity) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let now = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        let identity = DevIdentity::load_or_create(tmp.path(), &[], now).expect("create");
        (tmp, identity)
    }

    fn path(tmp: &tempfile::TempDir, name: &str) -> std::path::PathBuf {
        tmp.path().join(name)
    }

    fn write(tmp: &tempfile::TempDir, name: &str, contents: impl AsRef<[u8]>) -> std::path::PathBuf {
        let file = path(tmp, name);
        fs::write(&file, contents).expect("write");
        file
    }

    /// The SEC1 `ECPrivateKey` inside a PKCS#8 `PrivateKeyInfo`.
    fn sec1_inside(pkcs8: &[u8]) -> Vec<u8> {
        let (_, body, _) = der::read_tlv(pkcs8).expect("sequence");
        let (_, _version, body) = der::read_tlv(body).expect("version");
        let (_, _algorithm, body) = der::read_tlv(body).expect("algorithm");
        let (_, sec1, _) = der::read_tlv(body).expect("key");
        sec1.to_vec()
    }

    /// `sec1` with an explicit `[0]` P-256 curve parameter inserted after the private key.
    fn with_curve_parameter(sec1: &[u8]) -> Vec<u8> {
        const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
        let (_, body, _) = der::read_tlv(sec1).expect("sequence");
        let (_, version, rest) = der::read_tlv(body).expect("version");
        let (_, private, rest) = der::read_tlv(rest).expect("private key");
        assert_eq!(der::read_tlv(rest).map(|(tag, _, _)| tag), Some(0xa1), "no [0] yet");
        let content = [
            der::tlv(0x02, version),
            der::tlv(0x04, private),
            der::tlv(0xa0, &der::tlv(der::TAG_OID, P256)),
            rest.to_vec(),
        ]
        .concat();
        der::tlv(0x30, &content)
    }

    #[test]
    fn loads_a_generated_pair() {
        let (tmp, identity) = fixture();
        let loaded = load_pem_files(&path(&tmp, "current.pem"), &path(&tmp, "current.key")).expect("loads");
        assert_eq!(loaded.sha256(), identity.current.sha256());
        assert_eq!(loaded.cert_der, identity.current.cert_der);
        assert_eq!(loaded.chain_der, vec![loaded.cert_der.clone()]);
        assert_eq!(loaded.key_der, identity.current.key_der);
        assert_eq!(loaded.not_before, identity.current.not_before);
        assert_eq!(loaded.not_after, identity.current.not_after);
        assert_eq!(loaded.sha256_hex().len(), 64);
        assert_eq!(loaded.sha256_hex(), loaded.sha256_hex().to_lowercase());
    }

    #[test]
    fn loads_a_chain_leaf_first_and_a_combined_file() {
        let (tmp, identity) = fixture();
        let current = fs::read(path(&tmp, "current.pem")).expect("read");
        let next = fs::read(path(&tmp, "next.pem")).expect("read");
        let key = fs::read(path(&tmp, "current.key")).expect("read");
        let chain = write(&tmp, "fullchain.pem", [current.clone(), next].concat());
        let loaded = load_pem_files(&chain, &path(&tmp, "current.key")).expect("loads");
        assert_eq!(loaded.chain_der.len(), 2);
        assert_eq!(loaded.cert_der, identity.current.cert_der);
        assert_eq!(loaded.chain_der[1], identity.next.cert_der);

        let combined = write(&tmp, "combined.pem", [key, current].concat());
        let loaded = load_pem_files(&combined, &combined).expect("loads");
        assert_eq!(loaded.sha256(), identity.current.sha256());
    }

    #[test]
    fn loads_sec1_keys_with_and_without_curve() {
        let (tmp, identity) = fixture();
        let sec1 = sec1_inside(&identity.current.key_der);
        let cert = path(&tmp, "current.pem");
        for (name, sec1) in [("plain.key", sec1.clone()), ("named.key", with_curve_parameter(&sec1))] {
            let key = write(&tmp, name, der::pem_encode("EC PRIVATE KEY", &sec1));
            let loaded = load_pem_files(&cert, &key).unwrap_or_else(|err| panic!("{name}: {err}"));
            assert_eq!(loaded.sha256(), identity.current.sha256());
            let x509::LeafInfo { .. } = x509::inspect(&loaded.cert_der).expect("parses");
            assert!(x509::check_key_matches(&loaded.cert_der, &loaded.key_der).is_ok());
        }
        // Without parameters the wrapping is exactly what ring wrote in the first place.
        let key = write(&tmp, "again.key", der::pem_encode("EC PRIVATE KEY", &sec1));
        let loaded = load_pem_files(&cert, &key).expect("loads");
        assert_eq!(loaded.key_der, identity.current.key_der);
    }

    #[test]
    fn missing_file_names_the_path() {
        let (tmp, _) = fixture();
        let missing = path(&tmp, "missing.pem");
        let err = load_pem_files(&missing, &path(&tmp, "current.key")).expect_err("missing");
        match &err {
            CertError::Io { path, source } => {
                assert_eq!(path, &missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let err = load_pem_files(&path(&tmp, "current.pem"), &missing).expect_err("missing");
        assert!(matches!(&err, CertError::Io { path, .. } if *path == missing), "{err}");
    }

    #[test]
    fn file_without_a_key_or_certificate_is_a_clear_error() {
        let (tmp, _) = fixture();
        let cert = path(&tmp, "current.pem");
        let key = path(&tmp, "current.key");

        let err = load_pem_files(&cert, &cert).expect_err("no key");
        assert!(matches!(&err, CertError::NoKey { path } if *path == cert), "{err}");
        assert!(err.to_string().contains("no PEM private key"), "{err}");

        let err = load_pem_files(&key, &key).expect_err("no certificate");
        assert!(matches!(&err, CertError::NoCertificate { path } if *path == key), "{err}");

        let empty = write(&tmp, "empty.pem", "");
        let err = load_pem_files(&empty, &key).expect_err("no certificate");
        assert!(matches!(err, CertError::NoCertificate { .. }), "{err}");

        let encrypted = write(
            &tmp,
            "encrypted.key",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let err = load_pem_files(&cert, &encrypted).expect_err("encrypted");
        assert!(matches!(err, CertError::NoKey { .. }), "{err}");
    }

    #[test]
    fn bad_contents_are_parse_errors() {
        let (tmp, _) = fixture();
        let key = path(&tmp, "current.key");
        let not_der = write(&tmp, "bad.pem", der::pem_encode("CERTIFICATE", b"nonsense"));
        let err = load_pem_files(&not_der, &key).expect_err("bad certificate");
        assert!(matches!(&err, CertError::Parse { path, .. } if *path == not_der), "{err}");

        let not_base64 = write(&tmp, "bad64.pem", "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n");
        let err = load_pem_files(&not_base64, &key).expect_err("bad base64");
        assert!(matches!(err, CertError::Parse { .. }), "{err}");

        let bad_key = write(&tmp, "bad.key", der::pem_encode("PRIVATE KEY", b"nonsense"));
        let err = load_pem_files(&path(&tmp, "current.pem"), &bad_key).expect_err("bad key");
        assert!(matches!(&err, CertError::UnsupportedKey { path, .. } if *path == bad_key), "{err}");
    }

    #[test]
    fn key_of_another_certificate_is_a_mismatch() {
        let (tmp, _) = fixture();
        let err = load_pem_files(&path(&tmp, "current.pem"), &path(&tmp, "next.key")).expect_err("mismatch");
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("next.key"), "{err}");
    }

    #[test]
    fn stamp_changes_when_a_file_changes() {
        let (tmp, _) = fixture();
        let cert = path(&tmp, "current.pem");
        let key = path(&tmp, "current.key");
        let first = pem_files_stamp(&cert, &key).expect("stamp");
        assert_eq!(pem_files_stamp(&cert, &key).expect("stamp"), first);

        // Same length, new contents, in place: only the modification time tells.
        let mut contents = fs::read(&cert).expect("read");
        contents.swap(40, 41);
        fs::write(&cert, &contents).expect("write");
        let file = fs::File::options().write(true).open(&cert).expect("open");
        let modified = file.metadata().expect("metadata").modified().expect("mtime");
        file.set_modified(modified + Duration::from_secs(5)).expect("set mtime");
        drop(file);
        let second = pem_files_stamp(&cert, &key).expect("stamp");
        assert_ne!(second, first);

        // Replaced by rename, as ACME clients and `write_atomically` do.
        let key_contents = fs::read(&key).expect("read");
        write_atomically(&key, &key_contents, Visibility::Private).expect("write");
        let third = pem_files_stamp(&cert, &key).expect("stamp");
        assert_ne!(third, second);

        fs::write(&cert, b"shorter").expect("write");
        assert_ne!(pem_files_stamp(&cert, &key).expect("stamp"), third);

        let err = pem_files_stamp(&path(&tmp, "gone.pem"), &key).expect_err("missing");
        assert!(matches!(err, CertError::Io { .. }), "{err}");
    }

    #[test]
    fn atomic_write_replaces_and_cleans_up() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let target = path(&tmp, "file.pem");
        write_atomically(&target, b"one", Visibility::Public).expect("write");
        write_atomically(&target, b"two", Visibility::Public).expect("write");
        assert_eq!(fs::read(&target).expect("read"), b"two");
        let names: Vec<_> =
            fs::read_dir(tmp.path()).expect("readable").filter_map(Result::ok).map(|entry| entry.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file.pem")]);

        let err = write_atomically(&path(&tmp, "no-dir/file.pem"), b"x", Visibility::Public).expect_err("no directory");
        assert!(matches!(err, CertError::Io { .. }), "{err}");
    }
}
