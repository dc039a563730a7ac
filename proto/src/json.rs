//! Strict JSON for security-relevant documents (JWS headers and payloads): an object
//! whose member names are unique at every depth.
//!
//! RFC 8259 §4 leaves the meaning of a duplicate member name to the parser, and RFC 7515
//! §5.2 / RFC 7519 §4 let JOSE parsers either refuse it or take the last one. serde_json
//! takes the last one, so `{"team":"a","team":"admin"}` would be read as `admin` by us
//! and perhaps as `a` by another verifier of the same token. [`parse_object_unique`]
//! refuses such documents outright, in nested objects too, so every party that reads a
//! document accepted here reads the same members.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Parses `bytes` as one JSON object in which no object (the top-level one or any nested
/// one, also inside arrays) names a member twice.
///
/// The error says what is wrong, e.g. `member "team" appears twice at line 1 column
/// 40` or `expected a JSON object`; it never echoes more of the document than the
/// duplicated name.
pub fn parse_object_unique(bytes: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<Unique>(bytes) {
        Ok(Unique(Value::Object(map))) => Ok(map),
        Ok(_) => Err("expected a JSON object".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// A JSON value whose objects have unique member names.
struct Unique(Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // JSON text cannot spell NaN or an infinity; serde_json refuses overflowing
        // literals before they get here.
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(item)) = seq.next_element::<Unique>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "member \"{}\" appears twice",
                    key.escape_debug()
                )));
            }
            let Unique(value) = access.next_value::<Unique>()?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn accepts_objects_and_keeps_every_value() {
        let text = br#"{"a":1,"b":-2,"c":1.5,"d":"x","e":[true,null,{"f":18446744073709551615}],"g":{"a":1}}"#;
        let map = parse_object_unique(text).unwrap();
        let plain: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(Value::Object(map), plain);
    }

    #[test]
    fn refuses_duplicates_at_every_depth() {
        for text in [
            r#"{"team":"a","team":"admin"}"#,
            r#"{"x":{"team":"a","team":"admin"}}"#,
            r#"{"x":[1,{"y":{"team":"a","team":"admin"}}]}"#,
        ] {
            let e = parse_object_unique(text.as_bytes()).unwrap_err();
            assert!(e.contains("member \"team\" appears twice"), "{text}: {e}");
        }
        // The same name in different objects is fine.
        parse_object_unique(br#"{"team":"a","x":{"team":"b"}}"#).unwrap();
    }

    #[test]
    fn refuses_what_is_not_one_object() {
        for text in ["[]", "1", "\"s\"", "null", "{", "{} {}", ""] {
            assert!(parse_object_unique(text.as_bytes()).is_err(), "{text}");
        }
    }
}
