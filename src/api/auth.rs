//! API keys: who may call what, and how often.
//!
//! Keys come from `[auth] api_keys` (and `DSPO_AUTH_API_KEYS`) and from `auth.api_keys_file`.
//! Only SHA-256 digests are kept in memory; a presented key is hashed and compared with every
//! stored digest in constant time, so neither timing nor an early exit tells how close a guess
//! was. Each key has a scope: `all`, or `generate` (inference and the read-only listings it
//! needs). The caller's identity travels to handlers as a request extension ([`Caller`]), which
//! is what job ownership and per-key job limits are keyed on.

use super::error::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use std::num::NonZeroU32;
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    All,
    /// Inference only: POST /generate and /edit, GET /models and /adapters.
    Generate,
}

/// Who is calling, as handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// A stable, non-secret name of the key (the first 12 hex digits of its SHA-256); None when
    /// the server has no keys, where every caller is the same anonymous one.
    pub key_id: Option<String>,
    pub scope: Scope,
}

impl Caller {
    /// The caller of a server without keys.
    pub fn anonymous() -> Self {
        Self {
            key_id: None,
            scope: Scope::All,
        }
    }

    /// Whether this caller may see a job or adapter recorded with `owner`: always without
    /// keys; with keys, records made without a key (before keys were configured) are
    /// everyone's, the others their owner's.
    pub fn owns(&self, owner: Option<&str>) -> bool {
        match (&self.key_id, owner) {
            (None, _) | (_, None) => true,
            (Some(me), Some(o)) => me == o,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("auth.api_keys_file {0}: {1}")]
    File(String, String),
    #[error("auth key entry {0}: {1}")]
    Entry(String, String),
}

struct Key {
    digest: [u8; 32],
    scope: Scope,
}

/// The configured keys and the per-key request limiter.
pub struct KeyRing {
    keys: Vec<Key>,
    protect_docs: bool,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn key_id(digest: &[u8; 32]) -> String {
    hex::encode(&digest[..6])
}

/// Shows where an entry came from without printing its secret.
fn redact(entry: &str) -> String {
    let head: String = entry.chars().take(4).collect();
    format!("'{head}…'")
}

fn parse_entry(entry: &str) -> Result<Key, AuthConfigError> {
    let (secret, scope) = match entry.rsplit_once(':') {
        Some((k, "generate")) => (k, Scope::Generate),
        Some((k, "all")) => (k, Scope::All),
        // "sha256:<hex>" alone: a digest with every scope.
        Some(("sha256", _)) => (entry, Scope::All),
        Some((_, other)) => {
            return Err(AuthConfigError::Entry(
                redact(entry),
                format!("unknown scope '{other}' (all or generate)"),
            ))
        }
        None => (entry, Scope::All),
    };
    let digest = match secret.strip_prefix("sha256:") {
        Some(hex_digest) => {
            let bytes = hex::decode(hex_digest).ok().filter(|b| b.len() == 32).ok_or_else(|| {
                AuthConfigError::Entry(redact(entry), "sha256: needs 64 hex digits".into())
            })?;
            bytes.try_into().expect("32 bytes")
        }
        None => {
            if secret.len() < 16 || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(AuthConfigError::Entry(
                    redact(entry),
                    "a key needs at least 16 characters and no whitespace".into(),
                ));
            }
            digest(secret)
        }
    };
    Ok(Key { digest, scope })
}

impl KeyRing {
    pub fn from_config(auth: &crate::config::AuthSection) -> Result<Self, AuthConfigError> {
        let mut entries: Vec<String> = auth.api_keys.iter().map(|s| s.trim().to_string()).collect();
        if !auth.api_keys_file.is_empty() {
            let text = std::fs::read_to_string(&auth.api_keys_file)
                .map_err(|e| AuthConfigError::File(auth.api_keys_file.clone(), e.to_string()))?;
            entries.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        let keys = entries
            .iter()
            .filter(|e| !e.is_empty())
            .map(|e| parse_entry(e))
            .collect::<Result<Vec<_>, _>>()?;
        let limiter = NonZeroU32::new(auth.requests_per_minute)
            .map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        Ok(Self {
            keys,
            protect_docs: auth.protect_docs,
            limiter,
        })
    }

    /// Whether any key is configured (otherwise every request is the anonymous caller's).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key a bearer token names, compared with every stored digest in constant time.
    fn lookup(&self, token: &str) -> Option<(String, Scope)> {
        let d = digest(token);
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&d)) {
                found = Some((key_id(&k.digest), k.scope));
            }
        }
        found
    }
}

/// What a route needs.
#[derive(Debug, PartialEq, Eq)]
enum Needs {
    Nothing,
    Scope(Scope),
}

fn needs(method: &Method, path: &str, protect_docs: bool) -> Needs {
    // The web UI's files are public like the docs: a browser cannot send a key for the page
    // itself, and the key typed into it goes with every API call the page makes.
    let docs = path == "/openapi.json"
        || path == "/docs"
        || path.starts_with("/docs/")
        || path == "/"
        || path.starts_with("/ui/");
    match (method, path) {
        (_, "/health" | "/ready") => Needs::Nothing,
        _ if docs && !protect_docs => Needs::Nothing,
        (
            &Method::POST,
            "/generate" | "/edit" | "/v1/images/generations" | "/v1/images/edits"
            | "/sdapi/v1/txt2img" | "/sdapi/v1/img2img" | "/sdapi/v1/interrupt",
        )
        | (
            &Method::GET,
            "/models" | "/adapters" | "/metrics" | "/sdapi/v1/samplers" | "/sdapi/v1/sd-models"
            | "/sdapi/v1/loras" | "/sdapi/v1/progress" | "/generations" | "/evaluate/rewards",
        ) => {
            Needs::Scope(Scope::Generate)
        }
        // A generation's progress and cancel: the registry shows a key only its own.
        (&Method::GET | &Method::POST, p) if p.starts_with("/generations/") => {
            Needs::Scope(Scope::Generate)
        }
        _ if docs => Needs::Scope(Scope::Generate),
        _ => Needs::Scope(Scope::All),
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The middleware: 401 without a valid key, 403 for a key without the route's scope, 429 past
/// the key's request rate; otherwise the request goes on with its [`Caller`] attached.
pub async fn require_key(State(ring): State<Arc<KeyRing>>, mut req: Request, next: Next) -> Response {
    if !ring.enabled() {
        req.extensions_mut().insert(Caller::anonymous());
        return next.run(req).await;
    }
    let needed = needs(req.method(), req.uri().path(), ring.protect_docs);
    let found = bearer(&req).and_then(|t| ring.lookup(t));
    let caller = match (&needed, found) {
        (Needs::Nothing, found) => match found {
            Some((id, scope)) => Caller { key_id: Some(id), scope },
            None => Caller::anonymous(),
        },
        (Needs::Scope(_), None) => {
            let why = if bearer(&req).is_some() {
                "the API key is not valid"
            } else {
                "this server needs an API key: send Authorization: Bearer <key>"
            };
            return ApiError::Unauthorized(why.into()).into_response();
        }
        (Needs::Scope(s), Some((id, scope))) => {
            if *s == Scope::All && scope != Scope::All {
                return ApiError::Forbidden(format!(
                    "this key may only run inference (POST /generate, POST /edit, GET /models, \
                     GET /adapters), not {} {}",
                    req.method(),
                    req.uri().path()
                ))
                .into_response();
            }
            Caller { key_id: Some(id), scope }
        }
    };
    if let (Some(limiter), Some(id)) = (&ring.limiter, &caller.key_id) {
        if let Err(not_until) = limiter.check_key(id) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            return ApiError::RateLimited {
                message: "this key has used its requests for the minute (auth.requests_per_minute)".into(),
                retry_after_s: wait.as_secs().max(1),
            }
            .into_response();
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&str]) -> KeyRing {
        let auth = crate::config::AuthSection {
            api_keys: keys.iter().map(|s| s.to_string()).collect(),
            api_keys_file: String::new(),
            protect_docs: false,
            requests_per_minute: 0,
            max_active_jobs_per_key: 0,
        };
        KeyRing::from_config(&auth).unwrap()
    }

    #[test]
    fn entries_parse_with_scopes_and_digests() {
        let full = "0123456789abcdef-full";
        let gen = "0123456789abcdef-gen";
        let hashed = "0123456789abcdef-hashed";
        let r = ring(&[full, &format!("{gen}:generate"), &format!("sha256:{}", hex::encode(digest(hashed)))]);
        assert_eq!(r.lookup(full).unwrap().1, Scope::All);
        assert_eq!(r.lookup(gen).unwrap().1, Scope::Generate);
        assert_eq!(r.lookup(hashed).unwrap().1, Scope::All);
        assert!(r.lookup("0123456789abcdef").is_none());
        assert_ne!(r.lookup(full).unwrap().0, r.lookup(gen).unwrap().0);
    }

    #[test]
    fn bad_entries_are_refused_without_echoing_the_secret() {
        for bad in ["short", "0123456789abcdef:admin", "sha256:abcd"] {
            let auth = crate::config::AuthSection {
                api_keys: vec![bad.into()],
                api_keys_file: String::new(),
                protect_docs: false,
                requests_per_minute: 0,
                max_active_jobs_per_key: 0,
            };
            let e = KeyRing::from_config(&auth).err().unwrap().to_string();
            assert!(!e.contains(bad), "{e}");
        }
    }

    #[test]
    fn routes_need_the_expected_scope() {
        use Needs::*;
        assert_eq!(needs(&Method::GET, "/health", false), Nothing);
        assert_eq!(needs(&Method::GET, "/openapi.json", false), Nothing);
        assert_eq!(needs(&Method::GET, "/openapi.json", true), Scope(super::Scope::Generate));
        assert_eq!(needs(&Method::GET, "/", false), Nothing);
        assert_eq!(needs(&Method::GET, "/ui/app.js", false), Nothing);
        assert_eq!(needs(&Method::GET, "/ui/app.js", true), Scope(super::Scope::Generate));
        assert_eq!(needs(&Method::POST, "/generate", false), Scope(super::Scope::Generate));
        assert_eq!(needs(&Method::GET, "/adapters", false), Scope(super::Scope::Generate));
        assert_eq!(needs(&Method::GET, "/adapters/x/weights", false), Scope(super::Scope::All));
        assert_eq!(needs(&Method::POST, "/finetune", false), Scope(super::Scope::All));
        assert_eq!(needs(&Method::DELETE, "/adapters/x", false), Scope(super::Scope::All));
    }
}
