//! The operations `quorate-bench` drives: against a cluster (token issuance through the
//! public API, raw signing, derivation, a bare gRPC round trip) and in process (the
//! single-key JWT baseline, Quorate's online signing and presign+sign through the
//! simulation, and the FROST / cggmp21 baselines).

use std::sync::Arc;

use quorate_cli::dev_issuer;
use quorate_client::{Client, Format, KeyPurpose, SignInput, TokenRequest};
use quorate_coordinator::identity::token::{self, AccessClaims, AttestationClaim};
use quorate_crypto::sign;

use crate::load::Worker;
use crate::local::Target;
use crate::{SignFixture, rng};

/// The audience, scope and lifetime of benchmarked tokens (what the dev policy allows).
pub const TOKEN_AUDIENCE: &str = "dev";
/// Scope asked for.
pub const TOKEN_SCOPE: &str = "tools:run";
/// Lifetime asked for, seconds.
pub const TOKEN_TTL: u32 = 300;

/// The derivation key the `derive` operation uses (created if missing).
pub const DERIVE_KEY: &str = "bench-derive";

/// The signing key of `sign` (the one `quorate dev` makes).
pub const SIGN_KEY: &str = quorate_cli::dev::DEFAULT_KEY;

/// A 32-byte digest that differs per operation (each signature uses its own digest).
pub fn digest_for(i: u64) -> [u8; 32] {
    let mut input = crate::message().to_vec();
    input.extend_from_slice(&i.to_be_bytes());
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The token request of the `token` operation: an attestation from the dev issuer of a
/// local cluster, or the file named by `QUORATE_BENCH_ATTESTATION`.
pub fn token_request(target: &Target) -> Result<TokenRequest, String> {
    let attestation = match std::env::var_os("QUORATE_BENCH_ATTESTATION") {
        Some(path) => std::fs::read_to_string(&path)
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("QUORATE_BENCH_ATTESTATION {}: {e}", path.to_string_lossy()))?,
        None => {
            let dir = target.dir.as_deref().ok_or_else(|| {
                "token issuance needs an attestation: set QUORATE_BENCH_ATTESTATION to a JWT file, \
                 or QUORATE_BENCH_DIR to the `quorate dev` directory of the target"
                    .to_owned()
            })?;
            dev_issuer::attest(dir, &target.domain, "bench-agent", &[], 3600)
                .map_err(|e| format!("cannot make a dev attestation: {e}"))?
        }
    };
    Ok(TokenRequest {
        attestation,
        audience: TOKEN_AUDIENCE.to_owned(),
        scopes: vec![TOKEN_SCOPE.to_owned()],
        ttl_seconds: TOKEN_TTL,
        task_id: None,
        ..TokenRequest::default()
    })
}

/// One token through `IssueToken`; checks that a compact JWS came back.
pub async fn issue_token(client: Client, req: Arc<TokenRequest>) -> Result<(), String> {
    let reply = client
        .issue_token((*req).clone())
        .await
        .map_err(|e| e.to_string())?;
    if reply.access_token.split('.').count() == 3 {
        Ok(())
    } else {
        Err("IssueToken returned something other than a compact JWS".to_owned())
    }
}

/// One raw signature of a fresh digest with [`SIGN_KEY`].
pub async fn sign(client: Client, i: u64) -> Result<(), String> {
    client
        .sign(SIGN_KEY, SignInput::Digest(digest_for(i)), Format::Raw)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The label (key name) of the token the PKCS#11 module offers for a cluster named by
/// the `QUORATE_*` variables.
pub const PKCS11_TOKEN: &str = "quorate";

/// A worker that signs fresh digests of [`SIGN_KEY`] with `CKM_ECDSA` through the PKCS#11
/// module `pkcs11` (initialised by the caller), in a session of its own.
pub fn pkcs11_worker(pkcs11: &cryptoki::context::Pkcs11) -> Result<Worker, String> {
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, ObjectClass};
    let slot = pkcs11
        .get_slots_with_token()
        .map_err(|e| format!("C_GetSlotList: {e}"))?
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .is_ok_and(|t| t.label() == PKCS11_TOKEN)
        })
        .ok_or_else(|| format!("the module has no token labelled {PKCS11_TOKEN}"))?;
    let session = pkcs11
        .open_ro_session(slot)
        .map_err(|e| format!("C_OpenSession: {e}"))?;
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(SIGN_KEY.as_bytes().to_vec()),
        ])
        .map_err(|e| format!("C_FindObjects: {e}"))?
        .into_iter()
        .next()
        .ok_or_else(|| format!("no private key labelled {SIGN_KEY} on the token"))?;
    Ok(Box::new(move |i| {
        let sig = session
            .sign(&Mechanism::Ecdsa, key, &digest_for(i))
            .map_err(|e| format!("C_Sign: {e}"))?;
        if sig.len() == 64 {
            Ok(())
        } else {
            Err(format!("C_Sign returned {} bytes, not r || s", sig.len()))
        }
    }))
}

/// One confidential derivation with [`DERIVE_KEY`] for a per-operation context.
pub async fn derive(client: Client, i: u64) -> Result<(), String> {
    let context = format!("bench/credential/{i}");
    client
        .derive(DERIVE_KEY, context.as_bytes())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Creates [`DERIVE_KEY`] unless it exists.
pub async fn ensure_derive_key(client: &Client) -> Result<(), String> {
    let keys = client.list_keys().await.map_err(|e| e.to_string())?;
    if keys.iter().any(|k| k.name == DERIVE_KEY) {
        return Ok(());
    }
    client
        .create_key(DERIVE_KEY, KeyPurpose::Derive)
        .await
        .map(|_| ())
        .map_err(|e| format!("cannot create the derivation key {DERIVE_KEY}: {e}"))
}

/// One bare unary round trip (gRPC health check) on the same PQ mTLS channel.
pub async fn ping(client: Client) -> Result<(), String> {
    client.ping().await.map_err(|e| e.to_string())
}

/// Baseline 1: the single-key ES256 JWT, made as the coordinator makes its tokens (same
/// claims, same encoder: [`token::signing_input`] and [`token::assemble`]) but signed by
/// one aws-lc-rs key in this process.
pub fn jwt_worker(w: usize) -> Result<Worker, String> {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    let system = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &system)
        .map_err(|_| "aws-lc-rs could not generate a P-256 key".to_owned())?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|_| "aws-lc-rs rejected its own P-256 key".to_owned())?;
    let mut rng = rng(0x4a57_0000 + w as u64);
    Ok(Box::new(move |_| {
        let now = quorate_coordinator::identity::now();
        let claims = AccessClaims {
            iss: "https://localhost:7443".to_owned(),
            sub: "spiffe://quorate.local/agent/dev/bench-agent".to_owned(),
            aud: TOKEN_AUDIENCE.to_owned(),
            client_id: "spiffe://quorate.local/agent/dev/bench-agent".to_owned(),
            iat: now,
            nbf: now,
            exp: now + i64::from(TOKEN_TTL),
            jti: token::new_jti(&mut rng),
            scope: TOKEN_SCOPE.to_owned(),
            task_id: None,
            attestation: AttestationClaim {
                iss: "https://dev.quorate.local".to_owned(),
                sub: "bench-agent".to_owned(),
                method: "oidc".to_owned(),
            },
            act: None,
            cnf: None,
        };
        let input = token::signing_input("tokens-v1-0123456789abcdef", &claims)?;
        let sig = key
            .sign(&system, input.as_bytes())
            .map_err(|_| "aws-lc-rs signing failed".to_owned())?;
        let raw: [u8; 64] = sig
            .as_ref()
            .try_into()
            .map_err(|_| "aws-lc-rs returned a signature that is not 64 bytes".to_owned())?;
        let jws = token::assemble(&input, &raw);
        std::hint::black_box(jws);
        Ok(())
    }))
}

/// Quorate's online signing in process, `(n, t)`: the `t + 1` nodes' signing steps and the
/// coordinator's combine (with its verification) for a fresh digest each time. The
/// signing steps are pure, so one unused presignature serves every iteration at exactly
/// the cost of a fresh one (the node's durable bookkeeping is not part of this figure).
pub fn online_worker(n: u16, t: u16, w: usize) -> Result<Worker, String> {
    let fixture = SignFixture::new(n, t, 1).map_err(|e| e.to_string())?;
    let mut rng = rng(0x0411_0000 + w as u64);
    Ok(Box::new(move |i| {
        let mut req = fixture.request();
        req.digest = digest_for(i);
        let shares = fixture
            .signers()
            .iter()
            .map(|&j| fixture.sign_step(j, &req))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let sig = sign::combine(
            &mut rng,
            &fixture.key,
            &fixture.presig,
            &req.digest,
            &shares,
        )
        .map_err(|e| e.to_string())?;
        std::hint::black_box(sig);
        Ok(())
    }))
}

/// Presignatures per in-process presign+sign operation.
pub const PRESIGN_BATCH: u32 = 32;

/// Quorate's presign + sign in process, `(n, t)`: one operation is a presigning session
/// of [`PRESIGN_BATCH`] (every party's rounds) and the online signing of every
/// presignature it made. Rates are reported per signature (the operation rate times the
/// batch).
pub fn presign_sign_worker(n: u16, t: u16, w: usize) -> Result<Worker, String> {
    use quorate_crypto::keys::KeyPurpose as P;
    use quorate_crypto::sim::Attack;
    let mut cluster = crate::cluster(n, t).map_err(|e| e.to_string())?;
    let key = cluster
        .dkg(P::Sign, Attack::None)
        .map_err(|e| e.to_string())?;
    let mut rng = rng(0x9e51_0000 + w as u64);
    Ok(Box::new(move |i| {
        let presigs = cluster
            .presign(
                key.key_id,
                &crate::mset(t),
                &crate::sset(t),
                PRESIGN_BATCH,
                Attack::None,
            )
            .map_err(|e| e.to_string())?;
        for (k, presig) in presigs.iter().enumerate() {
            let digest = digest_for(i.wrapping_mul(1024) + k as u64);
            let req = sign::SignRequest {
                key_id: key.key_id,
                presig_id: presig.id,
                sset: presig.sset.clone(),
                digest,
            };
            let mut shares = Vec::new();
            for &j in presig.sset.members() {
                let node = cluster
                    .nodes
                    .iter_mut()
                    .find(|node| node.index == j)
                    .ok_or("a signer is missing from the simulation")?;
                let record = node
                    .presigs
                    .remove(&presig.id)
                    .ok_or("a signer lacks the presignature")?;
                let step = sign::sign_step(&key, &record, &req).map_err(|e| e.to_string())?;
                shares.push(step.share);
            }
            let sig = sign::combine(&mut rng, &key, presig, &digest, &shares)
                .map_err(|e| e.to_string())?;
            std::hint::black_box(sig);
        }
        cluster.pools.clear();
        Ok(())
    }))
}

/// Baseline 3: FROST(P-256, SHA-256) 2-of-3, both rounds and the aggregate.
pub fn frost_worker(w: usize) -> Result<Worker, String> {
    let mut frost = crate::baselines::FrostP256::new(0xf905 + w as u64)?;
    Ok(Box::new(move |i| frost.sign(&digest_for(i))))
}
