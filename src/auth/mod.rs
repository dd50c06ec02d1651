//! JWT verification (and minting, for `fanout token` and dev mode).
//!
//! Exactly one algorithm is accepted, the configured one: a token whose header names any
//! other (`none`, HS256 against an RSA key, ...) is rejected before its signature is looked
//! at. Rejection reasons are detailed for logs and metrics, but clients only ever see the
//! two messages of the existing contract, so a probe learns nothing about why.

pub mod jwks;

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::ops::metrics;
use crate::protocol::{InvalidId, OrgId, UserId};
use jwks::{Jwks, JwksConfig};

/// The verified identity of a connection. The organization comes from here and nowhere else.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub org: OrgId,
    pub user: UserId,
    pub role: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The claims as the token carried them, echoed in `auth-success` so that a dashboard
    /// comparing against its own (possibly numeric) ids sees the values it signed.
    pub raw_org: serde_json::Value,
    pub raw_user: serde_json::Value,
}

impl Identity {
    /// When the session ends, in milliseconds since the Unix epoch: `exp` plus `leeway_ms`,
    /// saturating rather than wrapping for an absurdly distant `exp`.
    pub fn expires_at_ms(&self, leeway_ms: u64) -> u64 {
        self.exp.saturating_mul(1000).saturating_add(leeway_ms)
    }
}

/// Why a token was refused. `reason()` is the metric label; `client_message()` is what the
/// client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("bad signature")]
    BadSignature,
    #[error("signed with a key (kid) that JWT_JWKS_URL does not hold")]
    UnknownKey,
    #[error("algorithm not accepted (only {0:?} is)")]
    WrongAlgorithm(Algorithm),
    #[error("wrong issuer or audience")]
    WrongIssuerOrAudience,
    #[error("claim {claim}: {problem}")]
    BadClaim {
        claim: &'static str,
        problem: String,
    },
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::UnknownKey => "unknown_kid",
            Self::WrongAlgorithm(_) => "wrong_algorithm",
            Self::WrongIssuerOrAudience => "wrong_issuer_or_audience",
            Self::BadClaim { .. } => "bad_claims",
        }
    }

    pub fn client_message(&self) -> &'static str {
        match self {
            Self::Missing => "Authentication required",
            _ => "Invalid or expired token",
        }
    }

    fn claim(claim: &'static str, problem: InvalidId) -> Self {
        Self::BadClaim {
            claim,
            problem: problem.to_string(),
        }
    }
}

/// The key material a verifier checks signatures with.
pub enum VerifyKey {
    /// `JWT_SECRET`, for the HS* algorithms.
    Secret(Vec<u8>),
    /// `JWT_PUBLIC_KEY` as PEM text, for RS*, PS*, ES* and EdDSA.
    PublicPem(String),
    /// `JWT_JWKS_URL`: keys by `kid`, fetched and refreshed (see [`jwks`]).
    Jwks(JwksConfig),
}

/// Where the signature keys come from.
enum Keys {
    /// One key, from the configuration.
    Fixed(DecodingKey),
    /// A JWKS endpoint's, by `kid`.
    Jwks(Arc<Jwks>),
}

/// Verifies tokens with one key and one algorithm (and, for HMAC during a rotation, the
/// previous secret too).
pub struct Verifier {
    keys: Keys,
    /// `JWT_SECRET_PREVIOUS`: tried when a token's signature does not match `key`, so tokens
    /// signed before the backend switched secrets stay valid until they expire.
    previous: Option<DecodingKey>,
    validation: Validation,
    algorithm: Algorithm,
    /// Kept only for HS*, so that dev mode and `fanout token` can mint with the same secret.
    signing: Option<EncodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

/// What the token must contain. Everything else in it is ignored.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(rename = "userId", default)]
    user_id: serde_json::Value,
    #[serde(rename = "organizationId", default)]
    organization_id: serde_json::Value,
    #[serde(default)]
    role: serde_json::Value,
    exp: u64,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    #[serde(rename = "userId")]
    user_id: &'a str,
    #[serde(rename = "organizationId")]
    organization_id: &'a str,
    role: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Settings of a [`Verifier`], as read from the configuration.
pub struct VerifierConfig {
    pub key: VerifyKey,
    pub algorithm: Algorithm,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: u64,
    /// `JWT_SECRET_PREVIOUS`, for HS* only.
    pub previous_secret: Option<Vec<u8>>,
}

/// Why the configured key cannot verify tokens; the message says which setting to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("JWT_SECRET is empty")]
    EmptySecret,
    #[error(
        "JWT_SECRET_PREVIOUS is for rotating an HMAC secret: it needs JWT_SECRET (HS256/HS384/HS512), not JWT_PUBLIC_KEY"
    )]
    PreviousWithoutSecret,
    #[error(
        "JWT_ALGORITHM={0:?} needs JWT_PUBLIC_KEY, not JWT_SECRET (JWT_SECRET is for HS256/HS384/HS512)"
    )]
    SecretForAsymmetric(Algorithm),
    #[error(
        "JWT_ALGORITHM={0:?} is an HMAC algorithm: set JWT_SECRET instead of JWT_PUBLIC_KEY, or choose RS256/ES256/EdDSA"
    )]
    PublicKeyForHmac(Algorithm),
    #[error(
        "JWT_PUBLIC_KEY is not a valid public key for JWT_ALGORITHM={alg:?} ({reason}); expected a PEM block starting with \"-----BEGIN PUBLIC KEY-----\""
    )]
    InvalidPublicKey { alg: Algorithm, reason: String },
    #[error(
        "JWT_ALGORITHM={0:?} is an HMAC algorithm, whose secret a JWKS must not publish: with JWT_JWKS_URL choose RS256/ES256/EdDSA, or use JWT_SECRET"
    )]
    JwksForHmac(Algorithm),
    #[error("JWT_JWKS_URL {0}")]
    JwksUrl(String),
}

impl KeyError {
    /// The setting to fix.
    pub fn setting(&self) -> &'static str {
        match self {
            Self::EmptySecret => "JWT_SECRET",
            Self::PreviousWithoutSecret => "JWT_SECRET_PREVIOUS",
            Self::SecretForAsymmetric(_) | Self::PublicKeyForHmac(_) | Self::JwksForHmac(_) => {
                "JWT_ALGORITHM"
            }
            Self::InvalidPublicKey { .. } => "JWT_PUBLIC_KEY",
            Self::JwksUrl(_) => "JWT_JWKS_URL",
        }
    }
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(
        "cannot mint tokens with JWT_ALGORITHM={0:?}: fanout only holds a public key; mint with JWT_SECRET (HS256)"
    )]
    NoSigningKey(Algorithm),
    #[error("cannot encode the token: {0}")]
    Encode(#[from] jsonwebtoken::errors::Error),
}

impl Verifier {
    /// Builds a verifier, or says which setting is wrong and why.
    pub fn new(cfg: VerifierConfig) -> Result<Self, KeyError> {
        use jsonwebtoken::Algorithm::*;
        let alg = cfg.algorithm;
        let (keys, signing) = match (&cfg.key, alg) {
            (VerifyKey::Secret(secret), HS256 | HS384 | HS512) => {
                if secret.is_empty() {
                    return Err(KeyError::EmptySecret);
                }
                (
                    Keys::Fixed(DecodingKey::from_secret(secret)),
                    Some(EncodingKey::from_secret(secret)),
                )
            }
            (VerifyKey::Secret(_), _) => return Err(KeyError::SecretForAsymmetric(alg)),
            (VerifyKey::PublicPem(_), HS256 | HS384 | HS512) => {
                return Err(KeyError::PublicKeyForHmac(alg));
            }
            (VerifyKey::Jwks(_), HS256 | HS384 | HS512) => return Err(KeyError::JwksForHmac(alg)),
            (VerifyKey::Jwks(config), _) => {
                let jwks = Jwks::new(config.clone(), alg).map_err(|e| KeyError::JwksUrl(e.0))?;
                (Keys::Jwks(Arc::new(jwks)), None)
            }
            (VerifyKey::PublicPem(pem), _) => {
                let bytes = pem.as_bytes();
                let parsed = match alg {
                    RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
                        DecodingKey::from_rsa_pem(bytes)
                    }
                    ES256 | ES384 => DecodingKey::from_ec_pem(bytes),
                    EdDSA => DecodingKey::from_ed_pem(bytes),
                    _ => unreachable!("HMAC handled above"),
                };
                let key = parsed.map_err(|e| KeyError::InvalidPublicKey {
                    alg,
                    reason: e.to_string(),
                })?;
                (Keys::Fixed(key), None)
            }
        };
        let previous = match (&cfg.previous_secret, &cfg.key) {
            (None, _) => None,
            (Some(previous), VerifyKey::Secret(_)) if !previous.is_empty() => {
                Some(DecodingKey::from_secret(previous))
            }
            (Some(_), _) => return Err(KeyError::PreviousWithoutSecret),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_seconds;
        validation.validate_exp = true;
        // Like the Node backend's jsonwebtoken: a token is refused before its `nbf`.
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &cfg.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".into());
            }
            None => validation.iss = None,
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // Like the Node backend's jsonwebtoken: an `aud` claim is ignored when no
            // audience is configured.
            None => validation.validate_aud = false,
        }
        Ok(Self {
            keys,
            previous,
            validation,
            algorithm: alg,
            signing,
            issuer: cfg.issuer,
            audience: cfg.audience,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The JWKS the keys come from, when they come from one: its task must be started.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        match &self.keys {
            Keys::Jwks(jwks) => Some(jwks),
            Keys::Fixed(_) => None,
        }
    }

    /// [`Verifier::verify`], and when the token names a `kid` the JWKS does not hold, the same
    /// again after the JWKS was fetched anew (at most once per `JWT_JWKS_MIN_REFRESH`): the
    /// backend may have just started signing with a new key.
    pub async fn verify_fresh(
        &self,
        token: Option<&serde_json::Value>,
    ) -> Result<Identity, AuthError> {
        match (self.verify(token), &self.keys) {
            (Err(AuthError::UnknownKey), Keys::Jwks(jwks)) => {
                jwks.refresh(jwks::Trigger::UnknownKid).await;
                self.verify(token)
            }
            (result, _) => result,
        }
    }

    /// Verifies `token` (the `auth.token` value a client sent, any JSON).
    pub fn verify(&self, token: Option<&serde_json::Value>) -> Result<Identity, AuthError> {
        let token = match token {
            None | Some(serde_json::Value::Null) => return Err(AuthError::Missing),
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => {
                return Err(AuthError::Missing);
            }
            Some(serde_json::Value::String(s)) => s.trim(),
            Some(_) => return Err(AuthError::Malformed("token is not a string".into())),
        };
        // Tolerate the "Bearer " prefix some clients copy from HTTP headers.
        let token = match bearer(token) {
            Some(Bearer::Token(token)) => token,
            Some(Bearer::Empty) => return Err(AuthError::Missing),
            None => token,
        };
        self.verify_str(token)
    }

    fn verify_str(&self, token: &str) -> Result<Identity, AuthError> {
        // Check the header's algorithm ourselves first, so `alg: none` and HS/RS confusion
        // are refused by name whatever the library would do with them.
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if header.alg != self.algorithm {
            return Err(AuthError::WrongAlgorithm(self.algorithm));
        }
        let fetched;
        let key = match &self.keys {
            Keys::Fixed(key) => key,
            Keys::Jwks(jwks) => {
                fetched = jwks.key_for(header.kid.as_deref())?;
                &*fetched
            }
        };
        let mut decoded = jsonwebtoken::decode::<RawClaims>(token, key, &self.validation);
        if let (Err(e), Some(previous)) = (&decoded, &self.previous)
            && *e.kind() == ErrorKind::InvalidSignature
        {
            decoded = jsonwebtoken::decode::<RawClaims>(token, previous, &self.validation);
            if decoded.is_ok() {
                ::metrics::counter!(metrics::AUTH_PREVIOUS_SECRET).increment(1);
            }
        }
        let data = decoded.map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidClaimFormat(c) => AuthError::BadClaim {
                claim: if c == "nbf" { "nbf" } else { "exp" },
                problem: "is not a number".into(),
            },
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidAlgorithm => AuthError::WrongAlgorithm(self.algorithm),
            ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                AuthError::WrongIssuerOrAudience
            }
            ErrorKind::MissingRequiredClaim(c) => AuthError::BadClaim {
                claim: if c == "exp" { "exp" } else { "iss/aud" },
                problem: "is missing".into(),
            },
            ErrorKind::Json(j) if j.to_string().contains("exp") => AuthError::BadClaim {
                claim: "exp",
                problem: "is missing or not a number".into(),
            },
            other => AuthError::Malformed(format!("{other:?}")),
        })?;
        let claims = data.claims;
        let org = OrgId::from_json(&claims.organization_id)
            .map_err(|e| AuthError::claim("organizationId", e))?;
        let user = UserId::from_json(&claims.user_id).map_err(|e| AuthError::claim("userId", e))?;
        let role = match claims.role {
            serde_json::Value::String(r) if !r.is_empty() => r,
            serde_json::Value::Null => {
                return Err(AuthError::claim("role", InvalidId::Missing));
            }
            _ => return Err(AuthError::claim("role", InvalidId::WrongType)),
        };
        Ok(Identity {
            org,
            user,
            role,
            exp: claims.exp,
            raw_org: claims.organization_id,
            raw_user: claims.user_id,
        })
    }

    /// Mints a token with the configured secret. Only possible with an HS* algorithm.
    pub fn mint(
        &self,
        org: &OrgId,
        user: &UserId,
        role: &str,
        ttl: std::time::Duration,
    ) -> Result<String, MintError> {
        let key = self
            .signing
            .as_ref()
            .ok_or(MintError::NoSigningKey(self.algorithm))?;
        let now = crate::protocol::now_ms() / 1000;
        let claims = MintClaims {
            user_id: user.as_str(),
            organization_id: org.as_str(),
            role,
            iat: now,
            exp: now + ttl.as_secs().max(1),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(self.algorithm),
            &claims,
            key,
        )?)
    }
}

/// What `Bearer <credential>` (an `Authorization` header's value, or a token a client
/// copied from one) holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Bearer<'a> {
    Token(&'a str),
    /// The scheme without a credential.
    Empty,
}

/// Reads the `Bearer` scheme (in any case) and its credential, trimmed; `None` when the
/// text is not of that scheme. The one parser of the ingest keys, the REST API's header and
/// tokens with the prefix left on.
pub fn bearer(text: &str) -> Option<Bearer<'_>> {
    let text = text.trim();
    let (scheme, credential) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(match credential.trim() {
        "" => Bearer::Empty,
        token => Bearer::Token(token),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret-that-is-long-enough-for-hs256";

    /// A verifier's settings with no issuer, audience, leeway or previous secret.
    fn plain(key: VerifyKey, algorithm: Algorithm) -> VerifierConfig {
        VerifierConfig {
            key,
            algorithm,
            issuer: None,
            audience: None,
            leeway_seconds: 0,
            previous_secret: None,
        }
    }

    fn hs_verifier() -> Verifier {
        Verifier::new(plain(VerifyKey::Secret(SECRET.to_vec()), Algorithm::HS256)).unwrap()
    }

    fn now() -> u64 {
        crate::protocol::now_ms() / 1000
    }

    fn sign(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn good_claims() -> serde_json::Value {
        json!({"userId": "u1", "organizationId": "acme", "role": "admin", "exp": now() + 600})
    }

    fn verify(v: &Verifier, token: &str) -> Result<Identity, AuthError> {
        v.verify(Some(&json!(token)))
    }

    #[test]
    fn accepts_valid_token() {
        let v = hs_verifier();
        let id = verify(&v, &sign(good_claims(), Algorithm::HS256, SECRET)).unwrap();
        assert_eq!(id.org.as_str(), "acme");
        assert_eq!(id.user.as_str(), "u1");
        assert_eq!(id.role, "admin");
        let bearer = format!("Bearer {}", sign(good_claims(), Algorithm::HS256, SECRET));
        assert!(verify(&v, &bearer).is_ok());
    }

    #[test]
    fn numeric_ids_are_accepted_and_echoed_raw() {
        let v = hs_verifier();
        let claims =
            json!({"userId": 7, "organizationId": 42, "role": "viewer", "exp": now() + 60});
        let id = verify(&v, &sign(claims, Algorithm::HS256, SECRET)).unwrap();
        assert_eq!(id.org.as_str(), "42");
        assert_eq!(id.raw_org, json!(42));
        assert_eq!(id.raw_user, json!(7));
    }

    #[test]
    fn missing_token() {
        let v = hs_verifier();
        for t in [None, Some(json!(null)), Some(json!("")), Some(json!("  "))] {
            let err = v.verify(t.as_ref()).unwrap_err();
            assert_eq!(err, AuthError::Missing);
            assert_eq!(err.client_message(), "Authentication required");
        }
        let err = v.verify(Some(&json!(12))).unwrap_err();
        assert_eq!(err.reason(), "malformed");
        assert_eq!(err.client_message(), "Invalid or expired token");
    }

    #[test]
    fn rejects_expired() {
        let v = hs_verifier();
        let mut c = good_claims();
        c["exp"] = json!(now() - 5);
        assert_eq!(
            verify(&v, &sign(c, Algorithm::HS256, SECRET)),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some(Bearer::Token("abc")));
        assert_eq!(bearer(" bearer   abc "), Some(Bearer::Token("abc")));
        assert_eq!(bearer("BEARER"), Some(Bearer::Empty));
        assert_eq!(bearer("Bearer  "), Some(Bearer::Empty));
        assert_eq!(bearer("Basic dXNlcg=="), None);
        assert_eq!(bearer("abc.def.ghi"), None);
        let v = hs_verifier();
        let token = sign(good_claims(), Algorithm::HS256, SECRET);
        assert!(verify(&v, &format!("bearer {token}")).is_ok());
        assert_eq!(verify(&v, "Bearer "), Err(AuthError::Missing));
    }

    #[test]
    fn rejects_a_token_not_valid_yet() {
        let v = hs_verifier();
        let mut c = good_claims();
        c["nbf"] = json!(now() + 300);
        let err = verify(&v, &sign(c.clone(), Algorithm::HS256, SECRET)).unwrap_err();
        assert_eq!(err, AuthError::NotYetValid);
        assert_eq!(err.reason(), "not_yet_valid");
        assert_eq!(err.client_message(), "Invalid or expired token");
        c["nbf"] = json!(now() - 1);
        assert!(verify(&v, &sign(c.clone(), Algorithm::HS256, SECRET)).is_ok());
        c["nbf"] = json!("soon");
        let err = verify(&v, &sign(c, Algorithm::HS256, SECRET)).unwrap_err();
        assert_eq!(err.reason(), "bad_claims");
    }

    #[test]
    fn a_distant_exp_saturates_instead_of_wrapping() {
        let v = hs_verifier();
        let mut c = good_claims();
        c["exp"] = json!(u64::MAX / 1000 + 1);
        let id = verify(&v, &sign(c, Algorithm::HS256, SECRET)).unwrap();
        assert_eq!(id.expires_at_ms(60_000), u64::MAX);
        let id = verify(&v, &sign(good_claims(), Algorithm::HS256, SECRET)).unwrap();
        assert_eq!(id.expires_at_ms(1500), id.exp * 1000 + 1500);
    }

    #[test]
    fn leeway_accepts_recently_expired() {
        let v = Verifier::new(VerifierConfig {
            key: VerifyKey::Secret(SECRET.to_vec()),
            algorithm: Algorithm::HS256,
            issuer: None,
            audience: None,
            leeway_seconds: 30,
            previous_secret: None,
        })
        .unwrap();
        let mut c = good_claims();
        c["exp"] = json!(now() - 5);
        assert!(verify(&v, &sign(c, Algorithm::HS256, SECRET)).is_ok());
    }

    #[test]
    fn rejects_other_key_and_garbage() {
        let v = hs_verifier();
        let t = sign(
            good_claims(),
            Algorithm::HS256,
            b"some-other-secret-entirely-0000000",
        );
        assert_eq!(verify(&v, &t), Err(AuthError::BadSignature));
        assert_eq!(verify(&v, "not.a.jwt").unwrap_err().reason(), "malformed");
        assert_eq!(verify(&v, "garbage").unwrap_err().reason(), "malformed");
    }

    #[test]
    fn rejects_other_algorithms() {
        let v = hs_verifier();
        let t = sign(good_claims(), Algorithm::HS512, SECRET);
        assert_eq!(
            verify(&v, &t),
            Err(AuthError::WrongAlgorithm(Algorithm::HS256))
        );
        // alg: none, unsigned.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(good_claims().to_string().as_bytes());
        let none = format!("{header}.{body}.");
        assert!(verify(&v, &none).is_err());
    }

    #[test]
    fn rejects_missing_or_bad_claims() {
        let v = hs_verifier();
        for (field, reason) in [
            ("userId", "bad_claims"),
            ("organizationId", "bad_claims"),
            ("role", "bad_claims"),
            ("exp", "bad_claims"),
        ] {
            let mut c = good_claims();
            c.as_object_mut().unwrap().remove(field);
            let err = verify(&v, &sign(c, Algorithm::HS256, SECRET)).unwrap_err();
            assert_eq!(err.reason(), reason, "without {field}: {err}");
            assert_eq!(err.client_message(), "Invalid or expired token");
        }
        let mut c = good_claims();
        c["organizationId"] = json!("has:colon");
        assert_eq!(
            verify(&v, &sign(c, Algorithm::HS256, SECRET))
                .unwrap_err()
                .reason(),
            "bad_claims"
        );
        let mut c = good_claims();
        c["role"] = json!(3);
        assert_eq!(
            verify(&v, &sign(c, Algorithm::HS256, SECRET))
                .unwrap_err()
                .reason(),
            "bad_claims"
        );
    }

    #[test]
    fn issuer_and_audience() {
        let v = Verifier::new(VerifierConfig {
            key: VerifyKey::Secret(SECRET.to_vec()),
            algorithm: Algorithm::HS256,
            issuer: Some("backend".into()),
            audience: Some("dashboards".into()),
            leeway_seconds: 0,
            previous_secret: None,
        })
        .unwrap();
        let mut c = good_claims();
        c["iss"] = json!("backend");
        c["aud"] = json!("dashboards");
        assert!(verify(&v, &sign(c.clone(), Algorithm::HS256, SECRET)).is_ok());
        c["iss"] = json!("someone-else");
        assert_eq!(
            verify(&v, &sign(c, Algorithm::HS256, SECRET)),
            Err(AuthError::WrongIssuerOrAudience)
        );
        let err = verify(&v, &sign(good_claims(), Algorithm::HS256, SECRET)).unwrap_err();
        assert_eq!(err.reason(), "bad_claims");
        // Minting carries iss and aud, so minted tokens verify.
        let t = v
            .mint(
                &OrgId::parse("o").unwrap(),
                &UserId::parse("u").unwrap(),
                "r",
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        assert!(verify(&v, &t).is_ok());
    }

    const RSA_PUBLIC: &str = include_str!("../../tests/keys/rsa_public.pem");
    const RSA_PRIVATE: &str = include_str!("../../tests/keys/rsa_private.pem");
    const ED_PUBLIC: &str = include_str!("../../tests/keys/ed25519_public.pem");
    const ED_PRIVATE: &str = include_str!("../../tests/keys/ed25519_private.pem");
    const EC_PUBLIC: &str = include_str!("../../tests/keys/ec_public.pem");
    const EC_PRIVATE: &str = include_str!("../../tests/keys/ec_private.pem");

    fn pem_verifier(pem: &str, alg: Algorithm) -> Verifier {
        Verifier::new(VerifierConfig {
            key: VerifyKey::PublicPem(pem.into()),
            algorithm: alg,
            issuer: None,
            audience: None,
            leeway_seconds: 0,
            previous_secret: None,
        })
        .unwrap()
    }

    #[test]
    fn asymmetric_keys() {
        let rs = pem_verifier(RSA_PUBLIC, Algorithm::RS256);
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let t = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &good_claims(), &key).unwrap();
        assert!(verify(&rs, &t).is_ok());

        // HS/RS confusion: an HS256 token signed with the public key's text as the secret.
        let forged = sign(good_claims(), Algorithm::HS256, RSA_PUBLIC.as_bytes());
        assert_eq!(
            verify(&rs, &forged),
            Err(AuthError::WrongAlgorithm(Algorithm::RS256))
        );

        let es = pem_verifier(EC_PUBLIC, Algorithm::ES256);
        let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        let t = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &good_claims(), &key).unwrap();
        assert!(verify(&es, &t).is_ok());
        let forged = sign(good_claims(), Algorithm::HS256, EC_PUBLIC.as_bytes());
        assert_eq!(
            verify(&es, &forged),
            Err(AuthError::WrongAlgorithm(Algorithm::ES256))
        );

        let ed = pem_verifier(ED_PUBLIC, Algorithm::EdDSA);
        let key = EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap();
        let t = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &good_claims(), &key).unwrap();
        assert!(verify(&ed, &t).is_ok());
        // An RS256 token against the EdDSA verifier.
        let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let t =
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &good_claims(), &rsa_key).unwrap();
        assert!(verify(&ed, &t).is_err());
        assert!(
            ed.mint(
                &OrgId::parse("o").unwrap(),
                &UserId::parse("u").unwrap(),
                "r",
                std::time::Duration::from_secs(1)
            )
            .is_err()
        );
    }

    #[test]
    fn key_and_algorithm_mismatch_is_a_config_error() {
        let err = |cfg| Verifier::new(cfg).err().unwrap().to_string();
        let e = err(VerifierConfig {
            key: VerifyKey::PublicPem(
                "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n".into(),
            ),
            algorithm: Algorithm::RS256,
            issuer: None,
            audience: None,
            leeway_seconds: 0,
            previous_secret: None,
        });
        assert!(e.contains("JWT_PUBLIC_KEY"), "{e}");
        let e = err(plain(
            VerifyKey::PublicPem(RSA_PUBLIC.into()),
            Algorithm::HS256,
        ));
        assert!(e.contains("JWT_SECRET"), "{e}");
        let e = err(plain(VerifyKey::Secret(b"s".to_vec()), Algorithm::RS256));
        assert!(e.contains("JWT_PUBLIC_KEY"), "{e}");
        let e = err(plain(
            VerifyKey::PublicPem(RSA_PUBLIC.into()),
            Algorithm::ES256,
        ));
        assert!(e.contains("ES256"), "{e}");
    }
}
