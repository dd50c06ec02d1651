//! JWT verification, the cost every Socket.IO connection pays once before it joins a room.
//!
//! `Verifier::verify` runs in the connect handler, so its cost bounds how fast a replica can
//! re-admit its sockets after a restart or a load-balancer failover (a reconnect storm), per
//! core. Each configurable algorithm family is measured (HS256 is the common case; RS256,
//! ES256 and EdDSA use the test keys), with a valid token and with one whose signature was
//! tampered with: a rejection must not cost more than an acceptance (garbage tokens must be
//! no better a way to load a replica than real ones), and whatever it saves should be the
//! work after the signature check, not part of the check.
//!
//! `decode_header/HS256` is the header decoding `verify` does itself, to refuse a foreign
//! algorithm by name, before `jsonwebtoken::decode` (which decodes the header again): what
//! that explicit check costs.
//!
//! `signature_only/RS256` and `signature_only/ES256` are the floor under `valid/*`: the same
//! token's signature checked by aws-lc-rs (the back end jsonwebtoken uses) with the key
//! parsed beforehand, and nothing else: no base64, no JSON, no claims.

use std::hint::black_box;
use std::time::Duration;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, VerificationAlgorithm,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fanout::auth::{AuthError, Verifier, VerifierConfig, VerifyKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &[u8] = b"bench-secret-that-is-long-enough-for-hs256";

const RSA_PUBLIC: &str = include_str!("../tests/keys/rsa_public.pem");
const RSA_PRIVATE: &str = include_str!("../tests/keys/rsa_private.pem");
const EC_PUBLIC: &str = include_str!("../tests/keys/ec_public.pem");
const EC_PRIVATE: &str = include_str!("../tests/keys/ec_private.pem");
const ED_PUBLIC: &str = include_str!("../tests/keys/ed25519_public.pem");
const ED_PRIVATE: &str = include_str!("../tests/keys/ed25519_private.pem");

/// One algorithm: its verifier, a valid token and a tampered one (as the JSON values a
/// client sends in `auth.token`).
struct Case {
    name: &'static str,
    verifier: Verifier,
    valid: Value,
    bad_signature: Value,
}

fn verifier(key: VerifyKey, algorithm: Algorithm) -> Verifier {
    Verifier::new(VerifierConfig {
        key,
        algorithm,
        issuer: None,
        audience: None,
        leeway_seconds: 30,
        previous_secret: None,
    })
    .expect("bench verifier")
}

/// The claims a dashboard backend signs, with ids of realistic length.
fn claims() -> Value {
    let now = fanout::protocol::now_ms() / 1000;
    json!({
        "userId": "usr_01HZX4W9QK8J5M2N7P3R6T1V0Y",
        "organizationId": "org_01HZX4VZ3C5D7F9G1H3J5K7M9N",
        "role": "admin",
        "iat": now,
        "exp": now + 3600,
    })
}

/// Changes one character in the middle of the signature: still well-formed base64url of
/// the right length, so the token is refused by the signature check, not by the parser.
fn tamper(token: &str) -> String {
    let sig_start = token.rfind('.').expect("a JWT has three parts") + 1;
    let at = sig_start + (token.len() - sig_start) / 2;
    let mut bytes = token.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ASCII")
}

fn case(name: &'static str, verifier: Verifier, algorithm: Algorithm, key: &EncodingKey) -> Case {
    let token = jsonwebtoken::encode(&Header::new(algorithm), &claims(), key).expect("mint");
    let case = Case {
        name,
        verifier,
        bad_signature: Value::String(tamper(&token)),
        valid: Value::String(token),
    };
    // Measure what we mean to measure: an acceptance, and a refusal by signature.
    let id = case
        .verifier
        .verify(Some(&case.valid))
        .expect("valid token");
    assert_eq!(id.role, "admin");
    assert_eq!(
        case.verifier.verify(Some(&case.bad_signature)),
        Err(AuthError::BadSignature),
        "{name}"
    );
    case
}

fn cases() -> Vec<Case> {
    vec![
        case(
            "HS256",
            verifier(VerifyKey::Secret(SECRET.to_vec()), Algorithm::HS256),
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET),
        ),
        case(
            "RS256",
            verifier(VerifyKey::PublicPem(RSA_PUBLIC.into()), Algorithm::RS256),
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
        ),
        case(
            "ES256",
            verifier(VerifyKey::PublicPem(EC_PUBLIC.into()), Algorithm::ES256),
            Algorithm::ES256,
            &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
        ),
        case(
            "EdDSA",
            verifier(VerifyKey::PublicPem(ED_PUBLIC.into()), Algorithm::EdDSA),
            Algorithm::EdDSA,
            &EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes()).unwrap(),
        ),
    ]
}

/// A PEM document's DER bytes.
fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).expect("PEM body is base64")
}

/// What `signature_only` checks: the signed part of a token and its signature.
fn signed_parts(token: &Value) -> (Vec<u8>, Vec<u8>) {
    let token = token.as_str().expect("a token is a string");
    let (signed, signature) = token.rsplit_once('.').expect("a JWT has three parts");
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .expect("base64url signature");
    (signed.as_bytes().to_vec(), signature)
}

fn jwt_verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("jwt_verify");
    let cases = cases();
    let hs = &cases[0];
    group.bench_function(BenchmarkId::new("decode_header", hs.name), |b| {
        let token = hs.valid.as_str().unwrap();
        b.iter(|| jsonwebtoken::decode_header(black_box(token)).unwrap())
    });
    // A P-256 SubjectPublicKeyInfo ends with the uncompressed point, the form aws-lc-rs takes.
    let ec_point = pem_der(EC_PUBLIC).split_off(pem_der(EC_PUBLIC).len() - 65);
    let floors = [
        (
            &cases[1],
            &RSA_PKCS1_2048_8192_SHA256 as &dyn VerificationAlgorithm,
            pem_der(RSA_PUBLIC),
        ),
        (&cases[2], &ECDSA_P256_SHA256_FIXED, ec_point),
    ];
    for (case, algorithm, key) in floors {
        let key = ParsedPublicKey::new(algorithm, key).expect("test public key");
        let (signed, signature) = signed_parts(&case.valid);
        key.verify_sig(&signed, &signature)
            .expect("the token's own signature");
        group.bench_function(BenchmarkId::new("signature_only", case.name), |b| {
            b.iter(|| key.verify_sig(black_box(&signed), black_box(&signature)))
        });
    }
    for case in cases {
        group.bench_with_input(BenchmarkId::new("valid", case.name), &case, |b, case| {
            b.iter(|| case.verifier.verify(Some(black_box(&case.valid))))
        });
        group.bench_with_input(
            BenchmarkId::new("bad_signature", case.name),
            &case,
            |b, case| b.iter(|| case.verifier.verify(Some(black_box(&case.bad_signature)))),
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = jwt_verify
}
criterion_main!(benches);
