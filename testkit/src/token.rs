//! HS256 tokens, minted in-process: the replicas under test verify them with a secret the
//! caller gives them, so no token service needs to run, and every connection can have its
//! own user in the organization it is assigned to.
//!
//! A [`Minter`] derives the HMAC key once, for callers that sign one token per connection
//! (tens of thousands, for the load generator); the free functions sign with [`SECRET`], the
//! replicas' default. [`Minter::rs256`] signs RS256 with the repository's test key pair
//! (`tests/keys`), whose public half is [`RSA_PUBLIC_KEY`]: the load generator's asymmetric
//! connect storm.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use serde_json::Value;

use crate::SECRET;

/// The claims fanout (and the Node peer of the benchmark) require, in the order `json!`
/// would write them.
#[derive(Serialize)]
struct Claims<'a> {
    exp: u64,
    #[serde(rename = "organizationId")]
    org: &'a str,
    role: &'a str,
    #[serde(rename = "userId")]
    user: &'a str,
}

/// The public key replicas verify [`Minter::rs256`]'s tokens with (`JWT_PUBLIC_KEY`).
pub const RSA_PUBLIC_KEY: &str = include_str!("../../tests/keys/rsa_public.pem");
const RSA_PRIVATE_KEY: &str = include_str!("../../tests/keys/rsa_private.pem");

/// A signing key.
pub struct Minter {
    key: EncodingKey,
    header: Header,
}

impl Minter {
    /// HS256 with `secret`.
    pub fn new(secret: &str) -> Self {
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::default(),
        }
    }

    /// RS256 with the test key pair (verified with [`RSA_PUBLIC_KEY`]).
    pub fn rs256() -> Self {
        Self {
            key: EncodingKey::from_rsa_pem(RSA_PRIVATE_KEY.as_bytes())
                .expect("tests/keys/rsa_private.pem is a valid RSA key"),
            header: Header::new(jsonwebtoken::Algorithm::RS256),
        }
    }

    /// A token for `user` of `org` (role `member`) expiring at `exp`, in seconds since the
    /// epoch.
    pub fn mint(&self, org: &str, user: &str, exp: u64) -> String {
        self.sign(&Claims {
            exp,
            org,
            role: "member",
            user,
        })
    }

    /// A token with exactly these claims.
    pub fn sign(&self, claims: &impl Serialize) -> String {
        jsonwebtoken::encode(&self.header, claims, &self.key).expect("signing a token")
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token for `org`/`user` (role `member`) expiring at `exp` (seconds since the epoch).
pub fn token(org: &str, user: &str, exp: u64) -> String {
    Minter::new(SECRET).mint(org, user, exp)
}

/// A token for `org`/`user` valid for an hour.
pub fn valid_token(org: &str, user: &str) -> String {
    token(org, user, now_secs() + 3600)
}

/// A token with exactly these claims, signed with [`SECRET`].
pub fn token_with(claims: &Value) -> String {
    sign(claims, SECRET)
}

/// A token with these claims, signed with `secret`.
pub fn sign(claims: &Value, secret: &str) -> String {
    Minter::new(secret).sign(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};
    use serde_json::json;

    #[test]
    fn minted_tokens_verify_and_carry_the_claims_json_would() {
        let token = Minter::new("s3cret").mint("org-3", "u-7", 4_000_000_000);
        let data = decode::<Value>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::default(),
        )
        .unwrap();
        let claims = json!({
            "organizationId": "org-3",
            "userId": "u-7",
            "role": "member",
            "exp": 4_000_000_000u64,
        });
        assert_eq!(data.claims, claims);
        assert_eq!(
            sign(&claims, "s3cret"),
            token,
            "the same bytes as from a json! value"
        );
    }
}
