//! JWTs as credentials (Kubernetes projected service-account tokens work this way):
//! RS256 or ES256 tokens verified against a JWKS file (signature, `exp` and `nbf` with
//! `--auth-jwt-leeway`, `aud`, `iss`); the tenant is the one whose `subjects` lists the token's `sub`.
//!
//! A verified token is remembered (by its SHA-256) until it expires, so a client that
//! sends the same token on every call pays for the signature once, as Envoy's jwt_authn
//! cache does. The memory belongs to the keys that verified them, so a JWKS reload starts
//! with none.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use jsonwebtoken::{decode, decode_header, errors::ErrorKind, jwk::JwkSet, Algorithm, Validation};

use crate::watch::Reloadable;

/// Verified tokens remembered at most (beyond it the memory starts over).
const CACHE_MAX: usize = 4096;

/// The JWKS, and the tokens it verified: SHA-256 of the token → (subject, exp).
#[derive(Debug)]
struct Keys {
    set: JwkSet,
    verified: Mutex<HashMap<[u8; 32], (String, u64)>>,
}

#[derive(Debug)]
pub struct Jwt {
    path: PathBuf,
    keys: Arc<Reloadable<Keys>>,
    audience: String,
    issuer: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    leeway: u64,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// Seconds since the Unix epoch, as `exp` and `nbf` count them.
pub(super) fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read(path: &std::path::Path) -> Result<Keys, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let set = serde_json::from_str(&text).map_err(|e| format!("not a JWKS: {e}"))?;
    Ok(Keys {
        set,
        verified: Mutex::default(),
    })
}

impl Jwt {
    pub fn load(
        path: PathBuf,
        audience: String,
        issuer: String,
        leeway: u64,
    ) -> Result<Self, String> {
        let keys = read(&path).map_err(|e| format!("--auth-jwks {}: {e}", path.display()))?;
        Ok(Self {
            path,
            keys: Reloadable::new(keys),
            audience,
            issuer,
            leeway,
        })
    }

    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// Reloads of the JWKS so far.
    pub fn generation(&self) -> u64 {
        self.keys.generation()
    }

    pub fn watched(&self) -> crate::watch::Watched {
        let path = self.path.clone();
        self.keys
            .watched("auth-jwks", vec![self.path.clone()], move || read(&path))
    }

    /// The token's subject and `exp`, or why it is not a valid token (for
    /// UNAUTHENTICATED; it never names the audience or issuer expected).
    pub fn subject(&self, token: &str) -> Result<(String, u64), String> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let id: [u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
        let keys = self.keys.get();
        if let Some((sub, exp)) = keys.verified.lock().expect("jwt cache lock").get(&id) {
            if now_s() <= exp.saturating_add(self.leeway) {
                return Ok((sub.clone(), *exp));
            }
        }
        let claims = self.verify(token, &keys.set)?;
        let mut cache = keys.verified.lock().expect("jwt cache lock");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(id, (claims.sub.clone(), claims.exp));
        Ok((claims.sub, claims.exp))
    }

    fn verify(&self, token: &str, keys: &JwkSet) -> Result<Claims, String> {
        let header = decode_header(token).map_err(|e| format!("JWT: {e}"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(format!(
                "JWT: expected alg RS256 or ES256, got {:?}",
                header.alg
            ));
        }
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        }
        .ok_or("JWT: no key in the JWKS matches its kid")?;
        let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| format!("JWT: {e}"))?;
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        let data = decode::<Claims>(token, &key, &v).map_err(|e| {
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "expired".to_string(),
                ErrorKind::ImmatureSignature => "not valid yet (nbf)".into(),
                // The expected values are the server's configuration, not for strangers.
                ErrorKind::InvalidAudience => "wrong audience".to_string(),
                ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
                ErrorKind::InvalidSignature => "bad signature".into(),
                ErrorKind::MissingRequiredClaim(c) => format!("no '{c}' claim"),
                other => format!("{other:?}"),
            };
            format!("JWT: {why}")
        })?;
        Ok(data.claims)
    }
}
