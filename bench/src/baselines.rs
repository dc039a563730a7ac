//! In-process baselines from other threshold-signature libraries, for comparison with
//! Quorate's protocol phases in the same run (STYLE.md §7).
//!
//! - [`FrostP256`]: FROST(P-256, SHA-256) (RFC 9591) 2-of-3 with the ZF `frost-p256`
//!   crate. FROST produces Schnorr signatures, not ES256 (ECDSA) ones, so it is the
//!   lower bound of what a two-round threshold scheme on the same curve costs, not a
//!   drop-in alternative.
//! - `Cggmp21` (cargo feature `cggmp21`): 2-of-3 threshold ECDSA on secp256r1 with the
//!   LFDT-Lockness `cggmp21` crate, i.e. real ES256 signatures, the closest published
//!   equivalent of Quorate's presign-then-sign flow.
//!
//! Both run every party in this process with no network: messages are handed over in
//! memory (FROST) or through `round_based`'s simulation (cggmp21), without encoding. All
//! randomness comes from a ChaCha20 RNG seeded from the caller's seed (both crates take
//! `rand_core` 0.6 RNGs), so runs are reproducible.
//!
//! Errors are `String`s saying which step failed: these are measurement helpers, and a
//! failure is a bug in the setup or in the library under test.

use std::collections::BTreeMap;

use frost_p256 as frost;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;

/// The signers of both baselines, out of three: Quorate's parties 1 and 2.
const SIGNERS: [u16; 2] = [1, 2];
/// Number of parties holding a share.
const N: u16 = 3;
/// Number of signers needed (2-of-3).
const T: u16 = 2;

/// FROST(P-256, SHA-256) 2-of-3 with the `frost-p256` crate.
///
/// The key comes once, in [`FrostP256::new`], from the crate's trusted-dealer key
/// generation (`keys::generate_with_dealer`): only signing is measured, and FROST's
/// signing cost does not depend on how the shares were made.
pub struct FrostP256 {
    /// Key packages of the two signers, by identifier.
    key_packages: BTreeMap<frost::Identifier, frost::keys::KeyPackage>,
    /// The group's public key package (verifying key and verifying shares).
    pubkeys: frost::keys::PublicKeyPackage,
    /// Seeded RNG for the round-1 nonces.
    rng: ChaCha20Rng,
}

/// Round-1 output of both signers and the signing package for one message, made by
/// [`FrostP256::prepare`] and consumed (by value: nonces are single-use) by
/// [`FrostP256::sign_prepared`].
pub struct FrostPrepared {
    /// Each signer's secret nonces.
    nonces: BTreeMap<frost::Identifier, frost::round1::SigningNonces>,
    /// The commitments of both signers and the message, as the coordinator sends them.
    signing_package: frost::SigningPackage,
}

impl FrostP256 {
    /// Deals a fresh 2-of-3 key with the RNG seeded from `seed` and keeps the key
    /// packages of signers 1 and 2.
    pub fn new(seed: u64) -> Result<Self, String> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let (shares, pubkeys) =
            frost::keys::generate_with_dealer(N, T, frost::keys::IdentifierList::Default, &mut rng)
                .map_err(|e| format!("frost-p256 trusted-dealer keygen: {e}"))?;
        let mut key_packages = BTreeMap::new();
        for j in SIGNERS {
            let id = frost_id(j)?;
            let share = shares
                .get(&id)
                .ok_or_else(|| format!("frost-p256 keygen returned no share for signer {j}"))?;
            let key_package = frost::keys::KeyPackage::try_from(share.clone())
                .map_err(|e| format!("frost-p256 key package of signer {j}: {e}"))?;
            key_packages.insert(id, key_package);
        }
        Ok(FrostP256 {
            key_packages,
            pubkeys,
            rng,
        })
    }

    /// Full signing of `msg` by signers 1 and 2: round-1 commitments of both, the
    /// signing package, round-2 signature shares of both, and aggregation (which
    /// verifies the group signature against the group key).
    pub fn sign(&mut self, msg: &[u8]) -> Result<(), String> {
        let prepared = self.prepare(msg)?;
        self.sign_prepared(prepared)
    }

    /// The offline part of [`FrostP256::sign`]: round-1 nonces and commitments of both
    /// signers, and the signing package binding them to `msg`.
    pub fn prepare(&mut self, msg: &[u8]) -> Result<FrostPrepared, String> {
        let mut nonces = BTreeMap::new();
        let mut commitments = BTreeMap::new();
        for (id, key_package) in &self.key_packages {
            let (n, c) = frost::round1::commit(key_package.signing_share(), &mut self.rng);
            nonces.insert(*id, n);
            commitments.insert(*id, c);
        }
        Ok(FrostPrepared {
            nonces,
            signing_package: frost::SigningPackage::new(commitments, msg),
        })
    }

    /// The online part of [`FrostP256::sign`]: round-2 signature shares of both signers
    /// and aggregation (which verifies the group signature).
    pub fn sign_prepared(&mut self, p: FrostPrepared) -> Result<(), String> {
        let mut shares = BTreeMap::new();
        for (id, nonces) in &p.nonces {
            let key_package = self
                .key_packages
                .get(id)
                .ok_or("frost-p256: prepared nonces for an unknown signer")?;
            let share = frost::round2::sign(&p.signing_package, nonces, key_package)
                .map_err(|e| format!("frost-p256 round 2: {e}"))?;
            shares.insert(*id, share);
        }
        frost::aggregate(&p.signing_package, &shares, &self.pubkeys)
            .map_err(|e| format!("frost-p256 aggregate (verifies the signature): {e}"))?;
        Ok(())
    }
}

/// The FROST identifier of party `j` (1-based, as `IdentifierList::Default` numbers them).
fn frost_id(j: u16) -> Result<frost::Identifier, String> {
    frost::Identifier::try_from(j).map_err(|e| format!("frost-p256 identifier {j}: {e}"))
}

#[cfg(feature = "cggmp21")]
pub use self::cggmp::Cggmp21;

/// The cggmp21 baseline; see [`Cggmp21`].
#[cfg(feature = "cggmp21")]
mod cggmp {
    use cggmp21::generic_ec::{Point, Scalar};
    use cggmp21::round_based::sim;
    use cggmp21::rug::Integer;
    use cggmp21::security_level::SecurityLevel128;
    use cggmp21::supported_curves::Secp256r1;
    use cggmp21::{
        DataToSign, ExecutionId, KeyShare, PartialSignature, PregeneratedPrimes, Signature,
    };
    use rand_chacha::ChaCha20Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    use super::{N, SIGNERS, T};

    /// cggmp21 2-of-3 threshold ECDSA on secp256r1 (ES256), every party in this process.
    ///
    /// [`Cggmp21::new`] runs the crate's real threshold key generation and auxiliary-info
    /// generation (Paillier keys with their ZK proofs) between the three parties, through
    /// `round_based`'s in-memory simulation. The one shortcut: the Paillier safe primes
    /// are pregenerated (see [`SAFE_PRIMES`]), as the crate's own tests and benchmarks
    /// do, because generating six 1536-bit safe primes takes minutes and is not what is
    /// measured. No trusted dealer and no `spof` feature are used.
    ///
    /// [`Cggmp21::presign_and_sign`] is the measured part: the (3+1)-round threshold
    /// presigning protocol between parties 1 and 2, then one partial signature from each,
    /// combined and verified.
    pub struct Cggmp21 {
        /// Completed key shares of the three parties, by cggmp21 index (0-based).
        shares: Vec<KeyShare<Secp256r1, SecurityLevel128>>,
        /// The group's public key.
        public_key: Point<Secp256r1>,
        /// Source of the per-party RNGs.
        rng: ChaCha20Rng,
        /// Counter making each presigning's execution id unique, as the protocol
        /// requires.
        executions: u64,
    }

    impl Cggmp21 {
        /// Threshold key generation and auxiliary-info generation for three parties,
        /// with RNGs derived from `seed` and the pregenerated Paillier primes.
        pub fn new(seed: u64) -> Result<Self, String> {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);

            let eid_bytes = format!("quorate-bench cggmp21 keygen seed={seed}");
            let eid = ExecutionId::new(eid_bytes.as_bytes());
            let rngs: Vec<ChaCha20Rng> = (0..N).map(|_| fork(&mut rng)).collect();
            let incomplete = sim::run_with_setup(rngs, |i, party, mut rng| async move {
                cggmp21::keygen::<Secp256r1>(eid, i, N)
                    .set_threshold(T)
                    .start(&mut rng, party)
                    .await
            })
            .map_err(|e| format!("cggmp21 keygen simulation: {e}"))?
            .into_vec()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cggmp21 keygen: {e}"))?;

            let primes = pregenerated_primes()?;
            let eid_bytes = format!("quorate-bench cggmp21 aux info seed={seed}");
            let eid = ExecutionId::new(eid_bytes.as_bytes());
            let setups: Vec<_> = primes.into_iter().map(|p| (fork(&mut rng), p)).collect();
            let aux = sim::run_with_setup(setups, |i, party, (mut rng, primes)| async move {
                cggmp21::aux_info_gen(eid, i, N, primes)
                    .start(&mut rng, party)
                    .await
            })
            .map_err(|e| format!("cggmp21 aux info simulation: {e}"))?
            .into_vec()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cggmp21 aux info generation: {e}"))?;

            let shares = incomplete
                .into_iter()
                .zip(aux)
                .map(|parts| {
                    KeyShare::from_parts(parts).map_err(|e| format!("cggmp21 key share: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let public_key = *shares
                .first()
                .ok_or("cggmp21 keygen returned no key share")?
                .shared_public_key;
            Ok(Cggmp21 {
                shares,
                public_key,
                rng,
                executions: 0,
            })
        }

        /// Presigning between parties 1 and 2 (cggmp21 indices 0 and 1) in the
        /// simulation, then a partial signature of `SHA-256(msg)` from each on the fresh
        /// presignature, combined and verified against the group key.
        pub fn presign_and_sign(&mut self, msg: &[u8]) -> Result<(), String> {
            self.signature(msg).map(|_| ())
        }

        /// [`Cggmp21::presign_and_sign`], returning the verified signature.
        fn signature(&mut self, msg: &[u8]) -> Result<Signature<Secp256r1>, String> {
            let signers: Vec<u16> = SIGNERS.iter().map(|j| j - 1).collect();
            let setups: Vec<_> = signers
                .iter()
                .map(|&k| {
                    let share = self
                        .shares
                        .get(usize::from(k))
                        .ok_or_else(|| format!("cggmp21: no key share for index {k}"))?;
                    Ok((fork(&mut self.rng), share))
                })
                .collect::<Result<_, String>>()?;
            self.executions += 1;
            let eid_bytes = format!("quorate-bench cggmp21 presign {}", self.executions);
            let eid = ExecutionId::new(eid_bytes.as_bytes());
            let signers = &signers;
            let presigs = sim::run_with_setup(setups, |i, party, (mut rng, share)| async move {
                cggmp21::signing(eid, i, signers, share)
                    .generate_presignature(&mut rng, party)
                    .await
            })
            .map_err(|e| format!("cggmp21 presign simulation: {e}"))?
            .into_vec()
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("cggmp21 presign: {e}"))?;

            let data = data_to_sign(msg)?;
            let partials: Vec<_> = presigs
                .into_iter()
                .map(|p| p.issue_partial_signature(data))
                .collect();
            let sig = PartialSignature::combine(&partials)
                .ok_or("cggmp21: partial signatures do not combine")?;
            sig.verify(&self.public_key, &data)
                .map_err(|e| format!("cggmp21 signature does not verify: {e}"))?;
            Ok(sig)
        }
    }

    /// ECDSA's message representative for ES256: `SHA-256(msg)` as a big-endian integer
    /// reduced modulo the group order (hashed with aws-lc-rs, as Quorate's coordinator
    /// does).
    fn data_to_sign(msg: &[u8]) -> Result<DataToSign<Secp256r1>, String> {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, msg);
        Ok(DataToSign::from_scalar(Scalar::from_be_bytes_mod_order(
            d.as_ref(),
        )))
    }

    /// A fresh RNG for one party, seeded from `rng`.
    fn fork(rng: &mut ChaCha20Rng) -> ChaCha20Rng {
        let mut seed = <ChaCha20Rng as SeedableRng>::Seed::default();
        rng.fill_bytes(&mut seed);
        ChaCha20Rng::from_seed(seed)
    }

    /// The Paillier primes of the three parties, parsed from [`SAFE_PRIMES`].
    fn pregenerated_primes() -> Result<Vec<PregeneratedPrimes<SecurityLevel128>>, String> {
        SAFE_PRIMES
            .iter()
            .map(|[p, q]| {
                let p = parse_hex(p)?;
                let q = parse_hex(q)?;
                PregeneratedPrimes::new(p, q)
                    .ok_or_else(|| "cggmp21: a pregenerated prime is too short".to_owned())
            })
            .collect()
    }

    /// A big-endian hexadecimal integer.
    fn parse_hex(hex: &str) -> Result<Integer, String> {
        Integer::from_str_radix(hex, 16).map_err(|e| format!("cggmp21: bad prime hex: {e}"))
    }

    /// Three pairs of 1536-bit safe primes (`p` and `(p - 1) / 2` both prime), one pair
    /// per party, for the Paillier and ring-Pedersen moduli of auxiliary-info generation
    /// at `SecurityLevel128`.
    ///
    /// Made once with `PregeneratedPrimes::generate` (fast-paillier's safe-prime search)
    /// from `ChaCha20Rng::seed_from_u64(0x5155_4f52_4154_4521)`; the test
    /// `pregenerated_primes_are_safe_primes` checks them. Fixed primes cost nothing in
    /// the measurement: presigning's cost depends on the moduli's size, not their value.
    /// Never use them outside a benchmark: they are public.
    const SAFE_PRIMES: [[&str; 2]; 3] = [
        [
            concat!(
                "a842cba756dfd269759f9815e04a1878cdf105377c2942aeec7964a0b31b23ef108166b35160f470",
                "d860884c30cc11c06cb02ffeafe132c77d61b9e8597a7de6bc8c527ac129a8906338f2dd2f7b043f",
                "78c137f3439dc7795d62443f7791d5100dddafbcf1fb1bbe61ab55fb0e9cb6ff37d50452b8c1ded4",
                "bb56dfd25a3dc0a9d7ae99745924da872304619a56ec37d81c27856b8c088f671ee952b6ea292708",
                "b3ec9b2e41e397d14a234d84ecda92add1447a7b085e7073c0554f6d415f4d4b",
            ),
            concat!(
                "d88e93a746c776b6b055b4a219af9a85eb62661c1e40c3d484e21b434681b854d25b5d372e051340",
                "ad74faddc6699d74c7f92415900e61c76bcf0ba66ca2899d1c2b6baa40e28f0811f8884be1265acf",
                "d9e8570df79a716172c2dfac175b5ad72c3379bf40baf4a6fa2d71e4dd943b1f06d3ad530ec62227",
                "2a63c3d7a347f01db9359cf409ad68121c2c8c36edd1fdbc6acdc8db7445273af44bae84f2fe66a3",
                "b3f9786363a8f175bdba91378c6ede6c79043cb69948dd513249e8d14817b6c7",
            ),
        ],
        [
            concat!(
                "c90cec1d0a97e6afcf7dcc67e61eaada8f832e5fd21d7b1bf2c4b80ff46949e792bbd5a61d7622aa",
                "29ff50960daf4a8de5c3bc4ec3ed8083f02ea9754fa3d616ff800d67ff835e023acd1b0a1af410d9",
                "ebad57f4f3948e83f43b73527fc6ffdfed4eaa31e3ff5d7cb770186ecd8d762e047581f8ca7b70f3",
                "035f824243d6e46c5a6dc9ec0300a23ea9f9654d0cc6ca964b210bebf3592aea8192bf6d74c080ac",
                "cf1afdeb99cba09cb59efe8c2472c5df2220c97169e2fb1428ab122cf5eb58af",
            ),
            concat!(
                "fdd103b5d4d0adf871856c6317e6b05d1523d16787b80bdefa995f1cd297a62ef1612f7971b28f77",
                "1b309faf25ac7a00933827865ffc2b6514ba8878aa16d4b817042461674cc755fba6323ea01131d8",
                "86c88cf469c73534f79feab146ed96c139347884900d43e5ec25e3b52909309dd1513b8e6f34cde4",
                "5a4d27e1e11e18f35fa0d3416e5fc42e437e6bcfc1d7e964282b219d665964e688763166c795c157",
                "4257b28efb593468015e7b68108a321f865e36ee245f92e64f6ab442cfc6254b",
            ),
        ],
        [
            concat!(
                "913eb05bc8dd56dc8c180134586ae94a38a8eaa301ca3493c604b30efaa918962ae42bf8b21d9de6",
                "9fb291e0d207a02163a4caa5b7135d062811c392d87cdfa959061c3da8d3abd291fd7cd68dd62f6b",
                "62a599ab3a6dc32787a78a325da42708b0336e1993f2af75f6de3cfd1caf2842873d202625c98151",
                "4155cf8a911bcd779bdb32772029b6df838b56aac6a840dbd8e66fc1a16df001ca3af16bd0a57924",
                "659a2cb3e1504c29a5821e53b0b3455fb2b11a39517321742248571f619b4ff3",
            ),
            concat!(
                "e0099299f83f8efb115dc1953143d177735bcb22e3bd40862fb6ab0a5609f58bcaaba4ebbc31e1ab",
                "265d3fe0aafae7b666adb2aa600f29c8cd43b99a2e4f6c99440e53da47bb0c8dc817edb27104da59",
                "9284f2b84ce1103c954281d50c52f1ee717e18c1be1f0af19d87457da9f797a6bd1968f59bad1f88",
                "f24b629e6cfa14f5d970cdea8d6fd70c0d9f5160af4126de0b5a4f2d193b58d5c6c544d2c0440907",
                "2a888ecdbf3df760f3d51a38f3c61db212af92ee07898de2b2642e4356e81653",
            ),
        ],
    ];

    #[cfg(test)]
    mod tests {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
        use cggmp21::rug::integer::IsPrime;

        use super::*;

        #[test]
        fn pregenerated_primes_are_safe_primes() {
            let all: Vec<Integer> = SAFE_PRIMES
                .iter()
                .flatten()
                .map(|h| parse_hex(h).unwrap())
                .collect();
            for (k, p) in all.iter().enumerate() {
                assert_eq!(p.significant_bits(), 1536, "prime {k}");
                assert_ne!(p.is_probably_prime(30), IsPrime::No, "prime {k}");
                let half = Integer::from(p - 1u32) >> 1u32;
                assert_ne!(
                    half.is_probably_prime(30),
                    IsPrime::No,
                    "(p-1)/2 of prime {k}"
                );
                assert!(all.iter().skip(k + 1).all(|q| q != p), "prime {k} repeats");
            }
            assert_eq!(pregenerated_primes().unwrap().len(), usize::from(N));
        }

        /// Each signature verifies with cggmp21 (inside `signature`) and with aws-lc-rs
        /// as an independent ES256 verifier, and only for its own message.
        #[test]
        fn presign_and_sign_verifies_independently() {
            let seed = 0x5155_4f52_4154_4521_u64;
            eprintln!("cggmp21 baseline seed: {seed:#x}");
            let mut c = Cggmp21::new(seed).unwrap();
            let public_key = c.public_key.to_bytes(false);
            let verifier = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key.as_bytes());
            let message = crate::message();
            for msg in [&b""[..], b"header.payload", &message] {
                let sig = c.signature(msg).unwrap();
                let mut rs = [0u8; 64];
                assert_eq!(Signature::<Secp256r1>::serialized_len(), rs.len());
                sig.write_to_slice(&mut rs);
                verifier.verify(msg, &rs).unwrap();
                assert!(verifier.verify(b"another message", &rs).is_err());
            }
            c.presign_and_sign(&message).unwrap();
            assert_eq!(c.executions, 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frost_signs_several_messages() {
        let mut f = FrostP256::new(1).unwrap();
        let message = crate::message();
        for msg in [&b""[..], b"header.payload", &message] {
            f.sign(msg).unwrap();
        }
    }

    #[test]
    fn frost_prepared_path_signs() {
        let mut f = FrostP256::new(2).unwrap();
        let prepared: Vec<_> = (0..3u8).map(|i| f.prepare(&[i; 32]).unwrap()).collect();
        // Used in another order than prepared: each carries its own nonces and message.
        for p in prepared.into_iter().rev() {
            f.sign_prepared(p).unwrap();
        }
    }

    /// The aggregate signature is a valid RFC 9591 signature under the group key, and
    /// a signing package for one message does not yield a signature on another.
    #[test]
    fn frost_signature_binds_the_message() {
        let mut f = FrostP256::new(3).unwrap();
        let p = f.prepare(b"one").unwrap();
        let shares: BTreeMap<_, _> = p
            .nonces
            .iter()
            .map(|(id, n)| {
                let kp = &f.key_packages[id];
                (*id, frost::round2::sign(&p.signing_package, n, kp).unwrap())
            })
            .collect();
        let sig = frost::aggregate(&p.signing_package, &shares, &f.pubkeys).unwrap();
        let vk = f.pubkeys.verifying_key();
        vk.verify(b"one", &sig).unwrap();
        assert!(vk.verify(b"two", &sig).is_err());
    }

    #[test]
    fn frost_same_seed_same_key() {
        let a = FrostP256::new(7).unwrap();
        let b = FrostP256::new(7).unwrap();
        let c = FrostP256::new(8).unwrap();
        assert_eq!(a.pubkeys.verifying_key(), b.pubkeys.verifying_key());
        assert_ne!(a.pubkeys.verifying_key(), c.pubkeys.verifying_key());
    }
}
