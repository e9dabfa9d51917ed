//! Tenants (schools) and the signed tokens (JWTs) that say who a user is.
//!
//! Each tenant's identity provider signs tokens with the tenant's keys; the server only
//! verifies them. A token must carry `iss` (the tenant's issuer), `aud` (the server's
//! audience), `exp`, `sub`, and the Downbeat claims `tenant`, `role` and `name`. No token lives
//! longer than the server's maximum lifetime (`exp` minus `iat`, and `exp` minus now), and
//! none says it was issued in the future.
//!
//! [`Tenants::verify`] trusts nothing in a token before its signature checks out: the header's
//! algorithm must be on the allow-list and be the one algorithm of one of the named tenant's
//! keys, so neither `alg: none` nor a public key used as an HMAC secret gets through, and a
//! token signed with one tenant's key but naming another fails that other tenant's keys.
//!
//! Without configured tenants the server runs one **demo tenant** whose HS256 secret is made
//! once and kept in the data directory, so tokens minted with [`Tenants::mint`] survive
//! restarts.
//!
//! The server's **operators** are a realm of their own, shaped like a tenant
//! ([`OPERATOR_REALM`], the `[operators]` table, or demo operators beside the demo tenant): only
//! their keys give [`Role::Operator`], and they give no other role.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{self, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use downbeat_protocol::{ErrorCode, TextKind, check_text};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

pub use crate::config::OPERATOR_REALM;
use crate::config::{
    Config, ConfigError, KeyAlgorithm, MIN_SECRET_BYTES, TenantConfig, TenantKeyConfig, TenantLimits, TenantRetention,
    decode_secret,
};

/// Longest token accepted, in bytes; longer ones are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Clock skew allowed when checking `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// The demo tenant's id.
pub const DEMO_TENANT_ID: &str = "demo";

/// The demo tenant's display name.
pub const DEMO_TENANT_NAME: &str = "Demo School";

/// The demo tenant's issuer (`iss`).
pub const DEMO_TENANT_ISSUER: &str = "downbeat-dev";

/// File in the data directory holding the demo tenant's secret (base64url).
pub const DEMO_SECRET_FILE: &str = "demo-tenant.secret";

/// The demo operators' issuer (`iss`), beside the demo tenant.
pub const DEMO_OPERATOR_ISSUER: &str = "downbeat-dev-operators";

/// File in the data directory holding the demo operators' secret (base64url).
pub const DEMO_OPERATOR_SECRET_FILE: &str = "demo-operator.secret";

/// Longest `sub` claim, in bytes.
const MAX_SUB_BYTES: usize = 128;

/// Longest `name` claim, in bytes.
const MAX_NAME_BYTES: usize = 64;

/// Every algorithm a token header may name (each tenant key narrows it to one).
const ACCEPTED_ALGORITHMS: [Algorithm; 8] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::RS256,
    Algorithm::PS256,
];

/// Who a user is to their school (see `crate::authz` for what each may do).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Creates and runs rooms, and reads the SEL data of the rooms they run.
    Teacher,
    /// Joins rooms and plays.
    Student,
    /// The school's data steward: exports and deletes a child's data and reads any room's
    /// SEL data; never joins or runs a room.
    Admin,
    /// Runs the server, not a school: uses the inspector only. Its tokens come from the
    /// operators' keys ([`OPERATOR_REALM`]), never from a school's, and reach no school's
    /// rooms or data through the school API.
    Operator,
}

impl Role {
    /// The claim value: `"teacher"`, `"student"` or `"admin"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
            Self::Admin => "admin",
            Self::Operator => "operator",
        }
    }

    /// The role a member of a room has on the wire; `None` for admins and operators, who
    /// never join one.
    pub const fn member_role(self) -> Option<downbeat_protocol::Role> {
        match self {
            Self::Teacher => Some(downbeat_protocol::Role::Teacher),
            Self::Student => Some(downbeat_protocol::Role::Student),
            Self::Admin | Self::Operator => None,
        }
    }
}

impl From<downbeat_protocol::Role> for Role {
    fn from(role: downbeat_protocol::Role) -> Self {
        match role {
            downbeat_protocol::Role::Teacher => Self::Teacher,
            downbeat_protocol::Role::Student => Self::Student,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token's claims. Unknown claims are ignored; `aud` is a single string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer: the tenant's `issuer`.
    pub iss: String,
    /// Audience: the server's `token_audience`.
    pub aud: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Subject: the user's stable id within the tenant (1 to 128 bytes).
    pub sub: String,
    /// The tenant's id.
    pub tenant: String,
    /// The user's role.
    pub role: Role,
    /// Display name (1 to 64 bytes).
    pub name: String,
}

/// Who a verified token speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The tenant's id.
    pub tenant: Arc<str>,
    /// The user's stable id within the tenant (`sub`).
    pub subject: String,
    /// The user's role.
    pub role: Role,
    /// Display name.
    pub name: String,
    /// When the token expires, Unix seconds (`exp`).
    pub expires_at_unix: u64,
}

/// Why a token was refused or could not be made. Messages are safe to show the client: they
/// never contain key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Not a JWT, bad base64 or JSON, a missing claim, or an algorithm that is not accepted.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The `tenant` claim names no configured tenant.
    #[error("the token's tenant {0:?} is not known to this server")]
    UnknownTenant(String),
    /// No key of the tenant verifies the signature.
    #[error("the token's signature does not verify with its tenant's keys")]
    BadSignature,
    /// `exp` has passed.
    #[error("the token has expired: sign in again for a fresh one")]
    Expired,
    /// `nbf` is still ahead.
    #[error("the token is not valid yet (check the issuer's clock)")]
    NotYetValid,
    /// `iat` is ahead of now by more than the leeway.
    #[error("the token says it was issued in the future (check the issuer's clock)")]
    IssuedInFuture,
    /// `exp` is further from `iat`, or from now, than the server's maximum token lifetime.
    #[error(
        "the token is valid for longer than this server accepts (at most {0} s): ask the identity provider for a shorter-lived token"
    )]
    TooLongLived(u64),
    /// `aud` is not this server's audience.
    #[error("the token's audience (aud) is not this server's")]
    WrongAudience,
    /// `iss` is not the tenant's issuer.
    #[error("the token's issuer (iss) is not its tenant's")]
    WrongIssuer,
    /// The `tenant` claim names another tenant than the one whose key verified the token.
    #[error("the token's tenant claim does not match the key that signed it")]
    TenantMismatch,
    /// `sub` or `name` is empty, too long or has control characters.
    #[error("bad claim: {0}")]
    BadClaim(&'static str),
    /// A token could not be minted.
    #[error("cannot mint a token: {0}")]
    CannotMint(String),
}

impl AuthError {
    /// The protocol error code to send: [`ErrorCode::TokenExpired`] for an expired token,
    /// [`ErrorCode::Unauthorized`] for everything else.
    pub const fn code(&self) -> ErrorCode {
        match self {
            Self::Expired => ErrorCode::TokenExpired,
            _ => ErrorCode::Unauthorized,
        }
    }

    /// Maps a `jsonwebtoken` failure to the variant a client should see.
    fn from_jwt(error: &jsonwebtoken::errors::Error) -> Self {
        match error.kind() {
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::MissingRequiredClaim(claim) => Self::Malformed(format!("the `{claim}` claim is missing")),
            ErrorKind::InvalidClaimFormat(claim) => Self::Malformed(format!("the `{claim}` claim is not valid")),
            ErrorKind::Json(e) => Self::Malformed(format!("a part is not the JSON expected: {e}")),
            ErrorKind::InvalidToken => {
                Self::Malformed("not a JWT: expected three base64url parts separated by dots".to_owned())
            }
            ErrorKind::Base64(_) => Self::Malformed("a part is not valid base64url".to_owned()),
            ErrorKind::Utf8(_) => Self::Malformed("a part is not UTF-8".to_owned()),
            ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm | ErrorKind::InvalidAlgorithmName => {
                Self::Malformed("the signature algorithm is not accepted".to_owned())
            }
            _ => Self::Malformed("the token could not be checked".to_owned()),
        }
    }
}

/// One key of a tenant, ready to verify (and, for HS*, to sign).
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    decoding: DecodingKey,
    /// HS* keys only.
    encoding: Option<EncodingKey>,
    /// Pinned to this key's algorithm, the tenant's issuer and the server's audience.
    validation: Validation,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A key whose validation accepts exactly `algorithm`, `issuer` and `audience`.
    fn new(
        kid: Option<String>,
        algorithm: Algorithm,
        decoding: DecodingKey,
        encoding: Option<EncodingKey>,
        issuer: &str,
        audience: &str,
    ) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        Self { kid, algorithm, decoding, encoding, validation }
    }

    /// An HS* key from its secret bytes.
    fn hmac(kid: Option<String>, algorithm: Algorithm, secret: &[u8], issuer: &str, audience: &str) -> Self {
        Self::new(
            kid,
            algorithm,
            DecodingKey::from_secret(secret),
            Some(EncodingKey::from_secret(secret)),
            issuer,
            audience,
        )
    }

    /// Builds the `index`th key of `tenant`; the error says which key and what to fix.
    fn from_config(tenant: &TenantConfig, index: usize, key: &TenantKeyConfig, audience: &str) -> Result<Self, String> {
        let alg = key.algorithm;
        let at = format!("tenant {:?} key {index} ({alg})", tenant.id);
        let algorithm = jwt_algorithm(alg);
        if alg.is_hmac() {
            let secret = match key.secret_bytes() {
                Some(Ok(secret)) if secret.len() >= MIN_SECRET_BYTES => secret,
                _ => {
                    return Err(format!(
                        "{at}: secret must be base64 of at least {MIN_SECRET_BYTES} bytes: fix the secret"
                    ));
                }
            };
            return Ok(Self::hmac(key.kid.clone(), algorithm, &secret, &tenant.issuer, audience));
        }
        let pem = match (&key.public_key_pem, &key.public_key_file) {
            (Some(pem), None) => pem.clone(),
            (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
                format!("{at}: cannot read public_key_file {}: {e}: check the path and permissions", path.display())
            })?,
            _ => return Err(format!("{at}: give exactly one of public_key_pem and public_key_file")),
        };
        let parsed = match alg {
            KeyAlgorithm::Es256 | KeyAlgorithm::Es384 => DecodingKey::from_ec_pem(pem.as_bytes()),
            KeyAlgorithm::EdDsa => DecodingKey::from_ed_pem(pem.as_bytes()),
            _ => DecodingKey::from_rsa_pem(pem.as_bytes()),
        };
        let what = match alg {
            KeyAlgorithm::Es256 => "a P-256 EC",
            KeyAlgorithm::Es384 => "a P-384 EC",
            KeyAlgorithm::EdDsa => "an Ed25519",
            _ => "an RSA",
        };
        let fix = format!(
            "{at}: the public key is not {what} public key in PEM: give the PEM (-----BEGIN PUBLIC KEY-----) of the key the identity provider signs with, or correct the algorithm"
        );
        let decoding = parsed.map_err(|_| fix.clone())?;
        // The crypto backend parses the key only when verifying: try once so a bad key (or one
        // of another curve) is reported now, not on every sign-in.
        if jsonwebtoken::crypto::verify("AA", b"probe", &decoding, algorithm).is_err() {
            return Err(fix);
        }
        Ok(Self::new(key.kid.clone(), algorithm, decoding, None, &tenant.issuer, audience))
    }
}

/// The `jsonwebtoken` algorithm for a configured one.
const fn jwt_algorithm(alg: KeyAlgorithm) -> Algorithm {
    match alg {
        KeyAlgorithm::Hs256 => Algorithm::HS256,
        KeyAlgorithm::Hs384 => Algorithm::HS384,
        KeyAlgorithm::Hs512 => Algorithm::HS512,
        KeyAlgorithm::Es256 => Algorithm::ES256,
        KeyAlgorithm::Es384 => Algorithm::ES384,
        KeyAlgorithm::EdDsa => Algorithm::EdDSA,
        KeyAlgorithm::Rs256 => Algorithm::RS256,
        KeyAlgorithm::Ps256 => Algorithm::PS256,
    }
}

/// One school: its issuer, keys, limits and retention.
#[derive(Debug)]
pub struct Tenant {
    id: Arc<str>,
    name: String,
    issuer: String,
    limits: TenantLimits,
    retention: TenantRetention,
    keys: Vec<Key>,
}

impl Tenant {
    /// Stable id (the `tenant` claim).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Display name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `iss` its tokens carry.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Its limits.
    pub const fn limits(&self) -> &TenantLimits {
        &self.limits
    }

    /// How long its records are kept.
    pub const fn retention(&self) -> &TenantRetention {
        &self.retention
    }

    /// The principal for claims whose signature and standard claims were verified. Only the
    /// operators' realm gives the operator role, and it gives no other.
    fn principal(&self, claims: Claims) -> Result<Principal, AuthError> {
        if claims.tenant != *self.id {
            return Err(AuthError::TenantMismatch);
        }
        if (claims.role == Role::Operator) != (&*self.id == OPERATOR_REALM) {
            return Err(AuthError::BadClaim("the operator role comes only with the operators' keys, and only it does"));
        }
        check_claims_text(&claims.sub, &claims.name)?;
        Ok(Principal {
            tenant: Arc::clone(&self.id),
            subject: claims.sub,
            role: claims.role,
            name: claims.name,
            expires_at_unix: claims.exp,
        })
    }
}

impl Tenant {
    /// A tenant (or the operators' realm) of `config` with its built `keys`.
    fn realm(config: &TenantConfig, keys: Vec<Key>) -> Self {
        Self {
            id: config.id.as_str().into(),
            name: config.name.clone(),
            issuer: config.issuer.clone(),
            limits: config.limits,
            retention: config.retention,
            keys,
        }
    }
}

/// Checks `sub` (1 to 128 bytes) and `name` (1 to 64 bytes): each is one line without
/// control characters ([`TextKind::Line`]).
fn check_claims_text(sub: &str, name: &str) -> Result<(), AuthError> {
    fn ok(text: &str, max: usize) -> bool {
        (1..=max).contains(&text.len()) && check_text(text, TextKind::Line).is_ok()
    }
    if !ok(sub, MAX_SUB_BYTES) {
        return Err(AuthError::BadClaim("sub must be 1 to 128 bytes on one line without control characters"));
    }
    if !ok(name, MAX_NAME_BYTES) {
        return Err(AuthError::BadClaim("name must be 1 to 64 bytes on one line without control characters"));
    }
    Ok(())
}

/// The only claim read before the signature is checked, to pick the tenant's keys.
#[derive(Deserialize)]
struct UnverifiedTenant {
    tenant: String,
}

/// The configured tenants (or the demo tenant), ready to verify and mint tokens.
#[derive(Debug)]
pub struct Tenants {
    audience: String,
    tenants: Vec<Tenant>,
    /// The server's operators, shaped like a tenant ([`OPERATOR_REALM`]); `None`: nobody may
    /// use the inspector.
    operators: Option<Tenant>,
    demo: bool,
    /// Longest lifetime a token may have, in seconds.
    max_lifetime_secs: u64,
}

impl Tenants {
    /// Builds the tenants of `config`, reading public key files and checking that every key
    /// parses. With no tenants configured, builds the demo tenant, creating its secret in
    /// `config.data_dir` on first use (mode 0600) and reusing it afterwards.
    pub fn new(config: &Config) -> Result<Self, ConfigError> {
        config.validate()?;
        let audience = config.audience.clone();
        let max_lifetime_secs = config.max_token_lifetime_secs;
        let operators = match &config.operators {
            Some(operators) => {
                let realm = operators.as_tenant();
                let keys = realm
                    .keys
                    .iter()
                    .enumerate()
                    .map(|(index, key)| Key::from_config(&realm, index, key, &audience))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(ConfigError::Invalid)?;
                Some(Tenant::realm(&realm, keys))
            }
            None if config.tenants.is_empty() => {
                let secret = load_or_create_demo_secret(&config.data_dir, DEMO_OPERATOR_SECRET_FILE)?;
                let key = Key::hmac(None, Algorithm::HS256, &secret, DEMO_OPERATOR_ISSUER, &audience);
                let realm =
                    crate::config::OperatorsConfig { issuer: DEMO_OPERATOR_ISSUER.to_owned(), keys: Vec::new() };
                Some(Tenant::realm(&realm.as_tenant(), vec![key]))
            }
            None => None,
        };
        if config.tenants.is_empty() {
            let secret = load_or_create_demo_secret(&config.data_dir, DEMO_SECRET_FILE)?;
            let key = Key::hmac(None, Algorithm::HS256, &secret, DEMO_TENANT_ISSUER, &audience);
            let tenant = Tenant {
                id: DEMO_TENANT_ID.into(),
                name: DEMO_TENANT_NAME.to_owned(),
                issuer: DEMO_TENANT_ISSUER.to_owned(),
                limits: TenantLimits::default(),
                retention: TenantRetention::default(),
                keys: vec![key],
            };
            return Ok(Self { audience, tenants: vec![tenant], operators, demo: true, max_lifetime_secs });
        }
        let mut tenants = Vec::with_capacity(config.tenants.len());
        for tenant in &config.tenants {
            let keys = tenant
                .keys
                .iter()
                .enumerate()
                .map(|(index, key)| Key::from_config(tenant, index, key, &audience))
                .collect::<Result<Vec<_>, _>>()
                .map_err(ConfigError::Invalid)?;
            tenants.push(Tenant::realm(tenant, keys));
        }
        Ok(Self { audience, tenants, operators, demo: false, max_lifetime_secs })
    }

    /// The tenant (school) with this id; never the operators' realm.
    pub fn tenant(&self, id: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|tenant| &*tenant.id == id)
    }

    /// The school with this id, or the operators' realm for [`OPERATOR_REALM`].
    fn realm(&self, id: &str) -> Option<&Tenant> {
        if id == OPERATOR_REALM { self.operators.as_ref() } else { self.tenant(id) }
    }

    /// Whether anyone may use the inspector (operators are configured, or the demo's).
    pub const fn has_operators(&self) -> bool {
        self.operators.is_some()
    }

    /// The limits requests of principals of `id` pass: the school's, or the defaults for the
    /// operators' realm.
    pub fn limits_of(&self, id: &str) -> Option<&TenantLimits> {
        self.realm(id).map(Tenant::limits)
    }

    /// Every tenant, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.iter()
    }

    /// Whether this is the embedded demo tenant (no tenants configured).
    pub const fn is_demo(&self) -> bool {
        self.demo
    }

    /// The `aud` tokens must carry.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The longest lifetime a token may have (`max_token_lifetime_secs`).
    pub const fn max_lifetime(&self) -> Duration {
        Duration::from_secs(self.max_lifetime_secs)
    }

    /// Refuses claims whose `iat` is in the future (beyond the leeway) or whose `exp` lies
    /// further than the maximum lifetime from `iat` or from `now`. Saturating throughout, so
    /// no `exp` or `iat` overflows anything.
    fn check_lifetime(&self, claims: &Claims, now: u64) -> Result<(), AuthError> {
        let max = self.max_lifetime_secs;
        if let Some(iat) = claims.iat {
            if iat > now.saturating_add(LEEWAY_SECS) {
                return Err(AuthError::IssuedInFuture);
            }
            if claims.exp.saturating_sub(iat) > max {
                return Err(AuthError::TooLongLived(max));
            }
        }
        if claims.exp.saturating_sub(now) > max.saturating_add(LEEWAY_SECS) {
            return Err(AuthError::TooLongLived(max));
        }
        Ok(())
    }

    /// Verifies `token` and says whom it speaks for.
    ///
    /// The header's algorithm must be accepted; the unverified `tenant` claim only picks the
    /// keys to try (those with the header's algorithm, and its `kid` if it names one); then the
    /// signature, `exp`/`nbf`/`iat` (5 s leeway), the lifetime, `aud`, `iss` and the Downbeat
    /// claims are checked.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed(format!("the token is longer than {MAX_TOKEN_BYTES} bytes")));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) => {
                AuthError::Malformed("the header is not valid or names an algorithm that is not accepted".to_owned())
            }
            _ => AuthError::from_jwt(&e),
        })?;
        if !ACCEPTED_ALGORITHMS.contains(&header.alg) {
            return Err(AuthError::Malformed(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let unverified =
            jsonwebtoken::dangerous::insecure_decode::<UnverifiedTenant>(token).map_err(|e| match e.kind() {
                ErrorKind::Json(_) => AuthError::Malformed("the `tenant` claim is missing or not a string".to_owned()),
                _ => AuthError::from_jwt(&e),
            })?;
        let tenant = self.realm(&unverified.claims.tenant).ok_or(AuthError::UnknownTenant(unverified.claims.tenant))?;
        let mut algorithm_known = false;
        for key in tenant.keys.iter().filter(|key| key.algorithm == header.alg) {
            algorithm_known = true;
            if let Some(kid) = &header.kid
                && key.kid.as_ref() != Some(kid)
            {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, &key.decoding, &key.validation) {
                Ok(data) => {
                    self.check_lifetime(&data.claims, unix_now())?;
                    return tenant.principal(data.claims);
                }
                // Another key of the same algorithm may have signed it (key rotation).
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {}
                // The signature verified; a claim is wrong.
                Err(e) => return Err(AuthError::from_jwt(&e)),
            }
        }
        if algorithm_known {
            Err(AuthError::BadSignature)
        } else {
            Err(AuthError::Malformed(format!("the tenant accepts no {:?} tokens", header.alg)))
        }
    }

    /// Mints a token for `sub` in `tenant`, valid for `ttl` (whole seconds, at least one and at
    /// most [`Self::max_lifetime`]), signed with the tenant's first HS* key (the demo tenant
    /// has one).
    pub fn mint(&self, tenant: &str, role: Role, sub: &str, name: &str, ttl: Duration) -> Result<String, AuthError> {
        let found = self.realm(tenant).ok_or_else(|| AuthError::UnknownTenant(tenant.to_owned()))?;
        check_claims_text(sub, name)?;
        if ttl.as_secs() == 0 {
            return Err(AuthError::CannotMint("the lifetime must be at least one second".to_owned()));
        }
        if ttl.as_secs() > self.max_lifetime_secs {
            return Err(AuthError::CannotMint(format!(
                "the lifetime is longer than max_token_lifetime_secs ({} s)",
                self.max_lifetime_secs
            )));
        }
        let now = unix_now();
        let claims = Claims {
            iss: found.issuer.clone(),
            aud: self.audience.clone(),
            exp: now.saturating_add(ttl.as_secs()),
            iat: Some(now),
            nbf: None,
            sub: sub.to_owned(),
            tenant: found.id.to_string(),
            role,
            name: name.to_owned(),
        };
        self.mint_claims(tenant, &claims)
    }

    /// Signs `claims` exactly as given (nothing is checked, so tests can make expired or
    /// otherwise wrong tokens) with `tenant`'s first HS* key.
    pub fn mint_claims(&self, tenant: &str, claims: &Claims) -> Result<String, AuthError> {
        let found = self.realm(tenant).ok_or_else(|| AuthError::UnknownTenant(tenant.to_owned()))?;
        let Some((key, encoding)) = found.keys.iter().find_map(|key| key.encoding.as_ref().map(|enc| (key, enc)))
        else {
            return Err(AuthError::CannotMint(format!(
                "tenant {tenant:?} has only public keys: its tokens come from its identity provider (add an HS256 key to mint here)"
            )));
        };
        let mut header = Header::new(key.algorithm);
        header.kid.clone_from(&key.kid);
        jsonwebtoken::encode(&header, claims, encoding)
            .map_err(|e| AuthError::CannotMint(format!("signing failed: {e}")))
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads a demo secret (the demo tenant's, the demo operators') from `file` in `dir`, or
/// creates it (32 random bytes, base64url, mode 0600 on Unix) if there is none yet.
fn load_or_create_demo_secret(dir: &Path, file: &str) -> Result<Vec<u8>, ConfigError> {
    let path = dir.join(file);
    let fail = |source: io::Error| ConfigError::DemoSecret { path: path.clone(), source };
    let read = || -> Result<Vec<u8>, ConfigError> {
        let text = std::fs::read_to_string(&path).map_err(fail)?;
        warn_if_readable_by_others(&path);
        match decode_secret(&text) {
            Ok(secret) if secret.len() >= MIN_SECRET_BYTES => Ok(secret),
            _ => Err(fail(io::Error::new(
                io::ErrorKind::InvalidData,
                "the file does not hold base64 of at least 32 bytes; delete it to make a new secret (tokens minted with the old one stop working)",
            ))),
        }
    };
    if path.exists() {
        return read();
    }
    crate::private::private_dir(dir).map_err(fail)?;
    let mut secret = vec![0_u8; MIN_SECRET_BYTES];
    rand::rng().fill_bytes(&mut secret);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(&path) {
        Ok(mut file) => {
            writeln!(file, "{}", URL_SAFE_NO_PAD.encode(&secret)).and_then(|()| file.sync_all()).map_err(fail)?;
            Ok(secret)
        }
        // Another server on the same data directory made it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read(),
        Err(e) => Err(fail(e)),
    }
}

/// Logs a warning if the secret file can be read by others than its owner.
fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %path.display(), "the demo tenant secret is readable by others: chmod 600 it");
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::engine::general_purpose::STANDARD;

    const SECRET_A: &[u8; 32] = b"tenant-a-secret-0123456789abcdef";
    const SECRET_B: &[u8; 32] = b"tenant-b-secret-0123456789abcdef";
    const HOUR: Duration = Duration::from_secs(3600);

    fn hs_key(secret: &[u8], kid: Option<&str>) -> TenantKeyConfig {
        TenantKeyConfig {
            kid: kid.map(str::to_owned),
            algorithm: KeyAlgorithm::Hs256,
            secret: Some(STANDARD.encode(secret)),
            public_key_pem: None,
            public_key_file: None,
        }
    }

    fn public_key(algorithm: KeyAlgorithm, pem: String) -> TenantKeyConfig {
        TenantKeyConfig { kid: None, algorithm, secret: None, public_key_pem: Some(pem), public_key_file: None }
    }

    fn tenant(id: &str, keys: Vec<TenantKeyConfig>) -> TenantConfig {
        TenantConfig {
            id: id.to_owned(),
            name: format!("School {id}"),
            issuer: format!("https://sso.{id}.example"),
            keys,
            limits: TenantLimits::default(),
            retention: TenantRetention::default(),
        }
    }

    fn tenants(list: Vec<TenantConfig>) -> Tenants {
        Tenants::new(&Config { tenants: list, ..Config::default() }).unwrap()
    }

    /// Tenants "a" and "b", each with its own HS256 secret.
    fn two_schools() -> Tenants {
        tenants(vec![tenant("a", vec![hs_key(SECRET_A, None)]), tenant("b", vec![hs_key(SECRET_B, None)])])
    }

    /// Good claims for tenant "a", expiring in an hour.
    fn claims_for_a(role: Role) -> Claims {
        let now = unix_now();
        Claims {
            iss: "https://sso.a.example".to_owned(),
            aud: "downbeat".to_owned(),
            exp: now + 3600,
            iat: Some(now),
            nbf: None,
            sub: "u-17".to_owned(),
            tenant: "a".to_owned(),
            role,
            name: "Ada".to_owned(),
        }
    }

    /// Signs any JSON payload with `header` and `secret`.
    fn sign_json(alg: Algorithm, payload: &serde_json::Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(&Header::new(alg), payload, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[track_caller]
    fn refused(tenants: &Tenants, token: &str, want: &AuthError, code: ErrorCode) {
        let err = tenants.verify(token).unwrap_err();
        assert_eq!(&err, want, "{err}");
        assert_eq!(err.code(), code);
    }

    #[track_caller]
    fn refused_as_malformed(tenants: &Tenants, token: &str) -> String {
        let err = tenants.verify(token).unwrap_err();
        assert!(matches!(err, AuthError::Malformed(_)), "{err:?}");
        assert_eq!(err.code(), ErrorCode::Unauthorized);
        err.to_string()
    }

    #[test]
    fn teacher_and_student_tokens_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let tenants = Tenants::new(&Config { data_dir: dir.path().to_owned(), ..Config::default() }).unwrap();
        assert!(tenants.is_demo());
        let demo = tenants.tenant(DEMO_TENANT_ID).unwrap();
        assert_eq!((demo.name(), demo.issuer()), (DEMO_TENANT_NAME, DEMO_TENANT_ISSUER));
        assert_eq!(demo.limits(), &TenantLimits::default());
        assert_eq!(demo.retention().sel_days, 365);
        assert_eq!(tenants.iter().count(), 1);
        for (role, sub, name) in [(Role::Teacher, "t-1", "Ms. Rivera"), (Role::Student, "s-42", "Sam")] {
            let token = tenants.mint(DEMO_TENANT_ID, role, sub, name, HOUR).unwrap();
            let principal = tenants.verify(&token).unwrap();
            assert_eq!(&*principal.tenant, DEMO_TENANT_ID);
            assert_eq!((principal.role, principal.subject.as_str(), principal.name.as_str()), (role, sub, name));
            let expires_in = principal.expires_at_unix - unix_now();
            assert!((3590..=3600).contains(&expires_in), "{expires_in}");
        }
    }

    #[test]
    fn a_signature_with_another_secret_is_refused() {
        let real = two_schools();
        let forger = tenants(vec![tenant("a", vec![hs_key(b"not-the-real-secret-of-school-a!", None)])]);
        let token = forger.mint("a", Role::Teacher, "u-1", "Eve", HOUR).unwrap();
        refused(&real, &token, &AuthError::BadSignature, ErrorCode::Unauthorized);
    }

    #[test]
    fn alg_none_is_refused() {
        let tenants = two_schools();
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims_for_a(Role::Teacher)).unwrap());
        let message = refused_as_malformed(&tenants, &format!("{header}.{payload}."));
        assert!(message.contains("algorithm"), "{message}");
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let tenants = two_schools();
        let claims = Claims { exp: unix_now() - 3600, ..claims_for_a(Role::Student) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        refused(&tenants, &token, &AuthError::Expired, ErrorCode::TokenExpired);
    }

    #[test]
    fn expiry_within_the_leeway_is_accepted() {
        let tenants = two_schools();
        let claims = Claims { exp: unix_now() - 2, ..claims_for_a(Role::Student) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        assert_eq!(tenants.verify(&token).unwrap().subject, "u-17");
    }

    #[test]
    fn a_token_living_longer_than_the_maximum_is_refused() {
        let tenants = two_schools();
        let (now, day) = (unix_now(), 86_400);
        let too_long = [
            // Both exp - iat and exp - now are over a day.
            Claims { exp: now + day + 60, ..claims_for_a(Role::Student) },
            // Issued an hour ago for a day and a bit: exp - now is under a day, exp - iat is not.
            Claims { iat: Some(now - 3600), exp: now + day - 600, ..claims_for_a(Role::Student) },
            // No iat: exp - now alone decides.
            Claims { iat: None, exp: now + day + 60, ..claims_for_a(Role::Student) },
            // As far as the claim goes: refused, and nothing overflows.
            Claims { exp: u64::MAX, ..claims_for_a(Role::Student) },
            Claims { iat: Some(0), exp: u64::MAX, ..claims_for_a(Role::Student) },
        ];
        for claims in &too_long {
            let token = tenants.mint_claims("a", claims).unwrap();
            refused(&tenants, &token, &AuthError::TooLongLived(day), ErrorCode::Unauthorized);
        }
        let message = AuthError::TooLongLived(day).to_string();
        assert!(message.contains("at most 86400 s") && message.contains("shorter-lived"), "{message}");
        // Exactly the maximum is accepted, with or without iat.
        for iat in [Some(now), None] {
            let token = tenants.mint_claims("a", &Claims { iat, exp: now + day, ..claims_for_a(Role::Student) });
            assert_eq!(tenants.verify(&token.unwrap()).unwrap().expires_at_unix, now + day);
        }
    }

    #[test]
    fn the_maximum_lifetime_is_a_setting_and_bounds_minting() {
        let config = Config {
            tenants: vec![tenant("a", vec![hs_key(SECRET_A, None)])],
            max_token_lifetime_secs: 3600,
            ..Config::default()
        };
        let tenants = Tenants::new(&config).unwrap();
        assert_eq!(tenants.max_lifetime(), HOUR);
        let token = tenants.mint("a", Role::Student, "u-1", "Ada", HOUR).unwrap();
        assert!(tenants.verify(&token).is_ok());
        let err = tenants.mint("a", Role::Student, "u-1", "Ada", 2 * HOUR).unwrap_err();
        assert!(matches!(&err, AuthError::CannotMint(m) if m.contains("max_token_lifetime_secs")), "{err}");
        let long = two_schools().mint("a", Role::Student, "u-1", "Ada", 2 * HOUR).unwrap();
        refused(&tenants, &long, &AuthError::TooLongLived(3600), ErrorCode::Unauthorized);
    }

    #[test]
    fn a_token_issued_in_the_future_is_refused() {
        let tenants = two_schools();
        let now = unix_now();
        let claims = Claims { iat: Some(now + 600), exp: now + 3600, ..claims_for_a(Role::Teacher) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        refused(&tenants, &token, &AuthError::IssuedInFuture, ErrorCode::Unauthorized);
        // Within the leeway (clock skew between issuers) it is accepted.
        let claims = Claims { iat: Some(now + 3), ..claims };
        assert!(tenants.verify(&tenants.mint_claims("a", &claims).unwrap()).is_ok());
    }

    #[test]
    fn a_token_without_exp_is_refused() {
        let tenants = two_schools();
        let mut payload = serde_json::to_value(claims_for_a(Role::Teacher)).unwrap();
        payload.as_object_mut().unwrap().remove("exp");
        let message = refused_as_malformed(&tenants, &sign_json(Algorithm::HS256, &payload, SECRET_A));
        assert!(message.contains("exp"), "{message}");
    }

    #[test]
    fn a_token_for_another_audience_is_refused() {
        let tenants = two_schools();
        let claims = Claims { aud: "another-app".to_owned(), ..claims_for_a(Role::Teacher) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        refused(&tenants, &token, &AuthError::WrongAudience, ErrorCode::Unauthorized);
    }

    #[test]
    fn a_token_from_another_issuer_is_refused() {
        let tenants = two_schools();
        let claims = Claims { iss: "https://sso.b.example".to_owned(), ..claims_for_a(Role::Teacher) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        refused(&tenants, &token, &AuthError::WrongIssuer, ErrorCode::Unauthorized);
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let tenants = two_schools();
        let claims = Claims { nbf: Some(unix_now() + 600), ..claims_for_a(Role::Teacher) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        refused(&tenants, &token, &AuthError::NotYetValid, ErrorCode::Unauthorized);
    }

    #[test]
    fn an_unknown_tenant_is_refused() {
        let tenants = two_schools();
        let claims = Claims { tenant: "zeta".to_owned(), ..claims_for_a(Role::Teacher) };
        let token = sign_json(Algorithm::HS256, &serde_json::to_value(claims).unwrap(), SECRET_A);
        refused(&tenants, &token, &AuthError::UnknownTenant("zeta".to_owned()), ErrorCode::Unauthorized);
        assert_eq!(
            tenants.mint("zeta", Role::Teacher, "u", "n", HOUR),
            Err(AuthError::UnknownTenant("zeta".to_owned()))
        );
    }

    #[test]
    fn a_token_signed_by_one_tenant_claiming_another_is_refused() {
        let tenants = two_schools();
        let claims =
            Claims { tenant: "b".to_owned(), iss: "https://sso.b.example".to_owned(), ..claims_for_a(Role::Teacher) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        refused(&tenants, &token, &AuthError::BadSignature, ErrorCode::Unauthorized);
    }

    #[test]
    fn an_edited_role_breaks_the_signature() {
        let tenants = two_schools();
        let token = tenants.mint("a", Role::Student, "u-9", "Kim", HOUR).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(payload["role"], "student");
        payload["role"] = "teacher".into();
        let edited = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap());
        let forged = format!("{}.{edited}.{}", parts[0], parts[2]);
        refused(&tenants, &forged, &AuthError::BadSignature, ErrorCode::Unauthorized);
    }

    /// An Ed25519 key pair: (private PKCS#8 PEM, public SPKI PEM).
    fn key_pair(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let pair = rcgen::KeyPair::generate_for(alg).unwrap();
        (pair.serialize_pem(), pair.public_key_pem())
    }

    #[test]
    fn an_hmac_token_for_a_public_key_tenant_is_refused() {
        let (_, public_pem) = key_pair(&rcgen::PKCS_ED25519);
        let tenants = tenants(vec![tenant("a", vec![public_key(KeyAlgorithm::EdDsa, public_pem.clone())])]);
        // The classic confusion: the public key, known to all, used as an HMAC secret.
        let payload = serde_json::to_value(claims_for_a(Role::Teacher)).unwrap();
        let token = sign_json(Algorithm::HS256, &payload, public_pem.as_bytes());
        let message = refused_as_malformed(&tenants, &token);
        assert!(message.contains("accepts no HS256"), "{message}");
    }

    #[test]
    fn public_key_tenants_verify_tokens_signed_by_their_private_keys() {
        let cases = [
            (&rcgen::PKCS_ED25519, KeyAlgorithm::EdDsa, Algorithm::EdDSA),
            (&rcgen::PKCS_ECDSA_P256_SHA256, KeyAlgorithm::Es256, Algorithm::ES256),
        ];
        for (rcgen_alg, alg, jwt_alg) in cases {
            let (private_pem, public_pem) = key_pair(rcgen_alg);
            let tenants = tenants(vec![tenant("a", vec![public_key(alg, public_pem)])]);
            let signing = match alg {
                KeyAlgorithm::EdDsa => EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
                _ => EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
            };
            let token = jsonwebtoken::encode(&Header::new(jwt_alg), &claims_for_a(Role::Teacher), &signing).unwrap();
            let principal = tenants.verify(&token).unwrap();
            assert_eq!((&*principal.tenant, principal.role), ("a", Role::Teacher), "{alg}");
            // Another key pair of the same kind does not verify.
            let (other_pem, _) = key_pair(rcgen_alg);
            let other = match alg {
                KeyAlgorithm::EdDsa => EncodingKey::from_ed_pem(other_pem.as_bytes()).unwrap(),
                _ => EncodingKey::from_ec_pem(other_pem.as_bytes()).unwrap(),
            };
            let forged = jsonwebtoken::encode(&Header::new(jwt_alg), &claims_for_a(Role::Teacher), &other).unwrap();
            refused(&tenants, &forged, &AuthError::BadSignature, ErrorCode::Unauthorized);
            // Minting needs a secret.
            let err = tenants.mint("a", Role::Teacher, "u", "n", HOUR).unwrap_err();
            assert!(matches!(&err, AuthError::CannotMint(m) if m.contains("only public keys")), "{err}");
        }
    }

    #[test]
    fn a_public_key_that_does_not_parse_names_its_tenant_and_key() {
        let (_, ed_pem) = key_pair(&rcgen::PKCS_ED25519);
        let config = Config {
            tenants: vec![tenant("a", vec![hs_key(SECRET_A, None), public_key(KeyAlgorithm::Es256, ed_pem)])],
            ..Config::default()
        };
        let err = Tenants::new(&config).unwrap_err().to_string();
        assert!(err.contains(r#"tenant "a" key 1 (ES256)"#) && err.contains("P-256"), "{err}");
        let missing = TenantKeyConfig {
            public_key_pem: None,
            public_key_file: Some("/nonexistent/key.pem".into()),
            ..public_key(KeyAlgorithm::EdDsa, String::new())
        };
        let config = Config { tenants: vec![tenant("a", vec![missing])], ..Config::default() };
        let err = Tenants::new(&config).unwrap_err().to_string();
        assert!(err.contains(r#"tenant "a" key 0 (EdDSA): cannot read public_key_file"#), "{err}");
    }

    #[test]
    fn a_public_key_file_is_read() {
        let (private_pem, public_pem) = key_pair(&rcgen::PKCS_ED25519);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idp.pem");
        std::fs::write(&path, public_pem).unwrap();
        let key = TenantKeyConfig {
            public_key_pem: None,
            public_key_file: Some(path),
            ..public_key(KeyAlgorithm::EdDsa, String::new())
        };
        let tenants = tenants(vec![tenant("a", vec![key])]);
        let signing = EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap();
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims_for_a(Role::Student), &signing).unwrap();
        assert_eq!(tenants.verify(&token).unwrap().role, Role::Student);
    }

    #[test]
    fn a_kid_in_the_header_picks_the_key() {
        let tenants = tenants(vec![tenant("a", vec![hs_key(SECRET_A, Some("old")), hs_key(SECRET_B, Some("new"))])]);
        let payload = serde_json::to_value(claims_for_a(Role::Teacher)).unwrap();
        let with_kid = |kid: &str, secret: &[u8]| {
            let header = Header { kid: Some(kid.to_owned()), ..Header::new(Algorithm::HS256) };
            jsonwebtoken::encode(&header, &payload, &EncodingKey::from_secret(secret)).unwrap()
        };
        assert!(tenants.verify(&with_kid("new", SECRET_B)).is_ok());
        assert!(tenants.verify(&with_kid("old", SECRET_A)).is_ok());
        refused(&tenants, &with_kid("old", SECRET_B), &AuthError::BadSignature, ErrorCode::Unauthorized);
        refused(&tenants, &with_kid("gone", SECRET_A), &AuthError::BadSignature, ErrorCode::Unauthorized);
        // Without a kid every key of the algorithm is tried (rotation).
        assert!(tenants.verify(&sign_json(Algorithm::HS256, &payload, SECRET_B)).is_ok());
        // Minting uses the first key and names it.
        let token = tenants.mint("a", Role::Student, "u", "n", HOUR).unwrap();
        assert_eq!(jsonwebtoken::decode_header(&token).unwrap().kid.as_deref(), Some("old"));
    }

    #[test]
    fn an_over_long_token_is_refused_unread() {
        let tenants = two_schools();
        let claims = Claims { name: "x".repeat(MAX_TOKEN_BYTES), ..claims_for_a(Role::Teacher) };
        let token = tenants.mint_claims("a", &claims).unwrap();
        let message = refused_as_malformed(&tenants, &token);
        assert!(message.contains("longer than 4096 bytes"), "{message}");
    }

    #[test]
    fn garbage_is_refused() {
        let tenants = two_schools();
        for garbage in ["", "hello", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.%%%.sig", "\u{0}\u{1}"] {
            refused_as_malformed(&tenants, garbage);
        }
    }

    #[test]
    fn bad_sub_and_name_claims_are_refused() {
        let tenants = two_schools();
        for claims in [
            Claims { sub: String::new(), ..claims_for_a(Role::Student) },
            Claims { sub: "s".repeat(129), ..claims_for_a(Role::Student) },
            Claims { name: String::new(), ..claims_for_a(Role::Student) },
            Claims { name: "n".repeat(65), ..claims_for_a(Role::Student) },
            Claims { name: "bell\u{7}".to_owned(), ..claims_for_a(Role::Student) },
        ] {
            let token = tenants.mint_claims("a", &claims).unwrap();
            let err = tenants.verify(&token).unwrap_err();
            assert!(matches!(err, AuthError::BadClaim(_)), "{err:?}");
            assert_eq!(err.code(), ErrorCode::Unauthorized);
        }
        let err = tenants.mint("a", Role::Student, "", "Sam", HOUR).unwrap_err();
        assert!(matches!(err, AuthError::BadClaim(_)), "{err:?}");
        let err = tenants.mint("a", Role::Student, "s", "Sam", Duration::ZERO).unwrap_err();
        assert!(matches!(err, AuthError::CannotMint(_)), "{err:?}");
    }

    #[test]
    fn an_unknown_role_is_malformed() {
        let tenants = two_schools();
        let mut payload = serde_json::to_value(claims_for_a(Role::Teacher)).unwrap();
        payload["role"] = "principal".into();
        refused_as_malformed(&tenants, &sign_json(Algorithm::HS256, &payload, SECRET_A));
    }

    #[test]
    fn only_the_operators_keys_make_operators_and_they_make_nothing_else() {
        const SECRET_OPS: &[u8; 32] = b"operators-secret-0123456789abcde";
        let operators = crate::config::OperatorsConfig {
            issuer: "https://sso.district.example/ops".to_owned(),
            keys: vec![hs_key(SECRET_OPS, None)],
        };
        let config = Config {
            tenants: vec![tenant("a", vec![hs_key(SECRET_A, None)])],
            operators: Some(operators),
            ..Config::default()
        };
        let tenants = Tenants::new(&config).unwrap();
        assert!(tenants.has_operators());
        let token = tenants.mint(OPERATOR_REALM, Role::Operator, "op-1", "Olu", HOUR).unwrap();
        let who = tenants.verify(&token).unwrap();
        assert_eq!((&*who.tenant, who.role, who.subject.as_str()), (OPERATOR_REALM, Role::Operator, "op-1"));
        // The realm is no school: lookups for schools never find it.
        assert!(tenants.tenant(OPERATOR_REALM).is_none());
        assert!(tenants.limits_of(OPERATOR_REALM).is_some());
        // A school's key cannot make an operator...
        let forged = tenants.mint("a", Role::Operator, "t-1", "Eve", HOUR).unwrap();
        assert!(matches!(tenants.verify(&forged), Err(AuthError::BadClaim(_))));
        // ...nor the operators' key a school's role, even naming the realm.
        for role in [Role::Teacher, Role::Student, Role::Admin] {
            let token = tenants.mint(OPERATOR_REALM, role, "op-1", "Olu", HOUR).unwrap();
            assert!(matches!(tenants.verify(&token), Err(AuthError::BadClaim(_))), "{role}");
        }
        // An operator token signed with a school's secret but naming the realm fails its keys.
        let claims = Claims {
            iss: "https://sso.district.example/ops".to_owned(),
            tenant: OPERATOR_REALM.to_owned(),
            ..claims_for_a(Role::Operator)
        };
        let payload = serde_json::to_value(&claims).unwrap();
        refused(
            &tenants,
            &sign_json(Algorithm::HS256, &payload, SECRET_A),
            &AuthError::BadSignature,
            ErrorCode::Unauthorized,
        );
        // Without [operators], configured schools have no operators at all.
        let schools_only = two_schools();
        assert!(!schools_only.has_operators());
        assert_eq!(schools_only.verify(&token).unwrap_err(), AuthError::UnknownTenant(OPERATOR_REALM.to_owned()));
        // A school may not take the realm's id.
        let taken = Config { tenants: vec![tenant(OPERATOR_REALM, vec![hs_key(SECRET_A, None)])], ..Config::default() };
        let err = Tenants::new(&taken).unwrap_err().to_string();
        assert!(err.contains("reserved for the server's operators"), "{err}");
    }

    #[test]
    fn the_demo_has_operators_whose_secret_is_kept_beside_the_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().to_owned(), ..Config::default() };
        let first = Tenants::new(&config).unwrap();
        let token = first.mint(OPERATOR_REALM, Role::Operator, "op-1", "Demo operator", HOUR).unwrap();
        assert!(dir.path().join(DEMO_OPERATOR_SECRET_FILE).exists());
        assert_eq!(Tenants::new(&config).unwrap().verify(&token).unwrap().role, Role::Operator);
        assert_eq!(Role::Operator.as_str(), "operator");
        assert_eq!(Role::Operator.member_role(), None);
    }

    #[test]
    fn the_demo_secret_is_kept_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config { data_dir: dir.path().join("state"), ..Config::default() };
        let first = Tenants::new(&config).unwrap();
        let token = first.mint(DEMO_TENANT_ID, Role::Teacher, "t", "Teacher", HOUR).unwrap();
        let path = config.data_dir.join(DEMO_SECRET_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(decode_secret(&text).unwrap().len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let second = Tenants::new(&config).unwrap();
        assert_eq!(second.verify(&token).unwrap().role, Role::Teacher);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // Another data directory means another secret.
        let other = tempfile::tempdir().unwrap();
        let third = Tenants::new(&Config { data_dir: other.path().to_owned(), ..Config::default() }).unwrap();
        refused(&third, &token, &AuthError::BadSignature, ErrorCode::Unauthorized);
        // A damaged file is reported, not replaced.
        std::fs::write(&path, "short").unwrap();
        let err = Tenants::new(&config).unwrap_err().to_string();
        assert!(err.contains("demo-tenant.secret") && err.contains("delete it"), "{err}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let encoded = STANDARD.encode(SECRET_A);
        let config = Config { tenants: vec![tenant("a", vec![hs_key(SECRET_A, Some("k1"))])], ..Config::default() };
        let tenants = Tenants::new(&config).unwrap();
        for debug in [format!("{config:?}"), format!("{tenants:?}")] {
            assert!(debug.contains("redacted"), "{debug}");
            assert!(!debug.contains(&encoded), "{debug}");
            assert!(!debug.contains("tenant-a-secret"), "{debug}");
            assert!(!debug.contains(&format!("{:?}", SECRET_A.as_slice())), "{debug}");
        }
    }

    #[test]
    fn role_names_are_lowercase() {
        assert_eq!(Role::Teacher.member_role(), Some(downbeat_protocol::Role::Teacher));
        assert_eq!(Role::Admin.member_role(), None);
        assert_eq!(serde_json::from_str::<Role>(r#""admin""#).unwrap(), Role::Admin);
        assert_eq!(Role::from(downbeat_protocol::Role::Student), Role::Student);
        assert_eq!(Role::Teacher.as_str(), "teacher");
        assert_eq!(serde_json::to_string(&Role::Student).unwrap(), r#""student""#);
        assert_eq!(serde_json::from_str::<Role>(r#""teacher""#).unwrap(), Role::Teacher);
    }
}
