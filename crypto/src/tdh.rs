//! Threshold Diffie–Hellman, confidential to the requester (DESIGN.md §4.6): derivation
//! of per-task credentials and decryption.
//!
//! Input point `P` — `H2C(context)` for derivation (nodes hash the context themselves),
//! or a caller-supplied ECIES ephemeral for decryption — and the requester's ephemeral
//! `A = a·G`. Node `i` draws a fresh `y_i` and returns `C_i = x_i·P + y_i·A`,
//! `Y_i = y_i·G` and a [`LinearProof`]. The coordinator checks every proof before
//! combining with Lagrange: `C = x·P + y·A`, `Y = y·G`. Only the requester can unmask
//! `x·P = C − a·Y`; the coordinator never learns it. The credential is
//! `HKDF-SHA256(ikm = x·P, info = context)`.
//!
//! A key has one purpose: a signing key never answers, a derivation key only derives,
//! a decryption key only decrypts.

use hkdf::Hkdf;
use rand_core::CryptoRng;
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::batch::{BatchVerifier, Form};
use crate::error::{Error, Fault, Result};
use crate::group::{self, Point};
use crate::hash::{self, Transcript};
use crate::keys::{KeyId, KeyPublic, KeyPurpose, KeyShare};
use crate::params::{PartyIndex, PartySet, one_from_each};
use crate::proofs::{LinearForms, LinearProof};
use crate::secret::SecretScalar;
use crate::wire::{Reader, Wire, Writer};

/// Maximum context length.
pub const MAX_CONTEXT: usize = 4096;

/// What the threshold DH is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DhInput {
    /// Derive a credential for this canonical context (nodes compute `P = H2C(context)`).
    Derive {
        /// Canonical, versioned context bytes.
        context: Vec<u8>,
    },
    /// Decrypt: `P` is the ciphertext's ephemeral point.
    Decrypt {
        /// The ECIES ephemeral public key.
        point: Point,
    },
}

impl DhInput {
    fn purpose(&self) -> KeyPurpose {
        match self {
            DhInput::Derive { .. } => KeyPurpose::Derive,
            DhInput::Decrypt { .. } => KeyPurpose::Decrypt,
        }
    }

    /// The input point `P`.
    pub fn point(&self) -> Result<Point> {
        match self {
            DhInput::Derive { context } => {
                if context.is_empty() || context.len() > MAX_CONTEXT {
                    return Err(Error::input(format!(
                        "derivation context must be 1..={MAX_CONTEXT} bytes"
                    )));
                }
                hash::h2c("derive", context)
            }
            DhInput::Decrypt { point } => Ok(*point),
        }
    }
}

/// A request for a threshold DH evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhRequest {
    /// The key.
    pub key_id: KeyId,
    /// The input.
    pub input: DhInput,
    /// The requester's ephemeral public key `A`.
    pub requester: Point,
}

/// One node's masked partial `(C_i, Y_i)` with its proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhPartial {
    /// The node.
    pub index: PartyIndex,
    c: Point,
    y: Point,
    proof: LinearProof,
}

/// The combined, still masked response `(C, Y)`; only the requester can unmask it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhResponse {
    c: Point,
    y: Point,
}

fn proof_context(
    key: &KeyPublic,
    req: &DhRequest,
    p: &Point,
    i: PartyIndex,
    c: &Point,
    y: &Point,
) -> Vec<u8> {
    let mut t = Transcript::new("quorate/tdh/v1");
    t.append("key", &key.key_id.0)
        .u64("epoch", u64::from(key.epoch))
        .u64("purpose", u64::from(key.purpose.to_u8()))
        .point("P", p)
        .point("A", &req.requester)
        .u64("party", u64::from(i.get()))
        .point("C", c)
        .point("Y", y);
    t.digest().to_vec()
}

/// Node `i`: evaluate the masked partial for `req`.
pub fn partial(
    rng: &mut (impl CryptoRng + ?Sized),
    share: &KeyShare,
    req: &DhRequest,
) -> Result<DhPartial> {
    share.public.purpose.require(req.input.purpose())?;
    if req.key_id != share.public.key_id {
        return Err(Error::Refused(crate::error::Refusal::WrongKey));
    }
    let p = req.input.point()?;
    let y = SecretScalar::random(rng);
    let c =
        Point::new(group::mul(&p, share.secret.expose()) + group::mul(&req.requester, y.expose()))
            .ok_or_else(|| Error::input("degenerate input: masked partial is the identity"))?;
    let y_pub = Point::nonzero(y.public_image(), "Y_i is the identity")?;
    let ctx = proof_context(&share.public, req, &p, share.index, &c, &y_pub);
    let proof = LinearProof::prove(rng, &ctx, &p, &req.requester, &share.secret, &y)?;
    Ok(DhPartial {
        index: share.index,
        c,
        y: y_pub,
        proof,
    })
}

/// Coordinator: verify every partial's proof (naming culprits), then combine over the
/// quorum. Nothing is combined unless every proof holds.
pub fn combine(
    rng: &mut (impl CryptoRng + ?Sized),
    key: &KeyPublic,
    req: &DhRequest,
    quorum: &PartySet,
    partials: &[DhPartial],
) -> Result<DhResponse> {
    key.purpose.require(req.input.purpose())?;
    let quorum = key.params.quorum(quorum.clone())?;
    let ordered = one_from_each(partials, &quorum, |p| p.index)?;
    let p = req.input.point()?;
    let mut batch = BatchVerifier::new();
    let first = PartyIndex::new(1).ok_or(Error::Bug("index"))?;
    let xb: Vec<_> = key
        .commitments()
        .eval_terms(first, group::Scalar::ONE)
        .into_iter()
        .map(|(pt, _)| batch.base(pt))
        .collect();
    let (fp, fa) = (Form::point(&p), Form::point(&req.requester));
    for part in &ordered {
        let x = part.index.scalar();
        let mut pow = group::Scalar::ONE;
        let fx = Form::shared(
            xb.iter()
                .map(|b| {
                    let t = (*b, pow);
                    pow *= x;
                    t
                })
                .collect(),
        );
        let (fy, fc) = (Form::point(&part.y), Form::point(&part.c));
        let ctx = proof_context(key, req, &p, part.index, &part.c, &part.y);
        let forms = LinearForms {
            x: &fx,
            y: &fy,
            p: &fp,
            a: &fa,
            c: &fc,
        };
        part.proof
            .verify_into(&ctx, &forms, &mut batch, part.index, Fault::BadDhPartial);
    }
    batch.verify(rng)?;
    let mut c_terms = Vec::with_capacity(ordered.len());
    let mut y_terms = Vec::with_capacity(ordered.len());
    for part in &ordered {
        let l = quorum.lagrange(part.index)?;
        c_terms.push((part.c.projective(), l));
        y_terms.push((part.y.projective(), l));
    }
    let c = Point::new(group::msm(&c_terms)).ok_or(Error::Bug("combined C is the identity"))?;
    let y = Point::new(group::msm(&y_terms)).ok_or(Error::Bug("combined Y is the identity"))?;
    Ok(DhResponse { c, y })
}

/// The requester's ephemeral secret `a`.
pub struct Requester {
    a: SecretScalar,
    public: Point,
}

impl Requester {
    /// A fresh requester key pair.
    pub fn new(rng: &mut (impl CryptoRng + ?Sized)) -> Result<Self> {
        let a = SecretScalar::random(rng);
        let public = Point::nonzero(a.public_image(), "requester key is the identity")?;
        Ok(Requester { a, public })
    }

    /// `A = a·G`, to send in the request.
    pub fn public(&self) -> Point {
        self.public
    }

    /// Unmasks `x·P = C − a·Y`.
    pub fn unmask(&self, resp: &DhResponse) -> Result<SharedPoint> {
        let xp = resp.c.projective() - group::mul(&resp.y, self.a.expose());
        let p = Point::new(xp).ok_or(Error::Bug("unmasked point is the identity"))?;
        Ok(SharedPoint(p.to_bytes()))
    }
}

/// The unmasked `x·P` (compressed). Secret: it is the derivation IKM or the ECIES
/// shared point.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SharedPoint([u8; 33]);

impl SharedPoint {
    /// The compressed encoding.
    pub fn secret_bytes(&self) -> &[u8; 33] {
        &self.0
    }

    #[cfg(feature = "insecure-test-only-key-reconstruction")]
    pub(crate) fn from_point(p: &Point) -> Self {
        SharedPoint(p.to_bytes())
    }
}

impl core::fmt::Debug for SharedPoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SharedPoint(<redacted>)")
    }
}

/// A derived 32-byte credential. Secret.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Credential([u8; 32]);

impl Credential {
    /// The credential bytes.
    pub fn secret_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl core::fmt::Debug for Credential {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

/// `HKDF-SHA256(ikm = x·P, info = context)` (no salt).
pub fn derive_credential(xp: &SharedPoint, context: &[u8]) -> Result<Credential> {
    let mut okm = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(None, &xp.0)
        .expand(context, &mut okm[..])
        .map_err(|_| Error::Bug("HKDF output length"))?;
    Ok(Credential(*okm))
}

// ---- encodings

impl Wire for DhRequest {
    const TAG: u8 = 0x61;
    const NAME: &'static str = "DhRequest";
    fn encode_body(&self, w: &mut Writer) {
        w.fixed(&self.key_id.0);
        match &self.input {
            DhInput::Derive { context } => {
                w.u8(1);
                w.bytes(context);
            }
            DhInput::Decrypt { point } => {
                w.u8(2);
                w.point(point);
            }
        }
        w.point(&self.requester);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        let key_id = KeyId(r.array()?);
        let input = match r.u8()? {
            1 => DhInput::Derive {
                context: r.bytes()?.to_vec(),
            },
            2 => DhInput::Decrypt { point: r.point()? },
            v => return Err(Error::input(format!("DhRequest: unknown input kind {v}"))),
        };
        Ok(DhRequest {
            key_id,
            input,
            requester: r.point()?,
        })
    }
}

impl Wire for DhPartial {
    const TAG: u8 = 0x62;
    const NAME: &'static str = "DhPartial";
    fn encode_body(&self, w: &mut Writer) {
        w.party(self.index);
        w.point(&self.c);
        w.point(&self.y);
        self.proof.encode(w);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(DhPartial {
            index: r.party()?,
            c: r.point()?,
            y: r.point()?,
            proof: LinearProof::decode(r)?,
        })
    }
}

impl Wire for DhResponse {
    const TAG: u8 = 0x63;
    const NAME: &'static str = "DhResponse";
    fn encode_body(&self, w: &mut Writer) {
        w.point(&self.c);
        w.point(&self.y);
    }
    fn decode_body(r: &mut Reader<'_>) -> Result<Self> {
        Ok(DhResponse {
            c: r.point()?,
            y: r.point()?,
        })
    }
}

impl DhPartial {
    /// Test support: corrupts the partial, as a malicious node would.
    #[cfg(any(test, feature = "test-support"))]
    pub fn corrupt(&mut self) {
        if let Some(p) = Point::new(self.c.projective() + p256::ProjectivePoint::GENERATOR) {
            self.c = p;
        }
    }
}
