//! Node-side key-usage rules for token-signing keys (DESIGN.md §4.5: "applies node-side
//! key-usage rules, e.g. for token keys: parse the JWS payload, `exp − iat <= max_ttl`,
//! `iss` matches").
//!
//! A node keeps the [`TokenRules`] it received when a key was created (`store.rs`, table
//! `token_rules`) and, before it consumes a presignature for such a key, checks the JWS
//! signing input the coordinator sent with the request ([`check`]). The check is pure:
//! the caller supplies the time.
//!
//! Choices beyond the rules themselves, made so that what the node checks is what every
//! verifier will read:
//! - the signing input is exactly `BASE64URL(header) "." BASE64URL(payload)`, unpadded,
//!   canonical base64url (RFC 7515 §2, §7.1), at most [`MAX_SIGNING_INPUT`] bytes;
//! - header and payload are JSON objects with no member name twice, at any depth
//!   ([`quorate_proto::json::parse_object_unique`]; RFC 7515 §5.2 lets parsers pick
//!   either duplicate, so a duplicate `iss` or `exp` would let the node and a verifier
//!   read different tokens);
//! - the header must not carry `crit` or `b64`: an extension such as RFC 7797's unencoded
//!   payload would change what the payload bytes mean;
//! - `alg` is exactly `ES256`, `typ` and `iss` compare exactly (no case folding);
//!   `iat`, `exp` and `nbf` are JSON integers (RFC 7519 NumericDate without fractions).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use quorate_proto::profile::CHECKPOINT_TYP;
pub use quorate_proto::rules::TokenRules;
use quorate_proto::rules::{CLOCK_SKEW_SECONDS, MAX_SIGNING_INPUT};
use serde_json::{Map, Value};

fn part(name: &str, b64: &str) -> Result<Map<String, Value>, String> {
    if b64.is_empty() {
        return Err(format!("the JWS {name} is empty"));
    }
    let raw = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|e| format!("the JWS {name} is not unpadded, canonical base64url ({e})"))?;
    quorate_proto::json::parse_object_unique(&raw)
        .map_err(|e| format!("the JWS {name} is not a JSON object with unique member names: {e}"))
}

fn exact_string<'a>(
    obj: &'a Map<String, Value>,
    part: &str,
    field: &str,
) -> Result<&'a str, String> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("the JWS {part}'s \"{field}\" is not a string")),
        None => Err(format!("the JWS {part} has no \"{field}\"")),
    }
}

fn integer(obj: &Map<String, Value>, field: &str) -> Result<Option<i64>, String> {
    match obj.get(field) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            format!("the token's \"{field}\" must be an integer number of seconds since the epoch, got {v}")
        }),
    }
}

/// A JSON object (a JWS header or payload).
type JsonObject = Map<String, Value>;

/// The header and payload of a JWS signing input that is at most [`MAX_SIGNING_INPUT`]
/// bytes, hashes (SHA-256) to `digest`, and is exactly `BASE64URL(header) "."
/// BASE64URL(payload)` with JSON objects of unique member names on both sides.
fn header_and_payload(
    signing_input: &[u8],
    digest: &[u8; 32],
) -> Result<(JsonObject, JsonObject), String> {
    if signing_input.len() > MAX_SIGNING_INPUT {
        return Err(format!(
            "the signing input is {} bytes; a JWS signing input may be at most {MAX_SIGNING_INPUT} bytes",
            signing_input.len()
        ));
    }
    if quorate_crypto::hash::sha256(signing_input) != *digest {
        return Err(
            "the signing input does not hash (SHA-256) to the digest the request signs".into(),
        );
    }
    let text = std::str::from_utf8(signing_input)
        .map_err(|_| "the signing input is not ASCII text".to_string())?;
    let mut parts = text.split('.');
    let (Some(h), Some(p), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!(
            "the signing input must be BASE64URL(header).BASE64URL(payload) with exactly one '.', found {}",
            text.matches('.').count()
        ));
    };
    Ok((part("header", h)?, part("payload", p)?))
}

/// Checks that `signing_input` is a JWS signing input that `rules` allow at time
/// `now_unix`, and that it is what the request signs: `SHA-256(signing_input) == digest`.
/// Returns the token's claims (for the evidence check). The error is a sentence naming
/// the field and the numbers at fault.
pub fn check(
    rules: &TokenRules,
    signing_input: &[u8],
    digest: &[u8; 32],
    now_unix: i64,
) -> Result<Map<String, Value>, String> {
    let (header, payload) = header_and_payload(signing_input, digest)?;

    let alg = exact_string(&header, "header", "alg")?;
    if alg != "ES256" {
        return Err(format!(
            "the JWS header's alg is \"{}\"; this key signs only ES256",
            alg.escape_debug()
        ));
    }
    let typ = exact_string(&header, "header", "typ")?;
    if typ != rules.typ() {
        return Err(format!(
            "the JWS header's typ is \"{}\"; this key signs only typ \"{}\" (exact match)",
            typ.escape_debug(),
            rules.typ().escape_debug()
        ));
    }
    for ext in ["crit", "b64"] {
        if header.contains_key(ext) {
            return Err(format!(
                "the JWS header carries \"{ext}\"; this key signs no JWS extensions"
            ));
        }
    }

    let iss = exact_string(&payload, "payload", "iss")?;
    if iss != rules.issuer() {
        return Err(format!(
            "the token's iss is \"{}\"; this key signs only tokens of issuer \"{}\"",
            iss.escape_debug(),
            rules.issuer().escape_debug()
        ));
    }
    let iat = integer(&payload, "iat")?.ok_or("the token has no \"iat\" (issued-at time)")?;
    let exp = integer(&payload, "exp")?.ok_or("the token has no \"exp\" (expiry time)")?;
    let nbf = integer(&payload, "nbf")?;

    // i128: no input can overflow the arithmetic below.
    let (iat, exp, now) = (i128::from(iat), i128::from(exp), i128::from(now_unix));
    let max_ttl = i128::from(rules.max_ttl_seconds());
    let skew = i128::from(CLOCK_SKEW_SECONDS);
    if exp <= iat {
        return Err(format!("exp ({exp}) is not after iat ({iat})"));
    }
    if exp - iat > max_ttl {
        return Err(format!(
            "exp - iat = {} s exceeds this key's maximum token lifetime of {max_ttl} s",
            exp - iat
        ));
    }
    if iat > now + skew {
        return Err(format!(
            "iat ({iat}) is {} s in the future; at most {skew} s of clock skew is allowed",
            iat - now
        ));
    }
    // Implied by the two checks above (exp <= iat + max_ttl <= now + skew + max_ttl);
    // kept as the literal statement of the rule, in case either ever changes.
    if exp > now + max_ttl + skew {
        return Err(format!(
            "exp ({exp}) is {} s from now, beyond this key's maximum token lifetime of {max_ttl} s plus {skew} s of clock skew",
            exp - now
        ));
    }
    if let Some(nbf) = nbf.map(i128::from) {
        if nbf < iat - skew {
            return Err(format!(
                "nbf ({nbf}) is {} s before iat ({iat}); at most {skew} s is allowed",
                iat - nbf
            ));
        }
        if nbf > exp {
            return Err(format!("nbf ({nbf}) is after exp ({exp})"));
        }
    }
    Ok(payload)
}

/// Checks that `signing_input` is an audit checkpoint statement, the only JWS a key of
/// the checkpoint profile signs (DESIGN.md §9), and that it hashes to `digest`: header
/// `{"alg":"ES256","typ":CHECKPOINT_TYP}` (plus an optional string `kid`, nothing
/// else), payload exactly `{iss, seq, head, iat}` with a string `iss`, a non-negative
/// integer `seq`, a 64-hex-digit `head` and an integer `iat`. Such a statement has no
/// `sub`, `aud`, `exp` or `scope`, and its `typ` is not `at+jwt`, so no verifier of
/// access tokens can take it for one.
pub fn check_checkpoint(signing_input: &[u8], digest: &[u8; 32]) -> Result<(), String> {
    let (header, payload) = header_and_payload(signing_input, digest)?;
    if exact_string(&header, "header", "alg")? != "ES256" {
        return Err("a checkpoint's alg must be ES256".into());
    }
    let typ = exact_string(&header, "header", "typ")?;
    if typ != CHECKPOINT_TYP {
        return Err(format!(
            "the JWS header's typ is \"{}\"; this key signs only audit checkpoints (typ \"{CHECKPOINT_TYP}\")",
            typ.escape_debug()
        ));
    }
    if let Some(extra) = header
        .keys()
        .find(|k| !["alg", "typ", "kid"].contains(&k.as_str()))
    {
        return Err(format!(
            "a checkpoint header has only alg, typ and kid, not \"{}\"",
            extra.escape_debug()
        ));
    }
    if header.contains_key("kid") {
        exact_string(&header, "header", "kid")?;
    }
    if let Some(extra) = payload
        .keys()
        .find(|k| !["iss", "seq", "head", "iat"].contains(&k.as_str()))
    {
        return Err(format!(
            "a checkpoint statement has only iss, seq, head and iat, not \"{}\"",
            extra.escape_debug()
        ));
    }
    exact_string(&payload, "payload", "iss")?;
    let head = exact_string(&payload, "payload", "head")?;
    if head.len() != 64 || !head.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a checkpoint's head must be 64 hexadecimal digits (a SHA-256)".into());
    }
    match payload.get("seq").and_then(Value::as_u64) {
        Some(_) => {}
        None => return Err("a checkpoint's seq must be a non-negative integer".into()),
    }
    integer(&payload, "iat")?.ok_or("a checkpoint has no \"iat\"")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    const NOW: i64 = 1_750_000_000;

    fn rules() -> TokenRules {
        TokenRules::new(900, "https://issuer.test", "at+jwt").unwrap()
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    fn input(header: &str, payload: &str) -> Vec<u8> {
        format!("{}.{}", b64(header), b64(payload)).into_bytes()
    }

    const HEADER: &str = r#"{"alg":"ES256","typ":"at+jwt","kid":"00112233"}"#;

    fn payload(iat: i64, exp: i64) -> String {
        format!(r#"{{"iss":"https://issuer.test","sub":"agent","iat":{iat},"exp":{exp}}}"#)
    }

    fn run(si: &[u8]) -> Result<(), String> {
        check(&rules(), si, &quorate_crypto::hash::sha256(si), NOW).map(|_| ())
    }

    fn refused(si: &[u8], words: &str) {
        let e = run(si).expect_err("the token was accepted");
        assert!(
            e.contains(words),
            "refusal {e:?} does not mention {words:?}"
        );
    }

    #[test]
    fn accepts_a_token_within_the_rules() {
        run(&input(HEADER, &payload(NOW, NOW + 900))).unwrap();
        // With nbf, slight skew, and the longest lifetime.
        let p = format!(
            r#"{{"iss":"https://issuer.test","iat":{},"nbf":{},"exp":{}}}"#,
            NOW + 30,
            NOW - 20,
            NOW + 930
        );
        run(&input(HEADER, &p)).unwrap();
    }

    #[test]
    fn refuses_a_lifetime_beyond_max_ttl() {
        refused(
            &input(HEADER, &payload(NOW, NOW + 86_400)),
            "exp - iat = 86400 s exceeds this key's maximum token lifetime of 900 s",
        );
    }

    #[test]
    fn refuses_exp_not_after_iat() {
        refused(&input(HEADER, &payload(NOW, NOW)), "is not after iat");
    }

    #[test]
    fn refuses_iat_in_the_future() {
        refused(
            &input(HEADER, &payload(NOW + 120, NOW + 600)),
            "iat (1750000120) is 120 s in the future",
        );
    }

    #[test]
    fn accepts_the_edges_of_the_skew_window() {
        // Issued 60 s ahead of the node's clock, with the longest lifetime: exp is
        // exactly now + max_ttl + skew, the latest the rules allow.
        run(&input(HEADER, &payload(NOW + 60, NOW + 960))).unwrap();
        // The node's clock 20 s further behind: iat is now 80 s ahead.
        let si = input(HEADER, &payload(NOW + 60, NOW + 960));
        let e = check(&rules(), &si, &quorate_crypto::hash::sha256(&si), NOW - 20).unwrap_err();
        assert!(e.contains("iat (1750000060) is 80 s in the future"), "{e}");
    }

    #[test]
    fn refuses_bad_nbf() {
        let p = |nbf: &str| {
            format!(
                r#"{{"iss":"https://issuer.test","iat":{NOW},"nbf":{nbf},"exp":{}}}"#,
                NOW + 600
            )
        };
        refused(
            &input(HEADER, &p(&(NOW - 61).to_string())),
            "nbf (1749999939) is 61 s before iat (1750000000)",
        );
        refused(
            &input(HEADER, &p(&(NOW + 601).to_string())),
            "nbf (1750000601) is after exp (1750000600)",
        );
        refused(&input(HEADER, &p("\"soon\"")), "\"nbf\" must be an integer");
    }

    #[test]
    fn refuses_a_wrong_issuer() {
        let p = format!(
            r#"{{"iss":"https://evil.test","iat":{NOW},"exp":{}}}"#,
            NOW + 60
        );
        refused(&input(HEADER, &p), "iss is \"https://evil.test\"");
        let p = format!(
            r#"{{"iss":"HTTPS://ISSUER.TEST","iat":{NOW},"exp":{}}}"#,
            NOW + 60
        );
        refused(&input(HEADER, &p), "issuer \"https://issuer.test\"");
        let p = format!(r#"{{"iat":{NOW},"exp":{}}}"#, NOW + 60);
        refused(&input(HEADER, &p), "has no \"iss\"");
    }

    #[test]
    fn refuses_wrong_typ_and_alg() {
        let p = payload(NOW, NOW + 60);
        refused(
            &input(r#"{"alg":"ES256","typ":"JWT"}"#, &p),
            "typ is \"JWT\"",
        );
        refused(
            &input(r#"{"alg":"ES256","typ":"AT+JWT"}"#, &p),
            "exact match",
        );
        refused(&input(r#"{"alg":"ES256"}"#, &p), "has no \"typ\"");
        refused(
            &input(r#"{"alg":"RS256","typ":"at+jwt"}"#, &p),
            "only ES256",
        );
        refused(&input(r#"{"alg":"none","typ":"at+jwt"}"#, &p), "only ES256");
        refused(
            &input(
                r#"{"alg":"ES256","typ":"at+jwt","b64":false,"crit":["b64"]}"#,
                &p,
            ),
            "extensions",
        );
    }

    #[test]
    fn refuses_missing_or_fractional_times() {
        refused(
            &input(HEADER, r#"{"iss":"https://issuer.test","exp":1750000100}"#),
            "no \"iat\"",
        );
        refused(
            &input(HEADER, r#"{"iss":"https://issuer.test","iat":1750000000}"#),
            "no \"exp\"",
        );
        refused(
            &input(
                HEADER,
                r#"{"iss":"https://issuer.test","iat":1750000000.5,"exp":1750000100}"#,
            ),
            "\"iat\" must be an integer",
        );
        refused(
            &input(
                HEADER,
                r#"{"iss":"https://issuer.test","iat":"1750000000","exp":1750000100}"#,
            ),
            "\"iat\" must be an integer",
        );
    }

    #[test]
    fn refuses_duplicate_claims() {
        let p = format!(
            r#"{{"iss":"https://issuer.test","iat":{NOW},"exp":{},"exp":{}}}"#,
            NOW + 60,
            NOW + 86_400
        );
        refused(&input(HEADER, &p), "appears twice");
        refused(
            &input(
                r#"{"alg":"ES256","typ":"at+jwt","typ":"JWT"}"#,
                &payload(NOW, NOW + 60),
            ),
            "appears twice",
        );
        // Nested objects too: a verifier reading `act` or `cnf` must see what the node saw.
        let p = format!(
            r#"{{"iss":"https://issuer.test","iat":{NOW},"exp":{},"cnf":{{"jkt":"a","jkt":"b"}}}}"#,
            NOW + 60
        );
        refused(&input(HEADER, &p), "member \"jkt\" appears twice");
    }

    #[test]
    fn refuses_malformed_encodings() {
        let good = input(HEADER, &payload(NOW, NOW + 60));
        let text = String::from_utf8(good.clone()).unwrap();
        let (h, p) = text.split_once('.').unwrap();
        // Padding, standard-alphabet characters, extra dots, a signature part.
        refused(format!("{h}=.{p}").as_bytes(), "base64url");
        refused(
            format!("{h}.{p}.sig").as_bytes(),
            "exactly one '.', found 2",
        );
        refused(h.as_bytes(), "exactly one '.', found 0");
        refused(format!(".{p}").as_bytes(), "header is empty");
        refused(format!("{h}+.{p}").as_bytes(), "base64url");
        // Not JSON objects.
        refused(&input("[1,2]", &payload(NOW, NOW + 60)), "JSON object");
        refused(&input(HEADER, "not json"), "JSON object");
        refused(
            &input(HEADER, &format!("{} x", payload(NOW, NOW + 60))),
            "JSON object",
        );
        // Non-UTF-8.
        let mut bad = good;
        bad.push(0xff);
        refused(&bad, "ASCII");
    }

    #[test]
    fn refuses_an_input_that_is_not_what_the_request_signs() {
        let si = input(HEADER, &payload(NOW, NOW + 60));
        let e = check(&rules(), &si, &[0u8; 32], NOW).unwrap_err();
        assert!(e.contains("does not hash"), "{e}");
    }

    #[test]
    fn refuses_an_oversize_input() {
        let big = format!(
            r#"{{"iss":"https://issuer.test","iat":{NOW},"exp":{},"pad":"{}"}}"#,
            NOW + 60,
            "x".repeat(8 * 1024)
        );
        refused(&input(HEADER, &big), "at most 8192 bytes");
    }

    #[test]
    fn checkpoint_statements_only() {
        let head = "ab".repeat(32);
        let ok_payload = format!(r#"{{"iss":"https://i.test","seq":7,"head":"{head}","iat":1}}"#);
        let ck = r#"{"alg":"ES256","typ":"quorate-audit-checkpoint+jwt","kid":"00"}"#;
        let check = |h: &str, p: &str| {
            let inp = input(h, p);
            check_checkpoint(&inp, &quorate_crypto::hash::sha256(&inp))
        };
        assert!(check(ck, &ok_payload).is_ok());
        // An access token is not a checkpoint, whatever its typ.
        for (h, p, words) in [
            (HEADER, ok_payload.as_str(), "typ"),
            (
                ck,
                r#"{"iss":"https://i.test","sub":"x","aud":"dev","exp":9999999999,"iat":1}"#,
                "a checkpoint statement has only iss, seq, head and iat",
            ),
            (ck, r#"{"iss":"i","seq":-1,"head":"00","iat":1}"#, "head"),
            (
                r#"{"alg":"ES256","typ":"quorate-audit-checkpoint+jwt","crit":["x"]}"#,
                ok_payload.as_str(),
                "crit",
            ),
        ] {
            let e = check(h, p).unwrap_err();
            assert!(e.contains(words), "{e}");
        }
        let inp = input(ck, &ok_payload);
        assert!(
            check_checkpoint(&inp, &[0; 32])
                .unwrap_err()
                .contains("hash")
        );
    }
}
