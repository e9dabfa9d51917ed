//! Self-signed development certificates that browsers accept through
//! `serverCertificateHashes`, kept on disk and rotated before they expire.

use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Ia5String, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use crate::files::{self, Visibility};
use crate::x509::{LeafInfo, San};
use crate::{CertError, CertifiedKey, DEV_CERT_VALIDITY, ROTATE_BEFORE, der};

/// How far before `now` a new certificate starts, so that a client whose clock is a little
/// behind the server's still accepts it.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(60 * 60);

/// How long before `current` is due for rotation `next` becomes valid: the same allowance
/// for clients whose clock is a little behind, given to the certificate they switch to.
const NEXT_LEAD: Duration = CLOCK_SKEW_ALLOWANCE;

// A staggered `next` must itself have at least `ROTATE_BEFORE` left when `current` expires,
// or promoting it would make the new `current` due at once (see `successor_problem`).
const _: () = assert!(DEV_CERT_VALIDITY.as_secs() >= 2 * ROTATE_BEFORE.as_secs() + NEXT_LEAD.as_secs());

/// Chrome's limit on the validity period of a certificate pinned by hash.
const MAX_PINNED_VALIDITY: Duration = Duration::from_secs(14 * 24 * 60 * 60);

/// Subject common name of every development certificate.
const COMMON_NAME: &str = "Downbeat development";

/// Names every development certificate carries, whatever the caller configured.
const DEFAULT_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Which of the two certificates a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Current,
    Next,
}

impl Slot {
    fn name(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Next => "next",
        }
    }

    fn cert_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.pem", self.name()))
    }

    fn key_path(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.key", self.name()))
    }
}

/// Self-signed development certificates, persisted in a directory and rotated before they
/// expire.
///
/// The server serves `current`. Pages fetch [`DevIdentity::published_hashes`] and pin both
/// hashes, so when [`DevIdentity::rotate_if_due`] promotes `next` to `current`, pages
/// that fetched the hashes before the switch still connect.
///
/// The two are staggered: `current` is valid from an hour before it was made, for
/// [`DEV_CERT_VALIDITY`]; `next` becomes valid an hour before `current` is due for rotation
/// (`current.not_after - ROTATE_BEFORE - 1 h`) and is valid for [`DEV_CERT_VALIDITY`] from
/// then. So `next` is published, and pinned, days before it is valid (browsers only check
/// validity when they connect), and once promoted it has almost ten days to serve before
/// it is due in turn: rotation happens about every ten days, once per cycle.
///
/// On disk, `dir` holds `current.pem`, `current.key`, `next.pem` and `next.key` (PEM; the
/// keys PKCS#8 with mode 0600 on Unix). Every file is replaced atomically.
#[derive(Clone, Debug)]
pub struct DevIdentity {
    /// The certificate to serve now.
    pub current: CertifiedKey,
    /// The certificate that replaces `current` at the next rotation. Usually not valid
    /// yet: it becomes valid an hour before the rotation is due.
    pub next: CertifiedKey,
    dir: PathBuf,
    sans: Vec<San>,
}

impl DevIdentity {
    /// Loads `current` and `next` from `dir` (creating the directory) or generates and
    /// saves them.
    ///
    /// A loaded certificate is replaced by a new one when its files are missing or do not
    /// parse, when the key does not belong to it, when it is not ECDSA P-256, when its
    /// validity period exceeds 14 days, when it has expired at `now`, or when it lacks one
    /// of the requested names. A file that cannot be read for another reason than not
    /// existing (permissions, say) is an error, not replaced.
    ///
    /// Beyond that, `current` is replaced when it is not valid yet at `now` (a new one is
    /// valid from an hour before `now`). `next` may well not be valid yet, and is kept as
    /// long as it can take over from `current`: it becomes valid no later than `current` is
    /// due for rotation (`current.not_after - ROTATE_BEFORE`) and is valid for at least
    /// [`ROTATE_BEFORE`] after `current` expires. Otherwise (for instance after `current`
    /// was replaced) a new staggered `next` is generated.
    ///
    /// `hostnames` become subject alternative names; IP address strings (also `[::1]`
    /// style) become IP SANs. `localhost`, `127.0.0.1` and `::1` are always included.
    ///
    /// This does not rotate: call [`Self::rotate_if_due`] afterwards and periodically.
    ///
    /// # Errors
    ///
    /// [`CertError::InvalidHostname`] for a name that is neither an IP address nor a DNS
    /// name; [`CertError::Io`] when the directory cannot be created or a file cannot be
    /// read (other than missing) or written; [`CertError::Generate`] or
    /// [`CertError::TimeOutOfRange`] when a certificate cannot be made for `now`.
    pub fn load_or_create(dir: &Path, hostnames: &[String], now: SystemTime) -> Result<Self, CertError> {
        let sans = subject_alt_names(hostnames)?;
        files::create_private_dir(dir)?;

        let current = match load_slot(dir, Slot::Current, &sans, now)? {
            Some(current) => current,
            None => save_generated(dir, Slot::Current, generate_current(&sans, now)?)?,
        };
        let next = load_slot(dir, Slot::Next, &sans, now)?.filter(|next| match successor_problem(next, &current) {
            None => true,
            Some(problem) => {
                info!(slot = Slot::Next.name(), reason = problem, "replacing development certificate");
                false
            }
        });
        let next = match next {
            Some(next) => next,
            None => save_generated(dir, Slot::Next, generate_next(&sans, &current)?)?,
        };

        Ok(Self { current, next, dir: dir.to_path_buf(), sans })
    }

    /// If `current` has less than [`ROTATE_BEFORE`] left at `now` (or is not valid at
    /// `now` at all), promotes `next` to `current`, generates a new staggered `next` for it
    /// (valid from an hour before the new `current` is due), saves both, and returns true.
    /// Otherwise returns false and changes nothing.
    ///
    /// When `next` is not valid at `now`, or has less than [`ROTATE_BEFORE`] left itself
    /// (the server was off for weeks, or the clock jumped), a fresh certificate valid from
    /// an hour before `now` becomes `current` instead, with a staggered `next`. Either way
    /// `current` is valid at `now` afterwards and not due again for almost ten days.
    ///
    /// # Errors
    ///
    /// [`CertError::Io`] when a file cannot be written, [`CertError::Generate`] or
    /// [`CertError::TimeOutOfRange`] when a certificate cannot be made. `self` is then
    /// unchanged, so calling again later retries.
    pub fn rotate_if_due(&mut self, now: SystemTime) -> Result<bool, CertError> {
        if !is_due(&self.current, now) {
            return Ok(false);
        }
        let current = if self.next.is_valid_at(now) && !is_due(&self.next, now) {
            self.next.clone()
        } else {
            warn!(
                not_before = ?self.next.not_before,
                not_after = ?self.next.not_after,
                "next development certificate cannot take over now; generating a new current one"
            );
            generate_current(&self.sans, now)?
        };
        let next = generate_next(&self.sans, &current)?;
        save(&self.dir, Slot::Current, &current)?;
        save(&self.dir, Slot::Next, &next)?;
        info!(
            current = %current.sha256_hex(),
            next = %next.sha256_hex(),
            "rotated development certificates"
        );
        self.current = current;
        self.next = next;
        Ok(true)
    }

    /// The SHA-256 hashes pages should pin with `serverCertificateHashes`: `current`
    /// first, then `next`.
    #[must_use]
    pub fn published_hashes(&self) -> Vec<[u8; 32]> {
        vec![self.current.sha256(), self.next.sha256()]
    }

    /// The directory the certificates are kept in.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn is_due(current: &CertifiedKey, now: SystemTime) -> bool {
    !current.is_valid_at(now) || current.remaining(now) < ROTATE_BEFORE
}

/// Why `next` cannot take over from `current` at the rotation, if it cannot.
///
/// It must be another certificate, be valid by the time `current` is due
/// (`current.not_after - ROTATE_BEFORE`), and not be due itself before `current` expires
/// (so a promotion is never followed by another one straight away). The staggered `next`
/// from [`generate_next`] meets this with an hour to spare on the first condition.
fn successor_problem(next: &CertifiedKey, current: &CertifiedKey) -> Option<&'static str> {
    if next.cert_der == current.cert_der {
        // What an interrupted rotation leaves behind (the new current saved, the new next
        // not yet); it would publish one hash twice.
        return Some("same certificate as current");
    }
    if next.not_before.checked_add(ROTATE_BEFORE).is_none_or(|start| start > current.not_after) {
        return Some("becomes valid only after current is due for rotation");
    }
    if current.not_after.checked_add(ROTATE_BEFORE).is_none_or(|end| next.not_after < end) {
        return Some("expires too soon after current to take over from it");
    }
    None
}

/// The configured names plus the defaults, parsed and without duplicates, defaults first.
fn subject_alt_names(hostnames: &[String]) -> Result<Vec<San>, CertError> {
    let mut sans = Vec::new();
    let names = DEFAULT_NAMES.iter().copied().chain(hostnames.iter().map(String::as_str));
    for name in names {
        let san = parse_hostname(name)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn parse_hostname(name: &str) -> Result<San, CertError> {
    let invalid = |reason: &str| CertError::InvalidHostname { name: name.to_owned(), reason: reason.to_owned() };
    let trimmed = name.trim();
    let unbracketed = trimmed.strip_prefix('[').and_then(|inner| inner.strip_suffix(']')).unwrap_or(trimmed);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(San::Ip(ip));
    }

    let dns = trimmed.strip_suffix('.').unwrap_or(trimmed);
    if dns.is_empty() {
        return Err(invalid("empty name"));
    }
    if dns.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    for (index, label) in dns.split('.').enumerate() {
        if index == 0 && label == "*" {
            continue;
        }
        if label.is_empty() || label.len() > 63 {
            return Err(invalid("each dot-separated label must have 1 to 63 characters"));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if !label.chars().all(allowed) {
            return Err(invalid("neither an IP address nor a DNS name (letters, digits, '-', '_' and dots)"));
        }
    }
    Ok(San::Dns(dns.to_ascii_lowercase()))
}

/// Loads one slot; `Ok(None)` means it must be replaced, for the reason logged. A `next` that
/// is not valid yet is returned: whether it fits `current` is checked by the caller.
fn load_slot(dir: &Path, slot: Slot, sans: &[San], now: SystemTime) -> Result<Option<CertifiedKey>, CertError> {
    let cert_path = slot.cert_path(dir);
    let key_path = slot.key_path(dir);
    let (Some(cert_pem), Some(key_pem)) = (read_if_exists(&cert_path)?, read_if_exists(&key_path)?) else {
        debug!(slot = slot.name(), "no saved development certificate; generating one");
        return Ok(None);
    };
    let (certified, leaf) = match files::parse_pem_pair(&cert_pem, &key_pem, &cert_path, &key_path) {
        Ok(parsed) => parsed,
        Err(err) => {
            warn!(
                slot = slot.name(),
                error = %err,
                "replacing unusable development certificate"
            );
            return Ok(None);
        }
    };
    if let Some(problem) = unusable_because(slot, &certified, &leaf, sans, now) {
        info!(
            slot = slot.name(),
            reason = %problem,
            "replacing development certificate"
        );
        return Ok(None);
    }
    Ok(Some(certified))
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, CertError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(CertError::io(path, err)),
    }
}

/// Why a parsed development certificate cannot be kept, if it cannot. Only `current` must
/// already be valid at `now`; `next` is normally published before it is valid.
fn unusable_because(
    slot: Slot,
    certified: &CertifiedKey,
    leaf: &LeafInfo,
    sans: &[San],
    now: SystemTime,
) -> Option<String> {
    if certified.chain_der.len() != 1 {
        return Some("holds more than one certificate".to_owned());
    }
    if !leaf.is_p256 {
        return Some("key is not ECDSA P-256".to_owned());
    }
    let validity = certified.not_after.duration_since(certified.not_before).unwrap_or(Duration::ZERO);
    if validity.is_zero() || validity > MAX_PINNED_VALIDITY {
        return Some(format!("validity period of {validity:?} is not within 14 days"));
    }
    if slot == Slot::Current && now < certified.not_before {
        return Some("not valid yet".to_owned());
    }
    if now >= certified.not_after {
        return Some("expired".to_owned());
    }
    if let Some(missing) = sans.iter().find(|san| !leaf.sans.contains(san)) {
        return Some(format!("does not name {missing:?}"));
    }
    None
}

fn save_generated(dir: &Path, slot: Slot, certified: CertifiedKey) -> Result<CertifiedKey, CertError> {
    save(dir, slot, &certified)?;
    info!(
        slot = slot.name(),
        sha256 = %certified.sha256_hex(),
        not_before = ?certified.not_before,
        "generated development certificate"
    );
    Ok(certified)
}

/// Writes the key before the certificate: a crash in between leaves a pair whose key does
/// not match, which the next load detects and replaces.
fn save(dir: &Path, slot: Slot, certified: &CertifiedKey) -> Result<(), CertError> {
    let key_pem = der::pem_encode("PRIVATE KEY", &certified.key_der);
    files::write_atomically(&slot.key_path(dir), key_pem.as_bytes(), Visibility::Private)?;
    let cert_pem = der::pem_encode("CERTIFICATE", &certified.cert_der);
    files::write_atomically(&slot.cert_path(dir), cert_pem.as_bytes(), Visibility::Public)
}

/// A new `current`: valid from an hour before `now` for [`DEV_CERT_VALIDITY`].
fn generate_current(sans: &[San], now: SystemTime) -> Result<CertifiedKey, CertError> {
    let not_before = now.checked_sub(CLOCK_SKEW_ALLOWANCE).ok_or(CertError::TimeOutOfRange(now))?;
    generate_with_validity(sans, not_before, DEV_CERT_VALIDITY)
}

/// A new staggered `next` for `current`: valid from an hour before `current` is due for
/// rotation (`current.not_after - ROTATE_BEFORE - 1 h`), for [`DEV_CERT_VALIDITY`].
fn generate_next(sans: &[San], current: &CertifiedKey) -> Result<CertifiedKey, CertError> {
    let not_before =
        current.not_after.checked_sub(ROTATE_BEFORE + NEXT_LEAD).ok_or(CertError::TimeOutOfRange(current.not_after))?;
    generate_with_validity(sans, not_before, DEV_CERT_VALIDITY)
}

/// The certificate itself; `not_before` is rounded down to whole seconds, the precision of
/// X.509 times, so the returned bounds are exactly the ones in the certificate.
pub(crate) fn generate_with_validity(
    sans: &[San],
    not_before: SystemTime,
    validity: Duration,
) -> Result<CertifiedKey, CertError> {
    let out_of_range = || CertError::TimeOutOfRange(not_before);
    let start_secs = not_before.duration_since(UNIX_EPOCH).map_err(|_| out_of_range())?.as_secs();
    let end_secs = start_secs.checked_add(validity.as_secs()).ok_or_else(out_of_range)?;
    let to_offset = |secs: u64| {
        i64::try_from(secs)
            .ok()
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or_else(out_of_range)
    };

    let mut params = CertificateParams::default();
    params.not_before = to_offset(start_secs)?;
    params.not_after = to_offset(end_secs)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, COMMON_NAME);
    params.distinguished_name = name;
    params.subject_alt_names = sans
        .iter()
        .map(|san| {
            Ok(match san {
                San::Dns(dns) => SanType::DnsName(Ia5String::try_from(dns.as_str())?),
                San::Ip(ip) => SanType::IpAddress(*ip),
            })
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];

    let (not_before, not_after) =
        (UNIX_EPOCH + Duration::from_secs(start_secs), UNIX_EPOCH + Duration::from_secs(end_secs));
    self_signed(params, not_before, not_after)
}

/// Signs `params` with a new ECDSA P-256 key; `not_before` and `not_after` are the bounds
/// `params` carries, as the returned key reports them.
pub(crate) fn self_signed(
    params: CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertifiedKey, CertError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    let cert_der = cert.der().to_vec();
    Ok(CertifiedKey {
        chain_der: vec![cert_der.clone()],
        cert_der,
        key_der: key.serialize_der(),
        not_before,
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509;

    const HOUR: Duration = Duration::from_secs(60 * 60);
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// A fixed, whole-second "now" (2026-01-01T00:00:00Z) so expectations are exact.
    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_767_225_600)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| (*name).to_owned()).collect()
    }

    fn load(dir: &Path, now: SystemTime) -> DevIdentity {
        DevIdentity::load_or_create(dir, &names(&["downbeat.test"]), now).expect("load_or_create")
    }

    fn hashes_on_disk(dir: &Path) -> (String, String) {
        let read = |slot: Slot| {
            crate::load_pem_files(&slot.cert_path(dir), &slot.key_path(dir)).expect("saved pair loads").sha256_hex()
        };
        (read(Slot::Current), read(Slot::Next))
    }

    #[test]
    fn generated_certificates_are_pinnable_p256_with_all_names() {
        let sans = subject_alt_names(&names(&["Music.School.test", "192.168.1.20", "[fe80::1]"])).expect("valid names");
        let cert = generate_current(&sans, t0()).expect("generate");

        assert_eq!(cert.not_before, t0() - HOUR);
        assert_eq!(cert.not_after, cert.not_before + DEV_CERT_VALIDITY);
        assert!(cert.not_after.duration_since(cert.not_before).expect("ordered") < 14 * DAY);
        assert!(cert.is_valid_at(t0()));
        assert_eq!(cert.chain_der, vec![cert.cert_der.clone()]);

        let leaf = x509::inspect(&cert.cert_der).expect("parses");
        assert!(leaf.is_p256);
        assert_eq!(leaf.not_before, cert.not_before);
        assert_eq!(leaf.not_after, cert.not_after);
        let expected = [
            San::Dns("localhost".into()),
            San::Ip("127.0.0.1".parse().expect("ip")),
            San::Ip("::1".parse().expect("ip")),
            San::Dns("music.school.test".into()),
            San::Ip("192.168.1.20".parse().expect("ip")),
            San::Ip("fe80::1".parse().expect("ip")),
        ];
        assert_eq!(leaf.sans, expected);

        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.cert_der).expect("parses");
        let subject = parsed.subject().to_string();
        assert_eq!(subject, "CN=Downbeat development");
        assert!(x509::check_key_matches(&cert.cert_der, &cert.key_der).is_ok());
    }

    #[test]
    fn next_is_staggered_after_current() {
        let sans = subject_alt_names(&[]).expect("valid names");
        let current = generate_current(&sans, t0()).expect("generate");
        let next = generate_next(&sans, &current).expect("generate");

        assert_eq!(next.not_before, current.not_after - ROTATE_BEFORE - HOUR);
        assert_eq!(next.not_after, next.not_before + DEV_CERT_VALIDITY);
        assert!(next.not_after.duration_since(next.not_before).expect("ordered") < 14 * DAY);
        assert!(!next.is_valid_at(t0()));
        // Valid an hour before current is due, with plenty left once promoted.
        let due = current.not_after - ROTATE_BEFORE;
        assert!(next.is_valid_at(due - HOUR));
        assert!(!is_due(&next, current.not_after - Duration::from_secs(1)));
        assert_eq!(successor_problem(&next, &current), None);
        let leaf = x509::inspect(&next.cert_der).expect("parses");
        assert_eq!((leaf.not_before, leaf.not_after), (next.not_before, next.not_after));
    }

    #[test]
    fn default_names_are_not_duplicated() {
        let sans = subject_alt_names(&names(&["LOCALHOST", "127.0.0.1", "[::1]", "localhost."])).expect("valid names");
        assert_eq!(sans.len(), 3);
    }

    #[test]
    fn bad_hostnames_are_rejected() {
        for bad in ["", "  ", "a..b", "has space", "fe80::1%eth0", "ünï.test", &"a".repeat(64)] {
            let err = subject_alt_names(&names(&[bad])).expect_err(bad);
            assert!(matches!(err, CertError::InvalidHostname { .. }), "{bad}: {err}");
        }
        assert!(subject_alt_names(&names(&["*.school.test", "my-host_1"])).is_ok());
    }

    #[test]
    fn load_or_create_round_trips() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs").join("dev");
        let first = load(&dir, t0());
        assert_ne!(first.current.sha256(), first.next.sha256());
        assert_eq!(first.dir(), dir);
        assert!(first.current.is_valid_at(t0()));
        assert_eq!(first.next.not_before, first.current.not_after - ROTATE_BEFORE - HOUR);

        let second = load(&dir, t0() + DAY);
        assert_eq!(second.published_hashes(), first.published_hashes());
        assert_eq!(second.current.key_der, first.current.key_der);
        assert_eq!(second.current.not_after, first.current.not_after);
        assert_eq!(hashes_on_disk(&dir), (first.current.sha256_hex(), first.next.sha256_hex()));
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_private_on_unix() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("dev");
        let mut identity = load(&dir, t0());
        identity.rotate_if_due(t0() + 11 * DAY).expect("rotate");
        let mode = |path: PathBuf| fs::metadata(path).expect("exists").permissions().mode() & 0o777;
        assert_eq!(mode(Slot::Current.key_path(&dir)), 0o600);
        assert_eq!(mode(Slot::Next.key_path(&dir)), 0o600);
        assert_eq!(mode(dir.clone()), 0o700);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("readable")
            .filter_map(Result::ok)
            .map(|entry| entry.file_name())
            .filter(|name| name.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn rotation_promotes_next() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut identity = load(tmp.path(), t0());
        let before = identity.published_hashes();
        let old_next = identity.next.sha256();

        assert!(!identity.rotate_if_due(t0()).expect("rotate"));
        assert!(!identity.rotate_if_due(t0() + 9 * DAY).expect("rotate"));
        assert_eq!(identity.published_hashes(), before);

        // 4 days before not_after = t0 - 1h + 13d23h.
        let due = identity.current.not_after - ROTATE_BEFORE + Duration::from_secs(1);
        assert!(identity.rotate_if_due(due).expect("rotate"));
        assert_eq!(identity.current.sha256(), old_next);
        assert!(before.contains(&identity.current.sha256()));
        assert!(!before.contains(&identity.next.sha256()));
        assert_eq!(identity.published_hashes()[0], old_next);
        assert!(identity.current.is_valid_at(due));
        assert!(identity.current.remaining(due) > 2 * ROTATE_BEFORE);
        // The new next is staggered again: published now, valid days later.
        assert!(!identity.next.is_valid_at(due));
        assert_eq!(identity.next.not_before, identity.current.not_after - ROTATE_BEFORE - HOUR);
        assert!(!identity.rotate_if_due(due + HOUR).expect("rotate"));

        // What was saved is what a restart loads.
        let reloaded = load(tmp.path(), due);
        assert_eq!(reloaded.published_hashes(), identity.published_hashes());
    }

    #[test]
    fn staggered_next_is_not_due_after_promotion() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut identity = load(tmp.path(), t0());
        // A next generated five days after current, as after an earlier rotation.
        identity.next = generate_current(&identity.sans, t0() + 5 * DAY).expect("generate");
        let promoted = identity.next.sha256();
        let due = t0() + 10 * DAY;
        assert!(identity.rotate_if_due(due).expect("rotate"));
        assert_eq!(identity.current.sha256(), promoted);
        assert!(!identity.rotate_if_due(due + HOUR).expect("rotate"));
    }

    #[test]
    fn rotation_after_weeks_off_makes_a_fresh_staggered_pair() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut identity = load(tmp.path(), t0());
        let before = identity.published_hashes();
        let later = t0() + 40 * DAY;

        assert!(identity.rotate_if_due(later).expect("rotate"));
        assert!(identity.current.is_valid_at(later));
        assert_eq!(identity.current.not_before, later - HOUR);
        assert!(identity.current.remaining(later) >= ROTATE_BEFORE);
        assert_eq!(identity.next.not_before, identity.current.not_after - ROTATE_BEFORE - HOUR);
        assert_ne!(identity.current.sha256(), identity.next.sha256());
        for hash in identity.published_hashes() {
            assert!(!before.contains(&hash));
        }
        assert!(!identity.rotate_if_due(later).expect("rotate"));
    }

    #[test]
    fn expired_certificates_are_replaced_on_load() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = load(tmp.path(), t0());
        let later = t0() + 15 * DAY;
        let second = load(tmp.path(), later);
        assert!(second.current.is_valid_at(later));
        assert_eq!(second.next.not_before, second.current.not_after - ROTATE_BEFORE - HOUR);
        for hash in second.published_hashes() {
            assert!(!first.published_hashes().contains(&hash));
        }
    }

    #[test]
    fn not_yet_valid_certificates_are_replaced_on_load() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first = load(tmp.path(), t0());
        let earlier = t0() - 2 * HOUR;
        let second = load(tmp.path(), earlier);
        assert_ne!(second.current.sha256(), first.current.sha256());
        assert!(second.current.is_valid_at(earlier));
        assert_eq!(successor_problem(&second.next, &second.current), None);
    }

    #[test]
    fn not_yet_valid_staggered_next_survives_reloads() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());
        let valid_from = first.next.not_before;
        assert!(valid_from > t0() + 9 * DAY);

        let mut now = t0();
        while now < valid_from + DAY {
            let reloaded = load(dir, now);
            assert_eq!(reloaded.published_hashes(), first.published_hashes(), "at {now:?}");
            assert_eq!(hashes_on_disk(dir), (first.current.sha256_hex(), first.next.sha256_hex()));
            now += 12 * HOUR;
        }
        assert!(!load(dir, t0() + 9 * DAY).next.is_valid_at(t0() + 9 * DAY));
    }

    #[test]
    fn next_that_cannot_take_over_is_replaced_on_load() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());
        let due = first.current.not_after - ROTATE_BEFORE;

        // Made together with current, as an older version did: it would expire with it.
        let together = generate_current(&first.sans, t0()).expect("generate");
        save(dir, Slot::Next, &together).expect("save");
        let second = load(dir, t0());
        assert_eq!(second.current.sha256(), first.current.sha256());
        assert_ne!(second.next.sha256(), together.sha256());
        assert_eq!(second.next.not_before, due - HOUR);

        // Valid only after the rotation is due.
        let late = generate_with_validity(&first.sans, due + HOUR, DEV_CERT_VALIDITY).expect("generate");
        save(dir, Slot::Next, &late).expect("save");
        let third = load(dir, t0());
        assert_ne!(third.next.sha256(), late.sha256());
        assert_eq!(third.next.not_before, due - HOUR);

        // Valid exactly when the rotation is due: the latest start that is still kept.
        let edge = generate_with_validity(&first.sans, due, DEV_CERT_VALIDITY).expect("generate");
        save(dir, Slot::Next, &edge).expect("save");
        assert_eq!(load(dir, t0()).next.sha256(), edge.sha256());
    }

    #[test]
    fn next_that_would_be_due_at_once_is_not_promoted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut identity = load(tmp.path(), t0());
        // Expires with current (as an older version made them): promoting it would leave a
        // current that is due straight away.
        identity.next = generate_current(&identity.sans, t0()).expect("generate");
        let stale = identity.published_hashes();
        let due = identity.current.not_after - ROTATE_BEFORE + HOUR;
        assert!(identity.rotate_if_due(due).expect("rotate"));
        assert!(!stale.contains(&identity.current.sha256()));
        assert_eq!(identity.current.not_before, due - HOUR);
        assert!(!identity.rotate_if_due(due + HOUR).expect("rotate"));
        assert!(!identity.rotate_if_due(due + 9 * DAY).expect("rotate"));
    }

    #[test]
    fn next_not_valid_yet_when_due_gives_a_fresh_current() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut identity = load(tmp.path(), t0());
        // As if the clock jumped: next starts long after current is due.
        identity.next = generate_current(&identity.sans, t0() + 30 * DAY).expect("generate");
        let far = identity.next.sha256();
        let due = identity.current.not_after - ROTATE_BEFORE + HOUR;
        assert!(identity.rotate_if_due(due).expect("rotate"));
        assert_ne!(identity.current.sha256(), far);
        assert!(identity.current.is_valid_at(due));
        assert!(identity.current.remaining(due) >= ROTATE_BEFORE);
        assert_eq!(successor_problem(&identity.next, &identity.current), None);
    }

    #[test]
    fn sixty_days_of_hourly_checks_rotate_once_per_cycle() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let mut identity = load(dir, t0());
        let mut rotations = Vec::new();
        let mut checked = std::collections::HashSet::new();

        for hour in 0..=60 * 24 {
            let now = t0() + hour * HOUR;
            let published_next = identity.next.sha256();
            if identity.rotate_if_due(now).expect("rotate") {
                assert_eq!(identity.current.sha256(), published_next, "rotation at {now:?} did not promote next");
                rotations.push(now);
            }

            assert!(identity.current.is_valid_at(now), "current not valid at {now:?}");
            assert!(!is_due(&identity.current, now));
            assert_eq!(successor_problem(&identity.next, &identity.current), None);
            for cert in [&identity.current, &identity.next] {
                if checked.insert(cert.sha256()) {
                    let validity = cert.not_after.duration_since(cert.not_before).expect("ordered");
                    assert!(validity < 14 * DAY, "{validity:?}");
                    let leaf = x509::inspect(&cert.cert_der).expect("parses");
                    assert_eq!((leaf.not_before, leaf.not_after), (cert.not_before, cert.not_after));
                }
            }
            if hour % 24 == 0 {
                // A restart at any point keeps what is published.
                assert_eq!(load(dir, now).published_hashes(), identity.published_hashes(), "reload at {now:?}");
            }
        }

        assert!(rotations.len() >= 5, "{rotations:?}");
        let first = rotations[0].duration_since(t0()).expect("ordered");
        assert!(first >= 9 * DAY && first <= 11 * DAY, "first rotation after {first:?}");
        for pair in rotations.windows(2) {
            let gap = pair[1].duration_since(pair[0]).expect("ordered");
            assert!(gap > DAY, "two rotations within a day: {gap:?}");
            assert!(gap >= 9 * DAY && gap <= 11 * DAY, "rotations {gap:?} apart");
        }
        // Every certificate served about ten days, so one generated per rotation plus the
        // first two.
        assert_eq!(checked.len(), rotations.len() + 2);
    }

    #[test]
    fn corrupt_files_are_replaced_on_load() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());

        fs::write(Slot::Current.cert_path(dir), b"-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("write");
        let second = load(dir, t0());
        assert_ne!(second.current.sha256(), first.current.sha256());
        assert_eq!(second.next.sha256(), first.next.sha256());

        fs::write(Slot::Next.key_path(dir), [0xff; 40]).expect("write");
        let third = load(dir, t0());
        assert_eq!(third.current.sha256(), second.current.sha256());
        assert_ne!(third.next.sha256(), second.next.sha256());

        // A valid certificate wrapped in PEM but not DER-valid inside.
        let garbage = der::pem_encode("CERTIFICATE", &[0x30, 0x03, 0x02, 0x01, 0x00]);
        fs::write(Slot::Current.cert_path(dir), garbage).expect("write");
        let fourth = load(dir, t0());
        assert_ne!(fourth.current.sha256(), third.current.sha256());
    }

    #[test]
    fn missing_half_of_a_pair_is_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());
        fs::remove_file(Slot::Current.key_path(dir)).expect("remove");
        let second = load(dir, t0());
        assert_ne!(second.current.sha256(), first.current.sha256());
        assert_eq!(second.next.sha256(), first.next.sha256());
    }

    #[test]
    fn swapped_keys_are_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());
        fs::rename(Slot::Current.key_path(dir), dir.join("swap")).expect("rename");
        fs::rename(Slot::Next.key_path(dir), Slot::Current.key_path(dir)).expect("rename");
        fs::rename(dir.join("swap"), Slot::Next.key_path(dir)).expect("rename");
        let second = load(dir, t0());
        for hash in second.published_hashes() {
            assert!(!first.published_hashes().contains(&hash));
        }
        assert!(x509::check_key_matches(&second.current.cert_der, &second.current.key_der).is_ok());
    }

    #[test]
    fn over_long_validity_is_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());
        let long = generate_with_validity(&first.sans, t0() - HOUR, 30 * DAY).expect("generate");
        save(dir, Slot::Next, &long).expect("save");
        let second = load(dir, t0());
        assert_eq!(second.current.sha256(), first.current.sha256());
        assert_ne!(second.next.sha256(), long.sha256());
        assert!(second.next.not_after.duration_since(second.next.not_before).expect("ordered") < 14 * DAY);
    }

    #[test]
    fn new_hostname_replaces_certificates() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());
        let second = DevIdentity::load_or_create(dir, &names(&["downbeat.test", "10.0.0.5"]), t0()).expect("load");
        assert_ne!(second.current.sha256(), first.current.sha256());
        let leaf = x509::inspect(&second.current.cert_der).expect("parses");
        assert!(leaf.sans.contains(&San::Ip("10.0.0.5".parse().expect("ip"))));
        // Fewer names than the certificate carries is fine.
        let third = DevIdentity::load_or_create(dir, &[], t0()).expect("load");
        assert_eq!(third.published_hashes(), second.published_hashes());
    }

    #[test]
    fn next_equal_to_current_is_replaced() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let first = load(dir, t0());
        save(dir, Slot::Next, &first.current).expect("save");
        let second = load(dir, t0());
        assert_eq!(second.current.sha256(), first.current.sha256());
        assert_ne!(second.next.sha256(), first.current.sha256());
    }

    #[test]
    fn debug_does_not_print_the_key() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let identity = load(tmp.path(), t0());
        let printed = format!("{identity:?}");
        assert!(printed.contains(&identity.current.sha256_hex()));
        assert!(printed.contains("<redacted>"));
        let key_hex = hex::encode(&identity.current.key_der);
        assert!(!printed.contains(&key_hex[key_hex.len() - 32..]));
        let tail = &identity.current.key_der[identity.current.key_der.len() - 8..];
        let key_bytes = format!("{tail:?}");
        assert!(!printed.contains(&key_bytes[1..key_bytes.len() - 1]));
    }

    #[test]
    fn unreadable_directory_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("a-file");
        fs::write(&file, b"x").expect("write");
        let err = DevIdentity::load_or_create(&file.join("dev"), &[], t0()).expect_err("not a dir");
        assert!(matches!(err, CertError::Io { .. }), "{err}");
    }
}
