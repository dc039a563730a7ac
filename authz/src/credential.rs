//! The canonical context of a confidential credential (DESIGN.md §4.6): what the
//! coordinator asks the nodes to derive for, and what a node that checks evidence reads
//! back to learn which agent, target and task a derivation is for (DESIGN.md §9).

/// The version tag every credential context starts with.
pub const CREDENTIAL_CONTEXT_PREFIX: &[u8] = b"QUORATE-CREDENTIAL-V1";

/// The fields of a credential context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialContext {
    /// The derivation key's name.
    pub key_name: String,
    /// The derivation key's id (hex).
    pub key_id: String,
    /// What the credential is for (`orders-db`).
    pub target: String,
    /// The agent's SPIFFE ID.
    pub agent: String,
    /// The task it serves.
    pub task_id: String,
    /// The task's start, unix seconds.
    pub not_before: i64,
    /// The task's end, unix seconds.
    pub not_after: i64,
}

impl CredentialContext {
    /// The canonical bytes: the prefix, then every field as a big-endian u32 length and
    /// its UTF-8 bytes, so no two field lists encode alike.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = CREDENTIAL_CONTEXT_PREFIX.to_vec();
        let not_before = self.not_before.to_string();
        let not_after = self.not_after.to_string();
        for field in [
            self.key_name.as_str(),
            self.key_id.as_str(),
            self.target.as_str(),
            self.agent.as_str(),
            self.task_id.as_str(),
            not_before.as_str(),
            not_after.as_str(),
        ] {
            out.extend_from_slice(&u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(field.as_bytes());
        }
        out
    }

    /// Whether `bytes` claim to be a credential context (they start with the prefix):
    /// such a derivation names an agent.
    pub fn claims_to_be(bytes: &[u8]) -> bool {
        bytes.starts_with(CREDENTIAL_CONTEXT_PREFIX)
    }

    /// Parses canonical bytes; the error says what is malformed.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut rest = bytes
            .strip_prefix(CREDENTIAL_CONTEXT_PREFIX)
            .ok_or("not a credential context (no QUORATE-CREDENTIAL-V1 prefix)")?;
        let mut fields = Vec::with_capacity(7);
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or("credential context: a truncated length")?;
            let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| "length")?;
            if tail.len() < len {
                return Err("credential context: a field longer than the context".into());
            }
            let (field, tail) = tail.split_at(len);
            fields.push(
                String::from_utf8(field.to_vec())
                    .map_err(|_| "credential context: a field is not UTF-8")?,
            );
            rest = tail;
        }
        let [key_name, key_id, target, agent, task_id, nb, na]: [String; 7] = fields
            .try_into()
            .map_err(|f: Vec<String>| format!("credential context: {} fields, not 7", f.len()))?;
        let int = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| format!("credential context: {s:?} is not a time"))
        };
        Ok(Self {
            not_before: int(&nb)?,
            not_after: int(&na)?,
            key_name,
            key_id,
            target,
            agent,
            task_id,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn contexts_round_trip_and_malformed_ones_are_refused() {
        let c = CredentialContext {
            key_name: "credentials".into(),
            key_id: "00ff".into(),
            target: "orders-db".into(),
            agent: "spiffe://d/agent/x/a".into(),
            task_id: "task-1".into(),
            not_before: 10,
            not_after: 20,
        };
        let bytes = c.encode();
        assert!(CredentialContext::claims_to_be(&bytes));
        assert_eq!(CredentialContext::parse(&bytes).unwrap(), c);
        assert!(CredentialContext::parse(&bytes[..bytes.len() - 1]).is_err());
        let mut extra = bytes.clone();
        extra.extend_from_slice(&[0, 0, 0, 0]);
        assert!(
            CredentialContext::parse(&extra)
                .unwrap_err()
                .contains("8 fields")
        );
        assert!(CredentialContext::parse(b"other").is_err());
    }
}
