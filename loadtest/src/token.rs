//! Tokens for the generated dashboards, minted in-process.
//!
//! The servers under test verify HS256 tokens with a secret that the generator passes them,
//! so the generator signs its own: no token service to run, and every connection can have
//! its own user in the organization it is assigned to.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde::Serialize;

/// How long a minted token stays valid: longer than any run.
const TTL_SECONDS: u64 = 24 * 3600;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Claims<'a> {
    user_id: &'a str,
    organization_id: &'a str,
    role: &'a str,
    exp: u64,
}

/// A signing key: the HMAC state is derived once, not per token.
pub struct Minter {
    key: EncodingKey,
    exp: u64,
}

impl Minter {
    pub fn new(secret: &str) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            exp: now + TTL_SECONDS,
        }
    }

    /// An HS256 token for `user` in `org` with the claims fanout and the Node peer require.
    pub fn mint(&self, org: &str, user: &str) -> String {
        let claims = Claims {
            user_id: user,
            organization_id: org,
            role: "viewer",
            exp: self.exp,
        };
        encode(&Header::default(), &claims, &self.key).expect("HS256 signing cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation, decode};

    #[test]
    fn minted_tokens_verify_with_the_same_secret() {
        let token = Minter::new("s3cret").mint("org-3", "u-7");
        let data = decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::default(),
        )
        .unwrap();
        assert_eq!(data.claims["organizationId"], "org-3");
        assert_eq!(data.claims["userId"], "u-7");
        assert_eq!(data.claims["role"], "viewer");
    }
}
