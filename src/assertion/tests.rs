//! Signing, verifying, key loading and rotation, with keys made fresh by each run and a few fixed
//! test-only keys made once with the openssl CLI.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, TimeZone as _, Utc};
use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
use serde_json::{Value, json};

use super::*;

// --- fixtures: test-only keys, made with openssl 3.0 ---

/// `openssl genpkey -algorithm ed25519`
const ED25519_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIOSCPl4K2iHIjFiRZALEWXruIPeH1SXxCYqbjvuvDHSC
-----END PRIVATE KEY-----
";
/// Its RFC 7638 thumbprint, computed apart from this code (Python `cryptography` and hashlib).
const ED25519_PKCS8_KID: &str = "3mYPN3oEBdyepwojfw3hBz_bAo-nRtlX1_xqNQxQSYA";

/// `openssl ecparam -name prime256v1 -genkey` (SEC1, after an `EC PARAMETERS` block).
const P256_SEC1: &str = "-----BEGIN EC PARAMETERS-----
BggqhkjOPQMBBw==
-----END EC PARAMETERS-----
-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIIkXLB89kSRaWd+rTUXYjrUAGV09S8KQ6Z5AARWJ0c3BoAoGCCqGSM49
AwEHoUQDQgAEtZlcqxNigUOR8T4CAFZHA6MtH6RnXpgl2ZdN1RrK3vkgFQK3qLwt
rbTV5Do5VC8nu8r3qkBtraQbcz+sHucGJg==
-----END EC PRIVATE KEY-----
";
const P256_SEC1_KID: &str = "gZFF__mj-9iGT5W5uc6U7_2Z7-vm70ULqbJjLdafWd0";
const P256_SEC1_X: &str = "tZlcqxNigUOR8T4CAFZHA6MtH6RnXpgl2ZdN1RrK3vk";
const P256_SEC1_Y: &str = "IBUCt6i8La201eQ6OVQvJ7vK96pAba2kG3M_rB7nBiY";

/// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`
const P256_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgrFayhrTVvLR5cL3v
3oY5UweUHg0lwTyRYdbYmolTtEKhRANCAAQ5O1fScaf3gG77+oVfAVNQujeBnmXo
h3uIPPZzR4SvPjwGfx9eYCMbZhfWlmq5nmsiL69d/dOINlaK39fn0x/7
-----END PRIVATE KEY-----
";
const P256_PKCS8_KID: &str = "fg51EmEyu51C21e5AmCNJJO-wRmPIq2vVgekLpWCp78";

/// `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384`
const P384_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIG2AgEAMBAGByqGSM49AgEGBSuBBAAiBIGeMIGbAgEBBDBOTgNJz43NDxxT7nMU
qtcLafKRNFrw2rf21h4dUA3zwgAlMgkFEMEBscygMWEZMS2hZANiAAQfokSvCBzR
dJgDETNQtJeaIrOKmaCk5SZHMrf4lgoCdAPzGo/G7vAccwU7cnrn4t4HM0g+kwOT
kZuvPcdmBNBe7fGB9itHWMEgpJV2c2T/rkCZpcsY6SC+WrSuIGJlN/0=
-----END PRIVATE KEY-----
";

/// `openssl ecparam -name secp384r1 -genkey -noout`
const P384_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MIGkAgEBBDBNNpfjIFzrhRtHhQMC9fw4Ini0NGAmZKHXzeHBLRa6y2538jkwMioO
SA6+MhqsPcCgBwYFK4EEACKhZANiAATCX1GkSKEx4X9GVYBRxHasYAfeZNOZt9gD
hTvOxPv6LnTF7bibMmhyKHpP88v2twtEK0azi0a0eRNOoYMw/pQfByDQP4gMFutH
ZE/1jZJJLslcckLw1EME9z3V17DNCfM=
-----END EC PRIVATE KEY-----
";

/// `openssl ecparam -name secp256k1 -genkey -noout`: 32 bytes like P-256, another curve.
const SECP256K1_SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHQCAQEEIAYGxuHEXxWY3A46n1pYpUM5bfP0KDd7kSGez3ZyHr/AoAcGBSuBBAAK
oUQDQgAERxFQ2yoZ6wo0OYUsbQ5wzOQhJnVi5HgWoXirqGv/OgJy8KetMpocZzgQ
jgRbm8JHbNwgum93dEiDDmq49BSzfw==
-----END EC PRIVATE KEY-----
";

/// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:1024` (small: it is only refused).
const RSA_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIICdQIBADANBgkqhkiG9w0BAQEFAASCAl8wggJbAgEAAoGBAMwRg4baqwXDFEON
I/3h1YyFpQxMWZTvUoYZm2dmOcvhCQ+dVPVJ+3kGrOSWSqKR8KwwxcXa3xNrCIDL
fWQT1kQVzvxLoWQb8ix+fdW+NNgqjy+GWODrUaCI2a7HytjEMNPWbOrKW5IZG07g
8mNPyRgcJfJ+Fqf3MOjEnDSYUqvlAgMBAAECgYA66n+HqpAfvL+X9SLEBLRrupX5
I/3lAudXcgMs6hWbqB++k1TY8IAa4/N8l2t63hmXDQm8YsFu0MMGtDlCcHu2bnGE
uscRtfe1WbHNHx7oWsi7yi6l+tqdfiveyElAm36vF9MgE/23LgIeDRpjrTFEH/bw
wt4eS5tDGt1bnSGjQQJBAOsfFU6CCPiMVhfxytKrM/b836jWvKPhiHj5+JbpPkTi
ysO8CZx4wzS68OIzNpXL2qN+LPbiilrVI/uZ2WDvxJUCQQDeMIP8dlVY0mW+rdRT
67apE+8/xTiRMe7I+NnXGJqpvorfVA1P9QfbXImScnn5f+GEynPZuWyI3ikfG4P5
tqYRAkB+Mb222HZGKNRgn6czsS3/57OHpFG1R+x+ufPh06hXQr5/leI2uF5VY+y8
C67FcZeU3rj1fZuyqulYNjgFHkuNAkA4G/xYtvFamtdCzdb+0lmwXO5gJkfgssFg
Uyd/4CC+mPWs7CboeDJhvP6o0uvmi9rBk/aplt/HuIKd7m7nkq5hAkBEilOGohBy
nJdz38ztd9WyfASE07SqTLUvUJVddX9jCbIJ/8STeQUsBSJgVgPJbe8yMAApUJsg
UkGnk8TgVRFU
-----END PRIVATE KEY-----
";

/// The same RSA key as PKCS#1 (`openssl rsa -traditional`).
const RSA_PKCS1: &str = "-----BEGIN RSA PRIVATE KEY-----
MIICWwIBAAKBgQDMEYOG2qsFwxRDjSP94dWMhaUMTFmU71KGGZtnZjnL4QkPnVT1
Sft5BqzklkqikfCsMMXF2t8TawiAy31kE9ZEFc78S6FkG/Isfn3VvjTYKo8vhljg
61GgiNmux8rYxDDT1mzqyluSGRtO4PJjT8kYHCXyfhan9zDoxJw0mFKr5QIDAQAB
AoGAOup/h6qQH7y/l/UixAS0a7qV+SP95QLnV3IDLOoVm6gfvpNU2PCAGuPzfJdr
et4Zlw0JvGLBbtDDBrQ5QnB7tm5xhLrHEbX3tVmxzR8e6FrIu8oupfranX4r3shJ
QJt+rxfTIBP9ty4CHg0aY60xRB/28MLeHkubQxrdW50ho0ECQQDrHxVOggj4jFYX
8crSqzP2/N+o1ryj4Yh4+fiW6T5E4srDvAmceMM0uvDiMzaVy9qjfiz24opa1SP7
mdlg78SVAkEA3jCD/HZVWNJlvq3UU+u2qRPvP8U4kTHuyPjZ1xiaqb6K31QNT/UH
21yJknJ5+X/hhMpz2blsiN4pHxuD+bamEQJAfjG9tth2RijUYJ+nM7Et/+ezh6RR
tUfsfrnz4dOoV0K+f5XiNrheVWPsvAuuxXGXlN649X2bsqrpWDY4BR5LjQJAOBv8
WLbxWprXQs3W/tJZsFzuYCZH4LLBYFMnf+Agvpj1rOwm6HgyYbz+qNLr5ovawZP2
qZbfx7iCne5u55KuYQJARIpThqIQcpyXc9/M7XfVsnwEhNO0qky1L1CVXXV/Ywmy
Cf/Ek3kFLAUiYFYDyW3vMjAAKVCbIFJBp5PE4FURVA==
-----END RSA PRIVATE KEY-----
";

/// `openssl genpkey -algorithm ed448`
const ED448_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MEcCAQAwBQYDK2VxBDsEOaxYUvYOrYfkUnTu8ZhvyZ2tDA0a80G6Moti72ui9tjH
YRaUyC9zhFqETea4KVdryFLL27JFKfNNDg==
-----END PRIVATE KEY-----
";

// --- helpers ---

fn fresh_ed25519() -> String {
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string()
}

fn fresh_p256_secret() -> p256::SecretKey {
    // A random 32-byte string is a valid P-256 scalar but for a chance of about 2^-32.
    loop {
        if let Ok(key) = p256::SecretKey::from_slice(&rand::random::<[u8; 32]>()) {
            return key;
        }
    }
}

fn fresh_p256() -> String {
    fresh_p256_secret()
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string()
}

fn keys(pems: &[&str]) -> AssertionKeys {
    AssertionKeys::from_pem(pems).unwrap()
}

fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(1_750_000_000, 0).unwrap()
}

fn claims() -> AssertionClaims {
    AssertionClaims::new(
        "u_0192f3c4",
        "6b3a4f2e-9c1d-4e8a-b7f0-2d5c8e1a9b3f",
        "session-1",
        vec![("", "emp-42"), ("billing", "cus_9")],
        now(),
        now() + Duration::seconds(60),
    )
    .unwrap()
    .with_aal("aal2")
    .with_state("active")
}

fn part(token: &str, index: usize) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(token.split('.').nth(index).unwrap())
        .unwrap()
}

fn header(token: &str) -> Value {
    serde_json::from_slice(&part(token, 0)).unwrap()
}

/// `token` with part `index` replaced by `bytes`.
fn with_part(token: &str, index: usize, bytes: &[u8]) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[index] = URL_SAFE_NO_PAD.encode(bytes);
    parts.join(".")
}

fn load_error(pem: &str) -> AssertionError {
    AssertionKeys::from_pem(&[pem]).unwrap_err()
}

/// The base64 body lines of a PEM text, the part that holds the key.
fn body_lines(pem: &str) -> Vec<&str> {
    pem.lines()
        .filter(|line| !line.starts_with("-----") && line.len() > 8)
        .collect()
}

// --- signing and verifying ---

#[test]
fn sign_ed25519_verifies_with_its_jwks() {
    let keys = keys(&[&fresh_ed25519()]);
    let token = keys.sign(&claims()).unwrap();

    assert_eq!(
        header(&token),
        json!({"alg": "EdDSA", "typ": "JWT", "kid": keys.signing_kid()})
    );
    assert_eq!(part(&token, 2).len(), 64);
    assert_eq!(verify(&keys.jwks(), &token, now()).unwrap(), claims());
}

#[test]
fn sign_es256_verifies_with_its_jwks_and_signature_is_jose_not_der() {
    for pem in [fresh_p256(), P256_PKCS8.to_owned(), P256_SEC1.to_owned()] {
        let keys = keys(&[&pem]);
        assert_eq!(keys.signing_algorithm(), Algorithm::Es256);
        let token = keys.sign(&claims()).unwrap();

        assert_eq!(
            header(&token),
            json!({"alg": "ES256", "typ": "JWT", "kid": keys.signing_kid()})
        );
        // r || s, 32 bytes each; a DER signature starts with 0x30 and is 70-72 bytes long.
        assert_eq!(part(&token, 2).len(), 64);
        assert_eq!(verify(&keys.jwks(), &token, now()).unwrap(), claims());
    }
}

#[test]
fn claims_json_has_the_documented_shape() {
    let keys = keys(&[&fresh_ed25519()]);
    let token = keys.sign(&claims()).unwrap();
    let payload: Value = serde_json::from_slice(&part(&token, 1)).unwrap();
    assert_eq!(
        payload,
        json!({
            "iss": "idmap",
            "sub": "u_0192f3c4",
            "ory_identity_id": "6b3a4f2e-9c1d-4e8a-b7f0-2d5c8e1a9b3f",
            "ory_session_id": "session-1",
            "external_ids": {"": "emp-42", "billing": "cus_9"},
            "iat": 1_750_000_000,
            "exp": 1_750_000_060,
            "aal": "aal2",
            "state": "active",
        })
    );

    let bare = AssertionClaims::new(
        "u",
        "i",
        "s",
        Vec::<(String, String)>::new(),
        now(),
        now() + Duration::seconds(1),
    )
    .unwrap();
    let bare = serde_json::to_value(&bare).unwrap();
    assert!(bare.get("aal").is_none() && bare.get("state").is_none());
    assert_eq!(bare["external_ids"], json!({}));
}

#[test]
fn claims_new_refuses_bad_windows_and_repeated_namespaces() {
    let same = AssertionClaims::new("u", "i", "s", [("", "a")], now(), now());
    assert!(matches!(same, Err(AssertionError::InvalidClaims(_))));

    let twice = AssertionClaims::new(
        "u",
        "i",
        "s",
        [("ns", "a"), ("ns", "b")],
        now(),
        now() + Duration::seconds(5),
    );
    assert!(matches!(twice, Err(AssertionError::DuplicateNamespace(ns)) if ns == "ns"));
}

#[test]
fn sign_refuses_claims_not_worth_signing() {
    let keys = keys(&[&fresh_ed25519()]);
    let mut foreign = claims();
    foreign.iss = "someone-else".to_owned();
    assert!(matches!(
        keys.sign(&foreign),
        Err(AssertionError::InvalidClaims(_))
    ));

    let mut backwards = claims();
    backwards.exp = backwards.iat - 1;
    assert!(matches!(
        keys.sign(&backwards),
        Err(AssertionError::InvalidClaims(_))
    ));
}

// --- what verification refuses ---

#[test]
fn verify_tampered_payload_fails() {
    for pem in [fresh_ed25519(), fresh_p256()] {
        let keys = keys(&[&pem]);
        let token = keys.sign(&claims()).unwrap();
        let mut forged = claims();
        forged.sub = "u_admin".to_owned();
        let forged = with_part(&token, 1, &serde_json::to_vec(&forged).unwrap());

        let error = verify(&keys.jwks(), &forged, now()).unwrap_err();
        assert!(matches!(error, AssertionError::BadSignature), "{error}");
    }
}

#[test]
fn verify_tampered_signature_fails() {
    for pem in [fresh_ed25519(), fresh_p256()] {
        let keys = keys(&[&pem]);
        let token = keys.sign(&claims()).unwrap();
        let mut signature = part(&token, 2);
        signature[10] ^= 0x01;
        let forged = with_part(&token, 2, &signature);

        let error = verify(&keys.jwks(), &forged, now()).unwrap_err();
        assert!(matches!(error, AssertionError::BadSignature), "{error}");

        let truncated = with_part(&token, 2, &part(&token, 2)[..63]);
        let error = verify(&keys.jwks(), &truncated, now()).unwrap_err();
        assert!(matches!(error, AssertionError::BadSignature), "{error}");
    }
}

#[test]
fn verify_unknown_kid_fails() {
    let signer = keys(&[&fresh_ed25519()]);
    let other = keys(&[&fresh_ed25519()]);
    let token = signer.sign(&claims()).unwrap();

    let error = verify(&other.jwks(), &token, now()).unwrap_err();
    assert!(
        matches!(&error, AssertionError::UnknownKid { kid } if kid == signer.signing_kid()),
        "{error}"
    );

    let no_kid = with_part(&token, 0, br#"{"alg":"EdDSA","typ":"JWT"}"#);
    assert!(matches!(
        verify(&signer.jwks(), &no_kid, now()),
        Err(AssertionError::MissingKid)
    ));
}

#[test]
fn verify_alg_other_than_the_keys_fails() {
    let ed = keys(&[&fresh_ed25519()]);
    let token = ed.sign(&claims()).unwrap();
    for alg in ["ES256", "none", "HS256", "RS256"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": ed.signing_kid()});
        let forged = with_part(&token, 0, &serde_json::to_vec(&header).unwrap());
        let error = verify(&ed.jwks(), &forged, now()).unwrap_err();
        assert!(
            matches!(
                &error,
                AssertionError::AlgMismatch {
                    expected: "EdDSA",
                    ..
                }
            ),
            "{alg}: {error}"
        );
    }

    let ec = keys(&[&fresh_p256()]);
    let token = ec.sign(&claims()).unwrap();
    let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": ec.signing_kid()});
    let forged = with_part(&token, 0, &serde_json::to_vec(&header).unwrap());
    let error = verify(&ec.jwks(), &forged, now()).unwrap_err();
    assert!(
        matches!(
            &error,
            AssertionError::AlgMismatch {
                expected: "ES256",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn verify_jwk_whose_alg_contradicts_its_type_fails() {
    let keys = keys(&[&fresh_ed25519()]);
    let token = keys.sign(&claims()).unwrap();
    let mut jwks = keys.jwks();
    jwks["keys"][0]["alg"] = json!("ES256");
    assert!(matches!(
        verify(&jwks, &token, now()),
        Err(AssertionError::InvalidJwks(_))
    ));
}

#[test]
fn verify_expired_fails_and_so_does_issued_in_the_future() {
    let keys = keys(&[&fresh_p256()]);
    let token = keys.sign(&claims()).unwrap();
    let jwks = keys.jwks();

    assert!(verify(&jwks, &token, now() + Duration::seconds(59)).is_ok());
    let error = verify(&jwks, &token, now() + Duration::seconds(60)).unwrap_err();
    assert!(matches!(error, AssertionError::Expired { .. }), "{error}");
    let error = verify(&jwks, &token, now() + Duration::days(1)).unwrap_err();
    assert!(matches!(error, AssertionError::Expired { .. }), "{error}");

    assert!(verify(&jwks, &token, now() - Duration::seconds(CLOCK_SKEW_SECS)).is_ok());
    let error = verify(
        &jwks,
        &token,
        now() - Duration::seconds(CLOCK_SKEW_SECS + 1),
    )
    .unwrap_err();
    assert!(
        matches!(error, AssertionError::IssuedInFuture { .. }),
        "{error}"
    );
}

#[test]
fn verify_malformed_tokens_fail() {
    let keys = keys(&[&fresh_ed25519()]);
    let jwks = keys.jwks();
    let token = keys.sign(&claims()).unwrap();
    for bad in [
        "",
        "a.b",
        "a.b.c.d",
        &format!("{token}."),
        &format!("{token}=="),
        &token.replacen('.', "=.", 1),
    ] {
        let error = verify(&jwks, bad, now()).unwrap_err();
        assert!(
            matches!(error, AssertionError::Malformed(_)),
            "{bad:?}: {error}"
        );
    }
    let crit = json!({"alg": "EdDSA", "kid": keys.signing_kid(), "crit": ["exp"]});
    let crit = with_part(&token, 0, &serde_json::to_vec(&crit).unwrap());
    assert!(matches!(
        verify(&jwks, &crit, now()),
        Err(AssertionError::Malformed(_))
    ));
    assert!(matches!(
        verify(&json!({}), &token, now()),
        Err(AssertionError::InvalidJwks(_))
    ));
}

// --- rotation ---

#[test]
fn rotation_first_key_signs_and_every_key_verifies() {
    let (old, new) = (fresh_ed25519(), fresh_p256());
    let both = keys(&[&old, &new]);
    let old_only = keys(&[&old]);
    let new_first = keys(&[&new, &old]);

    // The first key signs; the JWKS lists both, signing key first.
    assert_eq!(both.signing_kid(), old_only.signing_kid());
    let jwks = both.jwks();
    let listed: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|jwk| jwk["kid"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [both.signing_kid(), new_first.signing_kid()]);
    let kids: Vec<_> = both.kids().collect();
    assert_eq!(
        kids,
        [
            (old_only.signing_kid(), Algorithm::EdDsa),
            (new_first.signing_kid(), Algorithm::Es256)
        ]
    );

    // A token from either key verifies against the combined JWKS; the new key's token does not
    // verify against the JWKS that only knows the old key.
    let from_old = both.sign(&claims()).unwrap();
    let from_new = new_first.sign(&claims()).unwrap();
    assert_eq!(header(&from_new)["kid"], json!(new_first.signing_kid()));
    assert!(verify(&jwks, &from_old, now()).is_ok());
    assert!(verify(&jwks, &from_new, now()).is_ok());
    assert!(verify(&new_first.jwks(), &from_old, now()).is_ok());
    assert!(matches!(
        verify(&old_only.jwks(), &from_new, now()),
        Err(AssertionError::UnknownKid { .. })
    ));
}

#[test]
fn the_same_key_twice_is_refused() {
    let pem = fresh_ed25519();
    let error = AssertionKeys::from_pem(&[pem.clone(), pem]).unwrap_err();
    assert!(
        matches!(error, AssertionError::DuplicateKey { position: 2, .. }),
        "{error}"
    );
}

// --- kids and JWKs ---

#[test]
fn kid_is_the_rfc7638_thumbprint_and_stable_across_loads() {
    for (pem, kid) in [
        (ED25519_PKCS8, ED25519_PKCS8_KID),
        (P256_SEC1, P256_SEC1_KID),
        (P256_PKCS8, P256_PKCS8_KID),
    ] {
        assert_eq!(keys(&[pem]).signing_kid(), kid);
        assert_eq!(keys(&[pem]).signing_kid(), kid);
    }

    // RFC 8037 appendix A.1 and A.3: the Ed25519 key and its thumbprint.
    let d = URL_SAFE_NO_PAD
        .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
        .unwrap();
    let key = ed25519_dalek::SigningKey::try_from(d.as_slice()).unwrap();
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
    let keys = keys(&[pem.as_str()]);
    assert_eq!(
        keys.signing_kid(),
        "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    );
    assert_eq!(
        keys.jwks()["keys"][0]["x"],
        json!("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
    );

    // A fresh key loaded from its PKCS#8 and from its SEC1 form gets one kid.
    let secret = fresh_p256_secret();
    let pkcs8 = secret.to_pkcs8_pem(LineEnding::LF).unwrap();
    let sec1 = secret.to_sec1_pem(LineEnding::LF).unwrap();
    assert_eq!(
        AssertionKeys::from_pem(&[pkcs8.as_str()])
            .unwrap()
            .signing_kid(),
        AssertionKeys::from_pem(&[sec1.as_str()])
            .unwrap()
            .signing_kid()
    );
}

#[test]
fn jwks_lists_public_jwks_only() {
    let keys = keys(&[ED25519_PKCS8, P256_SEC1]);
    assert_eq!(
        keys.jwks(),
        json!({"keys": [
            {
                "kty": "OKP", "crv": "Ed25519", "x": "-U3avPlaYqzr4raV0cR57iagpl71UzWHIlz4gxTjG1A",
                "kid": ED25519_PKCS8_KID, "alg": "EdDSA", "use": "sig",
            },
            {
                "kty": "EC", "crv": "P-256", "x": P256_SEC1_X, "y": P256_SEC1_Y,
                "kid": P256_SEC1_KID, "alg": "ES256", "use": "sig",
            },
        ]})
    );
}

// --- loading ---

#[test]
fn bundle_loads_every_key_in_order() {
    let fresh = fresh_ed25519();
    let bundle = format!("{P256_SEC1}\n# rotated in 2026-05\n{ED25519_PKCS8}{fresh}");
    let keys = AssertionKeys::from_pem_bundle(&bundle).unwrap();
    let kids: Vec<&str> = keys.kids().map(|(kid, _)| kid).collect();
    assert_eq!(kids.len(), 3);
    assert_eq!(kids[..2], [P256_SEC1_KID, ED25519_PKCS8_KID]);
    assert_eq!(keys.signing_kid(), P256_SEC1_KID);

    assert!(matches!(
        AssertionKeys::from_pem_bundle("  \n"),
        Err(AssertionError::NoKeys)
    ));
    let error = AssertionKeys::from_pem_bundle(&format!("{ED25519_PKCS8}{RSA_PKCS8}")).unwrap_err();
    assert!(
        matches!(error, AssertionError::UnsupportedKey { position: 2, .. }),
        "{error}"
    );
}

#[test]
fn one_entry_holds_one_key() {
    let error = load_error(&format!("{ED25519_PKCS8}{P256_PKCS8}"));
    assert!(
        matches!(error, AssertionError::NotPem { position: 1, .. }),
        "{error}"
    );
}

#[test]
fn crlf_and_surrounding_whitespace_are_accepted() {
    let crlf = format!("\n  {}\n\n", ED25519_PKCS8.replace('\n', "\r\n"));
    assert_eq!(keys(&[&crlf]).signing_kid(), ED25519_PKCS8_KID);
}

#[test]
fn unsupported_keys_are_refused_by_name() {
    for (pem, kind) in [
        (RSA_PKCS8, "RSA"),
        (RSA_PKCS1, "RSA"),
        (P384_PKCS8, "ECDSA P-384"),
        (P384_SEC1, "ECDSA P-384"),
        (SECP256K1_SEC1, "ECDSA secp256k1"),
        (ED448_PKCS8, "Ed448"),
    ] {
        let error = load_error(pem);
        assert!(
            matches!(&error, AssertionError::UnsupportedKey { position: 1, kind: k } if k == kind),
            "{kind}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("Ed25519 or ECDSA on P-256"), "{message}");
        for line in body_lines(pem) {
            assert!(!message.contains(line) && !format!("{error:?}").contains(line));
        }
    }
}

#[test]
fn garbage_is_refused_without_echoing_it() {
    let secretish = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA";
    let broken_body = ED25519_PKCS8.replace("MC4CAQAw", "MC4CAQAx");
    let truncated = &P256_PKCS8[..P256_PKCS8.len() - 40];
    for garbage in [
        "",
        secretish,
        &format!("-----BEGIN PRIVATE KEY-----\n{secretish}\n-----END PRIVATE KEY-----\n"),
        &broken_body,
        truncated,
        "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
    ] {
        let error = load_error(garbage);
        assert!(
            matches!(
                error,
                AssertionError::NotPem { .. } | AssertionError::InvalidKey { .. }
            ),
            "{garbage:?}: {error:?}"
        );
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(
                !shown.contains(secretish) && !shown.contains("MC4CAQA"),
                "{shown}"
            );
        }
    }
    assert!(matches!(
        AssertionKeys::from_pem::<String>(&[]),
        Err(AssertionError::NoKeys)
    ));
}

#[test]
fn debug_shows_kids_and_algs_but_no_key_material() {
    let secret = fresh_p256_secret();
    let p256_pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let ed_seed = rand::random::<[u8; 32]>();
    let ed_pem = ed25519_dalek::SigningKey::from_bytes(&ed_seed)
        .to_pkcs8_pem(LineEnding::LF)
        .unwrap()
        .to_string();
    let keys = keys(&[&ed_pem, &p256_pem]);
    let shown = format!("{keys:?} {keys:#?}");

    for (kid, alg) in keys.kids() {
        assert!(
            shown.contains(kid) && shown.contains(alg.as_str()),
            "{shown}"
        );
    }
    let secrets = [secret.to_bytes().to_vec(), ed_seed.to_vec()];
    for bytes in &secrets {
        for encoded in [
            hex::encode(bytes),
            URL_SAFE_NO_PAD.encode(bytes),
            format!("{bytes:?}"),
            format!("{:?}", &bytes[..8]),
        ] {
            assert!(!shown.contains(&encoded), "{shown}");
        }
    }
    for line in body_lines(&ed_pem).into_iter().chain(body_lines(&p256_pem)) {
        assert!(!shown.contains(line), "{shown}");
    }
}
