//! The Cedar policy engine that authorises agent and client requests (DESIGN.md §7,
//! "Authorise").
//!
//! A policy set is a directory of `*.cedar` files plus an optional
//! [`SCHEMA_FILE`] (else [`DEFAULT_SCHEMA`]). Every policy gets a stable id: its
//! `@id("...")` annotation, else `<file-stem>.<index>`. A set is parsed and checked with
//! Cedar's strict validator as a whole before it becomes active; a refused set leaves
//! the active one in place ([`PolicyEngine::apply_files`]), so hot reload
//! ([`PolicyEngine::watch`]) never leaves the service without policies.
//!
//! A permit may cap the token lifetime with `@max_ttl_seconds("900")`; the cap of a
//! decision is the smallest cap among the permits that allowed it
//! ([`Decision::max_ttl_seconds`]), and the caller refuses longer lifetimes.
//!
//! Evaluation errors fail closed (DESIGN.md §9: "Cedar evaluation errors are denials
//! everywhere"). Cedar itself skips a policy whose condition errors (an overflow, a
//! missing tag read without `hasTag` guard that the validator could not rule out), so a
//! forbid that errors would let a permit win. [`PolicyEngine::decide`] instead denies any
//! request for which a policy that applies to it errors, whether permit or forbid, and
//! names that policy and its error in the [`Decision`] (and so in the refusal and the
//! audit event). Only policies whose scope matches the request are evaluated, so a
//! policy for another action or resource never denies by erroring.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cedar_policy::{
    Authorizer, Context, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use sha2::{Digest, Sha256};

use crate::bundle::PolicyBundle;

/// The Cedar schema (human format, no namespace) policies are validated against when a
/// policy directory has no [`SCHEMA_FILE`] of its own.
pub const DEFAULT_SCHEMA: &str = include_str!("policy/schema.cedarschema");

/// The default policy set of `quorate dev`: any agent may get a token for
/// `Audience::"dev"` for at most 15 minutes (`dev-agents`), and the client
/// certificate `admin` may do everything (`admin-client`).
pub const DEV_POLICY: &str = include_str!("policy/dev.cedar");

/// The file name [`DEV_POLICY`] is loaded and written under.
pub const DEV_POLICY_FILE: &str = "dev.cedar";

/// The name of the optional schema file in a policy directory.
pub const SCHEMA_FILE: &str = "schema.cedarschema";

/// The extension of policy files (without the dot).
pub const POLICY_EXTENSION: &str = "cedar";

/// The annotation naming a policy: `@id("no-prod-tools")`.
pub const ID_ANNOTATION: &str = "id";

/// The annotation capping the token lifetime a permit allows: `@max_ttl_seconds("900")`.
pub const MAX_TTL_ANNOTATION: &str = "max_ttl_seconds";

/// The annotation marking a permit whose requests wait for a human approver:
/// `@approval("required")`.
pub const APPROVAL_ANNOTATION: &str = "approval";

/// The context keys a caller may set with `--context k=v` ([`PolicyContext::with_pairs`]).
pub const CONTEXT_KEYS: [&str; 3] = ["data_sensitivity", "environment", "tool"];

/// The shortest poll interval [`PolicyEngine::watch`] uses.
pub const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// What the name of the built-in schema is shown as in messages.
const BUILTIN_SCHEMA_NAME: &str = "<built-in schema>";

/// One problem found in a policy set: the file, the policy (when known) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyProblem {
    /// The file the problem is in (`schema.cedarschema`, `prod.cedar`, ...).
    pub file: String,
    /// The id of the policy the problem is in, when it is about one policy.
    pub policy_id: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.policy_id {
            Some(id) => write!(f, "{}: policy {id}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

fn render_problems(problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("\n  - {p}"))
        .collect::<String>()
}

/// Why a policy set was not loaded or activated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A policy directory or file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A policy directory holds no `*.cedar` file.
    #[error("no policy files (*.cedar) in {}", .dir.display())]
    EmptyDir {
        /// The directory.
        dir: PathBuf,
    },
    /// A policy set given as files holds no `*.cedar` file.
    #[error("no policy files (*.cedar) in the policy set from {origin}")]
    NoPolicyFiles {
        /// Where the set came from.
        origin: String,
    },
    /// The set failed to parse or validate; every problem found is listed, each with its
    /// file and, where it concerns one policy, the policy id.
    #[error(
        "policy set from {origin} refused, {} problem(s):{}",
        .problems.len(),
        render_problems(.problems)
    )]
    Invalid {
        /// Where the set came from.
        origin: String,
        /// Every problem found.
        problems: Vec<PolicyProblem>,
    },
    /// A signed bundle older than the active one (or of the same seq with other
    /// content): a rollback, refused.
    #[error("{0}")]
    Rollback(String),
}

/// What is known about a policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyInfo {
    /// SHA-256 (hex) over the set's files sorted by name; see [`files_digest`].
    pub digest: String,
    /// The ids of its policies, in file order (files sorted by name).
    pub policy_ids: Vec<String>,
    /// When it was activated (or checked), unix seconds.
    pub activated_at: i64,
    /// Where it came from (a directory, `quorate policy apply` by some client, ...).
    pub source: String,
    /// The operator-signed bundle the set came from ([`crate::bundle::PolicyBundle::id`]),
    /// if it came from one.
    pub bundle: Option<String>,
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// An authenticated AI agent (Cedar `Agent::"<subject>"`).
    Agent {
        /// The agent's SPIFFE ID ([`crate::authn::Attestation::subject`]); the entity id.
        subject: String,
        /// The issuer that vouched for the agent (OIDC `iss`, `spiffe://<trust domain>`
        /// of an SVID, a registered client's id).
        issuer: String,
        /// The subject as that issuer names it (OIDC `sub`, SVID URI, client id).
        external_subject: String,
        /// How the agent authenticated ([`crate::authn::AuthMethod`]): `"oidc"`,
        /// `"x509-svid"`, `"jwt-svid"` or `"private-key-jwt"`.
        method: String,
        /// Attestation claims, given to Cedar as string tags of the entity.
        claims: BTreeMap<String, String>,
    },
    /// A cluster client certificate, operator or service (Cedar `Client::"<name>"`).
    Client {
        /// The client name from the certificate.
        name: String,
    },
}

impl Principal {
    /// The Cedar principal of a verified attestation: the same for the coordinator and
    /// every node that decides the request again.
    pub fn agent(a: &crate::authn::Attestation) -> Self {
        Principal::Agent {
            subject: a.subject.clone(),
            issuer: a.issuer.clone(),
            external_subject: a.external_subject.clone(),
            method: a.method.to_string(),
            claims: a.claims.clone(),
        }
    }
}

/// What is asked for; the Cedar actions `Action::"issue_token"` and so on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Issue an access token (`issue_token`).
    IssueToken,
    /// Derive a key (`derive`).
    Derive,
    /// Sign with a cluster key (`sign`).
    Sign,
    /// Decrypt with a cluster key (`decrypt`).
    Decrypt,
    /// Administer the cluster or a key (`admin`).
    Admin,
    /// RFC 8693 token exchange: delegate a token to a sub-agent (`exchange_token`).
    ExchangeToken,
    /// Get a confidential per-task credential (`request_credential`).
    RequestCredential,
    /// Approve or reject a pending request (`approve`).
    Approve,
}

impl Action {
    /// The Cedar action id (`issue_token`, `derive`, `sign`, `decrypt`, `admin`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IssueToken => "issue_token",
            Self::Derive => "derive",
            Self::Sign => "sign",
            Self::Decrypt => "decrypt",
            Self::Admin => "admin",
            Self::ExchangeToken => "exchange_token",
            Self::RequestCredential => "request_credential",
            Self::Approve => "approve",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is acted on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A token audience (Cedar `Audience::"dev"`).
    Audience(String),
    /// A cluster key (Cedar `Key::"tokens"`).
    Key(String),
    /// The cluster (Cedar `Cluster::"cluster"`).
    Cluster,
    /// A credential target (Cedar `Target::"orders-db"`).
    Target(String),
}

impl Resource {
    /// The Cedar entity type and id.
    pub fn cedar_type_and_id(&self) -> (&'static str, &str) {
        match self {
            Self::Audience(a) => ("Audience", a),
            Self::Key(k) => ("Key", k),
            Self::Cluster => ("Cluster", "cluster"),
            Self::Target(t) => ("Target", t),
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ty, id) = self.cedar_type_and_id();
        write!(f, "{ty}::{id:?}")
    }
}

/// The request context Cedar sees as `context`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyContext {
    /// The requested scopes.
    pub scopes: Vec<String>,
    /// The requested token lifetime.
    pub ttl_seconds: u64,
    /// The task the request belongs to.
    pub task: Option<String>,
    /// Caller-supplied: the environment (`prod`, `staging`, ...).
    pub environment: Option<String>,
    /// Caller-supplied: the tool the agent is about to use.
    pub tool: Option<String>,
    /// Caller-supplied: the sensitivity of the data involved.
    pub data_sensitivity: Option<String>,
    /// The current time, unix seconds.
    pub now: i64,
    /// Token exchange: the subject of the delegated token.
    pub on_behalf_of: Option<String>,
    /// Token exchange: every agent of the delegation chain, the new actor included.
    pub actors: Option<Vec<String>>,
    /// A resource client's credential request: the agent whose credential it derives.
    pub agent: Option<String>,
}

impl PolicyContext {
    /// Parses `--context k=v` pairs: only environment, tool, data_sensitivity are allowed; an unknown key is an error naming it and listing the allowed keys.
    pub fn with_pairs(mut self, pairs: &BTreeMap<String, String>) -> Result<Self, String> {
        let unknown: Vec<&str> = pairs
            .keys()
            .map(String::as_str)
            .filter(|k| !CONTEXT_KEYS.contains(k))
            .collect();
        if !unknown.is_empty() {
            let names = unknown
                .iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(format!(
                "unknown context key {names}; the allowed keys are {}",
                CONTEXT_KEYS.join(", ")
            ));
        }
        for (key, value) in pairs {
            let slot = match key.as_str() {
                "environment" => &mut self.environment,
                "tool" => &mut self.tool,
                _ => &mut self.data_sensitivity,
            };
            *slot = Some(value.clone());
        }
        Ok(self)
    }
}

/// One authorisation question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    /// Who is asking.
    pub principal: Principal,
    /// What is asked for.
    pub action: Action,
    /// What is acted on.
    pub resource: Resource,
    /// The circumstances.
    pub context: PolicyContext,
}

/// The answer to a [`PolicyRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The determining policies: the permits that allowed; or the forbids that denied
    /// together with the policies whose evaluation failed; empty when denied because
    /// nothing permits (or the request did not fit the schema). Sorted.
    pub policy_ids: Vec<String>,
    /// The smallest `@max_ttl_seconds` among the determining permits that carry one.
    pub max_ttl_seconds: Option<u64>,
    /// Allowed only once a human approves: every determining permit carries
    /// `@approval("required")`.
    pub approval_required: bool,
    /// Errors from building the request or evaluating policies, each naming its policy
    /// (`error while evaluating policy `x`: ...`). Any error denies the request (fail
    /// closed); an erroring policy is also in [`Self::policy_ids`].
    pub errors: Vec<String>,
    /// The signed bundle the decision was made under, if the active set came from one:
    /// the id the fragment nodes must hold to sign (DESIGN.md §9).
    pub bundle: Option<String>,
}

impl Decision {
    fn refused(error: String) -> Self {
        Self {
            allowed: false,
            approval_required: false,
            policy_ids: Vec::new(),
            max_ttl_seconds: None,
            errors: vec![error],
            bundle: None,
        }
    }

    /// One line for users and audit logs: `allowed by policy dev-agents`,
    /// `denied by policy forbid-prod-writes`, `denied: no policy permits this request`,
    /// or, when something failed, `denied by policy x: evaluation failed, which denies
    /// (error while evaluating policy `x`: ...)` and `denied: the request could not be
    /// evaluated (...)`.
    pub fn explain(&self) -> String {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        if !self.errors.is_empty() {
            let errors = self.errors.join("; ");
            return match self.policy_ids.as_slice() {
                [] => format!("denied: the request could not be evaluated ({errors})"),
                [one] => {
                    format!("denied by policy {one}: evaluation failed, which denies ({errors})")
                }
                many => format!(
                    "denied by policies {}: evaluation failed, which denies ({errors})",
                    many.join(", ")
                ),
            };
        }
        match self.policy_ids.as_slice() {
            [] if self.allowed => "allowed".to_owned(),
            [] => "denied: no policy permits this request".to_owned(),
            [one] => format!("{verdict} by policy {one}"),
            many => format!("{verdict} by policies {}", many.join(", ")),
        }
    }
}

/// A parsed, validated policy set ready to decide.
struct ActiveSet {
    policies: PolicySet,
    schema: Schema,
    /// `@max_ttl_seconds` of the permits that carry it.
    ttl_caps: HashMap<String, u64>,
    /// The permits marked `@approval("required")`.
    approval: HashSet<String>,
    info: PolicyInfo,
    bundle: Option<Arc<PolicyBundle>>,
}

/// The policy files of a set as (name, text) pairs, checked for names: `*.cedar` files
/// and at most one [`SCHEMA_FILE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySetFiles {
    policies: Vec<(String, String)>,
    schema: Option<String>,
    digest: String,
}

impl PolicySetFiles {
    /// Sorts the files by name and checks their names; `origin` names the set in errors.
    pub fn new(mut files: Vec<(String, String)>, origin: &str) -> Result<Self, PolicyError> {
        files.sort();
        let digest = files_digest(&files);
        let mut problems = Vec::new();
        let mut policies: Vec<(String, String)> = Vec::new();
        let mut schema = None;
        for (name, text) in files {
            if policies.last().is_some_and(|(last, _)| *last == name) {
                problems.push(PolicyProblem {
                    file: name,
                    policy_id: None,
                    message: "given more than once".to_owned(),
                });
            } else if name == SCHEMA_FILE {
                if schema.replace(text).is_some() {
                    problems.push(PolicyProblem {
                        file: name,
                        policy_id: None,
                        message: "given more than once".to_owned(),
                    });
                }
            } else if let Some(reason) = bad_policy_file_name(&name) {
                problems.push(PolicyProblem {
                    file: name,
                    policy_id: None,
                    message: reason,
                });
            } else {
                policies.push((name, text));
            }
        }
        if !problems.is_empty() {
            return Err(PolicyError::Invalid {
                origin: origin.to_owned(),
                problems,
            });
        }
        if policies.is_empty() {
            return Err(PolicyError::NoPolicyFiles {
                origin: origin.to_owned(),
            });
        }
        Ok(Self {
            policies,
            schema,
            digest,
        })
    }

    /// The digest of the files ([`files_digest`]).
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// Why `name` cannot be a policy file name, if it cannot.
fn bad_policy_file_name(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".cedar");
    match stem {
        None => Some(format!(
            "not a policy file: expected *.{POLICY_EXTENSION} or {SCHEMA_FILE}"
        )),
        Some(stem) if stem.contains(['/', '\\']) || stem.chars().any(char::is_control) => Some(
            "a policy file name must not contain path separators or control characters".to_owned(),
        ),
        Some(stem) if stem.is_empty() || stem.starts_with('.') => {
            Some("a policy file name needs a stem that does not start with '.'".to_owned())
        }
        Some(_) => None,
    }
}

/// SHA-256 (hex) over files sorted by name: for each file, the length of its name as a
/// big-endian u64, the name, the length of its text, the text. `files` must be sorted.
pub fn files_digest(files: &[(String, String)]) -> String {
    let mut h = Sha256::new();
    for (name, text) in files {
        for part in [name, text] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// The id as written, without any escaping.
fn id_str(id: &PolicyId) -> &str {
    id.as_ref()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Compiles the files of a verified bundle; the set remembers the bundle.
fn compile_bundle(bundle: PolicyBundle) -> Result<ActiveSet, PolicyError> {
    let origin = format!("policy bundle {}", bundle.id());
    let mut set = compile(
        PolicySetFiles::new(bundle.files().to_vec(), &origin)?,
        &origin,
    )?;
    set.info.bundle = Some(bundle.id().to_owned());
    set.bundle = Some(Arc::new(bundle));
    Ok(set)
}

/// Parses and validates a set; nothing is activated.
fn compile(files: PolicySetFiles, origin: &str) -> Result<ActiveSet, PolicyError> {
    let mut problems = Vec::new();
    let invalid = |problems| PolicyError::Invalid {
        origin: origin.to_owned(),
        problems,
    };

    let (schema_name, schema_text) = match &files.schema {
        Some(text) => (SCHEMA_FILE, text.as_str()),
        None => (BUILTIN_SCHEMA_NAME, DEFAULT_SCHEMA),
    };
    let schema = match Schema::from_cedarschema_str(schema_text) {
        Ok((schema, warnings)) => {
            for w in warnings {
                tracing::warn!(origin, file = schema_name, warning = %w, "policy schema warning");
            }
            Some(schema)
        }
        Err(e) => {
            problems.push(PolicyProblem {
                file: schema_name.to_owned(),
                policy_id: None,
                message: e.to_string(),
            });
            None
        }
    };

    let mut set = PolicySet::new();
    let mut ttl_caps = HashMap::new();
    let mut approval = HashSet::new();
    // Policy id -> the file that defines it, and the ids in load order.
    let mut defined_in: HashMap<String, String> = HashMap::new();
    let mut policy_ids = Vec::new();
    for (file, text) in &files.policies {
        let stem = file.strip_suffix(".cedar").unwrap_or(file);
        let parsed = match PolicySet::from_str(text) {
            Ok(parsed) => parsed,
            Err(errors) => {
                problems.extend(errors.iter().map(|e| PolicyProblem {
                    file: file.clone(),
                    policy_id: None,
                    message: e.to_string(),
                }));
                continue;
            }
        };
        if parsed.num_of_templates() > 0 {
            problems.push(PolicyProblem {
                file: file.clone(),
                policy_id: None,
                message: "policy templates (?principal, ?resource) are not supported".to_owned(),
            });
        }
        // `PolicySet::from_str` names the policies of a text policy0, policy1, ... in
        // source order.
        for index in 0..parsed.num_of_policies() {
            let Some(policy) = parsed.policy(&PolicyId::new(format!("policy{index}"))) else {
                problems.push(PolicyProblem {
                    file: file.clone(),
                    policy_id: None,
                    message: format!("internal error: policy number {index} not found"),
                });
                continue;
            };
            let id = match policy.annotation(ID_ANNOTATION) {
                Some(id) => id.to_owned(),
                None => format!("{stem}.{index}"),
            };
            let problem = |message: String| PolicyProblem {
                file: file.clone(),
                policy_id: Some(id.clone()),
                message,
            };
            if id.trim().is_empty() {
                problems.push(problem(format!(
                    "policy number {index}: @{ID_ANNOTATION} must not be empty"
                )));
                continue;
            }
            if let Some(first) = defined_in.get(&id) {
                let message = if first == file {
                    format!("the id is used twice in {file}")
                } else {
                    format!("the id is used in both {first} and {file}")
                };
                problems.push(problem(message));
                continue;
            }
            if let Some(value) = policy.annotation(MAX_TTL_ANNOTATION) {
                match (policy.effect(), value.trim().parse::<u64>()) {
                    (Effect::Forbid, _) => problems.push(problem(format!(
                        "@{MAX_TTL_ANNOTATION} only applies to permit policies"
                    ))),
                    (Effect::Permit, Ok(cap)) if cap > 0 => {
                        ttl_caps.insert(id.clone(), cap);
                    }
                    (Effect::Permit, _) => problems.push(problem(format!(
                        "@{MAX_TTL_ANNOTATION}({value:?}) must be a whole number of seconds above 0"
                    ))),
                }
            }
            if let Some(value) = policy.annotation(APPROVAL_ANNOTATION) {
                match (policy.effect(), value.trim()) {
                    (Effect::Forbid, _) => problems.push(problem(format!(
                        "@{APPROVAL_ANNOTATION} only applies to permit policies"
                    ))),
                    (Effect::Permit, "required") => {
                        approval.insert(id.clone());
                    }
                    (Effect::Permit, _) => problems.push(problem(format!(
                        "@{APPROVAL_ANNOTATION}({value:?}): the only value is \"required\""
                    ))),
                }
            }
            if let Err(e) = set.add(policy.new_id(PolicyId::new(&id))) {
                problems.push(problem(e.to_string()));
                continue;
            }
            defined_in.insert(id.clone(), file.clone());
            policy_ids.push(id);
        }
    }

    let Some(schema) = schema else {
        return Err(invalid(problems));
    };
    let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    let file_of = |id: &PolicyId| {
        defined_in
            .get(id_str(id))
            .cloned()
            .unwrap_or_else(|| "<unknown file>".to_owned())
    };
    for w in validation.validation_warnings() {
        tracing::warn!(
            origin,
            file = %file_of(w.policy_id()),
            policy = %w.policy_id(),
            warning = %w,
            "policy validation warning"
        );
    }
    let mut invalid_policies: Vec<PolicyProblem> = validation
        .validation_errors()
        .map(|e| {
            let id = id_str(e.policy_id());
            let message = e.to_string();
            // Cedar starts most messages with the policy id, which the problem shows.
            let message = message
                .strip_prefix(&format!("for policy `{id}`, "))
                .map_or_else(|| message.clone(), str::to_owned);
            PolicyProblem {
                file: file_of(e.policy_id()),
                policy_id: Some(id.to_owned()),
                message,
            }
        })
        .collect();
    // The validator's order is not stable; sort so the same set gives the same report.
    invalid_policies.sort();
    invalid_policies.dedup();
    problems.extend(invalid_policies);
    if !problems.is_empty() {
        return Err(invalid(problems));
    }

    Ok(ActiveSet {
        policies: set,
        schema,
        ttl_caps,
        approval,
        info: PolicyInfo {
            digest: files.digest,
            policy_ids,
            activated_at: unix_now(),
            source: origin.to_owned(),
            bundle: None,
        },
        bundle: None,
    })
}

/// Reads a directory's policy files as (name, text) pairs (for `quorate policy apply DIR`, which sends them over gRPC).
///
/// Takes every `*.cedar` file and [`SCHEMA_FILE`] (following symlinks, as in mounted
/// Kubernetes ConfigMaps), not recursing and skipping dotfiles and other files; sorted
/// by name. A directory without `*.cedar` files is [`PolicyError::EmptyDir`].
pub fn read_dir_files(dir: &Path) -> Result<Vec<(String, String)>, PolicyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyError::Io { path, source }
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || !(name == SCHEMA_FILE || name.ends_with(".cedar")) {
            continue;
        }
        let path = entry.path();
        // `fs::metadata` follows symlinks; a dangling one is an error worth reporting.
        if !std::fs::metadata(&path).map_err(io(&path))?.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        files.push((name, text));
    }
    if !files.iter().any(|(name, _)| name != SCHEMA_FILE) {
        return Err(PolicyError::EmptyDir {
            dir: dir.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}

/// Validates a directory without activating anything (`quorate policy check DIR`).
pub fn check_dir(dir: &Path) -> Result<PolicyInfo, PolicyError> {
    let origin = dir.display().to_string();
    let files = PolicySetFiles::new(read_dir_files(dir)?, &origin)?;
    Ok(compile(files, &origin)?.info)
}

/// Writes [`DEV_POLICY`] and [`DEFAULT_SCHEMA`] into `dir` (created if missing) unless it
/// already holds policy files, so `quorate dev` starts with an editable, hot-reloaded
/// set. Returns whether it wrote anything.
pub fn write_dev_dir(dir: &Path) -> Result<bool, PolicyError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PolicyError::Io { path, source }
    };
    match read_dir_files(dir) {
        Ok(_) => return Ok(false),
        Err(PolicyError::EmptyDir { .. }) => {}
        Err(PolicyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, text) in [(DEV_POLICY_FILE, DEV_POLICY), (SCHEMA_FILE, DEFAULT_SCHEMA)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(true)
}

/// Decides [`PolicyRequest`]s with the active policy set and swaps in new sets
/// atomically. `Send + Sync`; share it in an `Arc`.
pub struct PolicyEngine {
    active: RwLock<Arc<ActiveSet>>,
    authorizer: Authorizer,
}

impl fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("active", &self.info())
            .finish_non_exhaustive()
    }
}

impl PolicyEngine {
    /// Loads *.cedar (sorted) + optional schema.cedarschema (else DEFAULT_SCHEMA); validates; empty dir is an error naming the dir.
    pub fn from_dir(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_files(read_dir_files(dir)?, &dir.display().to_string())
    }

    /// Loads a set given as (name, text) pairs: `*.cedar` files and optionally
    /// [`SCHEMA_FILE`]; `source` says where it came from ([`PolicyInfo::source`]).
    pub fn from_files(files: Vec<(String, String)>, source: &str) -> Result<Self, PolicyError> {
        let set = compile(PolicySetFiles::new(files, source)?, source)?;
        Ok(Self {
            active: RwLock::new(Arc::new(set)),
            authorizer: Authorizer::new(),
        })
    }

    /// An engine deciding under a verified operator-signed bundle (its files must
    /// compile, as for [`Self::from_files`]).
    pub fn from_bundle(bundle: PolicyBundle) -> Result<Self, PolicyError> {
        let set = compile_bundle(bundle)?;
        Ok(Self {
            active: RwLock::new(Arc::new(set)),
            authorizer: Authorizer::new(),
        })
    }

    /// Makes a verified bundle the active set, if it is newer than the active bundle
    /// (or the same one again: then nothing changes); a set that did not come from a
    /// bundle is replaced by any bundle. A bundle that does not compile, or is older
    /// than the active one (a rollback), leaves the active set untouched.
    pub fn apply_bundle(&self, bundle: PolicyBundle) -> Result<PolicyInfo, PolicyError> {
        if let Some(held) = self.bundle() {
            if held.id() == bundle.id() {
                return Ok(self.info());
            }
            held.may_move_to(&bundle)
                .map_err(|e| PolicyError::Rollback(e.to_string()))?;
        }
        let set = compile_bundle(bundle)?;
        let info = set.info.clone();
        let mut active = self.active.write().unwrap_or_else(PoisonError::into_inner);
        // Checked again under the lock: two bundles applied at once end at the newer.
        if let Some(held) = &active.bundle
            && let Some(next) = &set.bundle
        {
            held.may_move_to(next)
                .map_err(|e| PolicyError::Rollback(e.to_string()))?;
        }
        *active = Arc::new(set);
        tracing::info!(
            bundle = info.bundle.as_deref().unwrap_or("-"),
            digest = %info.digest,
            policies = info.policy_ids.len(),
            "policy bundle activated"
        );
        Ok(info)
    }

    /// The signed bundle the active set came from, if any.
    pub fn bundle(&self) -> Option<Arc<PolicyBundle>> {
        self.current().bundle.clone()
    }

    /// The `quorate dev` default: [`DEV_POLICY`] with [`DEFAULT_SCHEMA`].
    pub fn dev() -> Result<Self, PolicyError> {
        Self::from_files(
            vec![(DEV_POLICY_FILE.to_owned(), DEV_POLICY.to_owned())],
            "built-in dev policy",
        )
    }

    fn current(&self) -> Arc<ActiveSet> {
        // Nothing panics while the lock is held, so a poisoned lock still guards a
        // consistent set.
        Arc::clone(&self.active.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Validates the set fully, then makes it the active one; on error the active set is
    /// untouched.
    pub fn apply_files(
        &self,
        files: Vec<(String, String)>,
        source: &str,
    ) -> Result<PolicyInfo, PolicyError> {
        let set = compile(PolicySetFiles::new(files, source)?, source)?;
        let info = set.info.clone();
        *self.active.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        tracing::info!(
            source,
            digest = %info.digest,
            policies = info.policy_ids.len(),
            "policy set activated"
        );
        Ok(info)
    }

    /// Re-reads `dir` and activates it if its digest differs from the active set's;
    /// `Ok(None)` when the digest is unchanged.
    pub fn reload_dir(&self, dir: &Path) -> Result<Option<PolicyInfo>, PolicyError> {
        let files = read_dir_files(dir)?;
        if self.unchanged(&files) {
            return Ok(None);
        }
        self.apply_files(files, &dir.display().to_string())
            .map(Some)
    }

    fn unchanged(&self, sorted_files: &[(String, String)]) -> bool {
        files_digest(sorted_files) == self.current().info.digest
    }

    /// What is known about the active set.
    pub fn info(&self) -> PolicyInfo {
        self.current().info.clone()
    }

    /// Decides a request with the active set. Never panics: a request that does not fit
    /// the schema is denied with the reason in [`Decision::errors`].
    pub fn decide(&self, req: &PolicyRequest) -> Decision {
        let set = self.current();
        let (request, entities) = match build_request(req, &set.schema) {
            Ok(built) => built,
            Err(e) => {
                return Decision {
                    bundle: set.info.bundle.clone(),
                    ..Decision::refused(e)
                };
            }
        };
        let response = self
            .authorizer
            .is_authorized(&request, &set.policies, &entities);
        let diagnostics = response.diagnostics();
        let errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
        // Fail closed: Cedar skips a policy whose evaluation errors; here any error of a
        // policy that applies to the request denies it.
        let allowed = response.decision() == cedar_policy::Decision::Allow && errors.is_empty();
        let mut policy_ids: BTreeSet<String> = BTreeSet::new();
        if allowed || response.decision() == cedar_policy::Decision::Deny {
            policy_ids.extend(diagnostics.reason().map(|id| id_str(id).to_owned()));
        }
        policy_ids.extend(diagnostics.errors().map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                id_str(e.policy_id()).to_owned()
            }
        }));
        let max_ttl_seconds = if allowed {
            policy_ids
                .iter()
                .filter_map(|id| set.ttl_caps.get(id).copied())
                .min()
        } else {
            None
        };
        let approval_required = allowed
            && !policy_ids.is_empty()
            && policy_ids.iter().all(|id| set.approval.contains(id));
        Decision {
            allowed,
            approval_required,
            policy_ids: policy_ids.into_iter().collect(),
            max_ttl_seconds,
            errors,
            bundle: set.info.bundle.clone(),
        }
    }

    /// Polls `dir` every `interval` and applies changes; a broken set is logged (tracing::warn, naming the error) and the old one stays. Returns the task handle.
    ///
    /// A change is a digest of the directory that differs from the last one seen (at
    /// first, the active set's), so a set activated otherwise ([`Self::apply_files`],
    /// `quorate policy apply`) stays until the directory itself changes, and a broken
    /// directory is validated and reported once, not on every poll. Intervals below
    /// [`MIN_WATCH_INTERVAL`] are raised to it. Must be called inside a Tokio runtime.
    pub fn watch(self: Arc<Self>, dir: PathBuf, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval.max(MIN_WATCH_INTERVAL));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = self.info().digest;
            let mut last_failure: Option<String> = None;
            loop {
                ticker.tick().await;
                let engine = Arc::clone(&self);
                let path = dir.clone();
                // Reading and validating files blocks; keep it off the async workers.
                let poll = tokio::task::spawn_blocking(move || {
                    let outcome = engine.poll_dir(&path, &mut seen);
                    (seen, outcome)
                })
                .await;
                let outcome = match poll {
                    Ok((now_seen, outcome)) => {
                        seen = now_seen;
                        outcome
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "policy reload task failed");
                        // `seen` moved into the failed task; start over from the active set.
                        seen = self.info().digest;
                        continue;
                    }
                };
                match outcome {
                    Ok(Some(info)) => {
                        last_failure = None;
                        tracing::info!(
                            dir = %dir.display(),
                            digest = %info.digest,
                            policies = ?info.policy_ids,
                            "policy directory changed; new set active"
                        );
                    }
                    Ok(None) => last_failure = None,
                    Err(e) => {
                        let message = e.to_string();
                        if last_failure.as_deref() != Some(message.as_str()) {
                            tracing::warn!(
                                dir = %dir.display(),
                                active_digest = %self.info().digest,
                                error = %message,
                                "policy directory changed but the new set is refused; the previous set stays active"
                            );
                            last_failure = Some(message);
                        }
                    }
                }
            }
        })
    }

    /// One poll of [`Self::watch`]: activates `dir` if its digest differs from `seen`,
    /// and records the digest in `seen` whether or not the set is accepted.
    fn poll_dir(&self, dir: &Path, seen: &mut String) -> Result<Option<PolicyInfo>, PolicyError> {
        let files = read_dir_files(dir)?;
        let digest = files_digest(&files);
        if digest == *seen {
            return Ok(None);
        }
        *seen = digest;
        self.apply_files(files, &dir.display().to_string())
            .map(Some)
    }
}

fn entity_uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let ty = EntityTypeName::from_str(ty)
        .map_err(|e| format!("internal error: bad entity type {ty:?}: {e}"))?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

/// Builds the Cedar request (checked against the schema, context included) and the
/// entities it refers to.
fn build_request(req: &PolicyRequest, schema: &Schema) -> Result<(Request, Entities), String> {
    let principal = match &req.principal {
        Principal::Agent {
            subject,
            issuer,
            external_subject,
            method,
            claims,
        } => {
            let uid = entity_uid("Agent", subject)?;
            let attrs = [
                ("subject", subject),
                ("issuer", issuer),
                ("external_subject", external_subject),
                ("method", method),
            ]
            .map(|(k, v)| (k.to_owned(), string(v)));
            let tags = claims.iter().map(|(k, v)| (k.clone(), string(v)));
            Entity::new_with_tags(uid, attrs, [], tags)
        }
        Principal::Client { name } => {
            let uid = entity_uid("Client", name)?;
            Entity::new_with_tags(uid, [("name".to_owned(), string(name))], [], [])
        }
    }
    .map_err(|e| format!("bad principal: {e}"))?;
    let (resource_type, resource_id) = req.resource.cedar_type_and_id();
    let resource =
        Entity::new_no_attrs(entity_uid(resource_type, resource_id)?, Default::default());
    let action = entity_uid("Action", req.action.as_str())?;

    let c = &req.context;
    let ttl = i64::try_from(c.ttl_seconds)
        .map_err(|_| format!("ttl_seconds {} is too large", c.ttl_seconds))?;
    let mut pairs = vec![
        (
            "scopes".to_owned(),
            RestrictedExpression::new_set(c.scopes.iter().map(|s| string(s))),
        ),
        (
            "ttl_seconds".to_owned(),
            RestrictedExpression::new_long(ttl),
        ),
        ("now".to_owned(), RestrictedExpression::new_long(c.now)),
    ];
    for (key, value) in [
        ("task", &c.task),
        ("environment", &c.environment),
        ("tool", &c.tool),
        ("data_sensitivity", &c.data_sensitivity),
        ("on_behalf_of", &c.on_behalf_of),
        ("agent", &c.agent),
    ] {
        if let Some(value) = value {
            pairs.push((key.to_owned(), string(value)));
        }
    }
    if let Some(actors) = &c.actors {
        pairs.push((
            "actors".to_owned(),
            RestrictedExpression::new_set(actors.iter().map(|s| string(s))),
        ));
    }
    let context = Context::from_pairs(pairs).map_err(|e| format!("bad request context: {e}"))?;

    let request = Request::new(
        principal.uid(),
        action,
        resource.uid(),
        context,
        Some(schema),
    )
    .map_err(|e| format!("request does not fit the policy schema: {e}"))?;
    let entities = Entities::from_entities([principal, resource], Some(schema))
        .map_err(|e| format!("request entities do not fit the policy schema: {e}"))?;
    Ok((request, entities))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(claims: &[(&str, &str)]) -> Principal {
        Principal::Agent {
            subject: "spiffe://example.org/agent/gha/repo:acme/app".to_owned(),
            issuer: "https://token.actions.githubusercontent.com".to_owned(),
            external_subject: "repo:acme/app".to_owned(),
            method: "oidc".to_owned(),
            claims: claims
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn token_request(principal: Principal, audience: &str, ttl: u64) -> PolicyRequest {
        PolicyRequest {
            principal,
            action: Action::IssueToken,
            resource: Resource::Audience(audience.to_owned()),
            context: PolicyContext {
                scopes: vec!["read".to_owned()],
                ttl_seconds: ttl,
                now: 1_700_000_000,
                ..PolicyContext::default()
            },
        }
    }

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect()
    }

    /// A directory under the system temp dir, removed on drop (keeps the crate free of a
    /// tempfile dev-dependency).
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "quorate-policy-{tag}-{}-{nanos}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).unwrap();
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const NO_PROD_TOOLS: &str = r#"
        @id("no-prod-tools")
        forbid (principal, action == Action::"issue_token", resource)
        when { context has environment && context.environment == "prod" };
    "#;

    #[test]
    fn schema_and_dev_policy_load() {
        let (schema, _) = Schema::from_cedarschema_str(DEFAULT_SCHEMA).unwrap();
        assert_eq!(schema.actions().count(), 8);
        let engine = PolicyEngine::dev().unwrap();
        let info = engine.info();
        assert_eq!(
            info.policy_ids,
            [
                "dev-agents",
                "prod-needs-approval",
                "dev-delegation",
                "dev-credentials",
                "admin-client"
            ]
        );
        assert_eq!(info.digest.len(), 64);
    }

    #[test]
    fn dev_policy_allows_agent_for_dev_with_ttl_cap() {
        let engine = PolicyEngine::dev().unwrap();
        let d = engine.decide(&token_request(agent(&[]), "dev", 600));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policy_ids, ["dev-agents"]);
        assert_eq!(d.max_ttl_seconds, Some(900));
        assert!(d.errors.is_empty());
        assert_eq!(d.explain(), "allowed by policy dev-agents");
    }

    #[test]
    fn dev_policy_denies_other_audience() {
        let engine = PolicyEngine::dev().unwrap();
        let d = engine.decide(&token_request(agent(&[]), "staging", 600));
        assert!(!d.allowed);
        assert!(!d.approval_required);
        assert!(d.policy_ids.is_empty());
        assert_eq!(d.max_ttl_seconds, None);
        assert_eq!(d.explain(), "denied: no policy permits this request");
    }

    #[test]
    fn dev_policy_admin_client_and_request_type_errors() {
        let engine = PolicyEngine::dev().unwrap();
        let admin = PolicyRequest {
            principal: Principal::Client {
                name: "admin".to_owned(),
            },
            action: Action::Admin,
            resource: Resource::Cluster,
            context: PolicyContext::default(),
        };
        let d = engine.decide(&admin);
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policy_ids, ["admin-client"]);
        assert_eq!(d.max_ttl_seconds, None);

        let other = PolicyRequest {
            principal: Principal::Client {
                name: "ops".to_owned(),
            },
            ..admin.clone()
        };
        assert!(!engine.decide(&other).allowed);

        // A client cannot ask for a token: the schema says issue_token is for agents.
        let wrong = PolicyRequest {
            action: Action::IssueToken,
            resource: Resource::Audience("dev".to_owned()),
            ..admin
        };
        let d = engine.decide(&wrong);
        assert!(!d.allowed);
        assert_eq!(d.errors.len(), 1, "{d:?}");
        assert!(d.errors[0].contains("schema"), "{d:?}");
        assert!(
            d.explain()
                .starts_with("denied: the request could not be evaluated"),
            "{}",
            d.explain()
        );
        assert!(d.explain().contains("schema"), "{}", d.explain());
    }

    #[test]
    fn forbid_denies_and_is_named() {
        let engine = PolicyEngine::from_files(
            files(&[
                (DEV_POLICY_FILE, DEV_POLICY),
                ("guard.cedar", NO_PROD_TOOLS),
            ]),
            "test",
        )
        .unwrap();
        let mut req = token_request(agent(&[]), "dev", 300);
        assert!(engine.decide(&req).allowed);
        let pairs = BTreeMap::from([("environment".to_owned(), "prod".to_owned())]);
        req.context = req.context.with_pairs(&pairs).unwrap();
        let d = engine.decide(&req);
        assert!(!d.allowed);
        assert_eq!(d.policy_ids, ["no-prod-tools"]);
        assert_eq!(d.max_ttl_seconds, None);
        assert_eq!(d.explain(), "denied by policy no-prod-tools");
    }

    #[test]
    fn tag_based_permit_and_default_ids() {
        let policy = r#"
            permit (principal is Agent, action == Action::"issue_token", resource == Audience::"ci")
            when { principal.hasTag("repository") && principal.getTag("repository") == "acme/app" };

            @max_ttl_seconds("300")
            permit (principal is Agent, action == Action::"issue_token", resource == Audience::"ci")
            when { principal.method == "oidc" && context.ttl_seconds <= 600 };
        "#;
        let engine = PolicyEngine::from_files(files(&[("ci.cedar", policy)]), "test").unwrap();
        assert_eq!(engine.info().policy_ids, ["ci.0", "ci.1"]);

        let d = engine.decide(&token_request(
            agent(&[("repository", "acme/app")]),
            "ci",
            900,
        ));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policy_ids, ["ci.0"]);
        assert_eq!(d.max_ttl_seconds, None);

        let d = engine.decide(&token_request(
            agent(&[("repository", "acme/app")]),
            "ci",
            600,
        ));
        assert_eq!(d.policy_ids, ["ci.0", "ci.1"]);
        assert_eq!(d.max_ttl_seconds, Some(300));
        assert_eq!(d.explain(), "allowed by policies ci.0, ci.1");

        let d = engine.decide(&token_request(
            agent(&[("repository", "evil/app")]),
            "ci",
            900,
        ));
        assert!(!d.allowed);
        assert!(d.errors.is_empty(), "{d:?}");
    }

    /// Each way of authenticating reaches Cedar as its own `principal.method`, so policy
    /// can tell a JWT-SVID from a client assertion from an OIDC JWT.
    #[test]
    fn policy_tells_authentication_methods_apart() {
        use crate::authn::{Attestation, AuthMethod};
        let policy = r#"
            @id("workloads")
            permit (principal is Agent, action == Action::"issue_token", resource == Audience::"mesh")
            when { principal.method == "jwt-svid" && principal.issuer == "spiffe://example.org" };

            @id("clients")
            permit (principal is Agent, action == Action::"issue_token", resource == Audience::"billing")
            when { principal.method == "private-key-jwt" && principal.external_subject == "billing-bot" };
        "#;
        let engine = PolicyEngine::from_files(files(&[("m.cedar", policy)]), "test").unwrap();
        let attested = |method: AuthMethod, issuer: &str, external: &str| Attestation {
            subject: "spiffe://example.org/w".to_owned(),
            issuer: issuer.to_owned(),
            external_subject: external.to_owned(),
            method,
            claims: BTreeMap::new(),
            expires_at: None,
            jti: None,
            presented: None,
        };
        let cases = [
            (
                AuthMethod::Oidc,
                "spiffe://example.org",
                "billing-bot",
                [false, false],
            ),
            (
                AuthMethod::X509Svid,
                "spiffe://example.org",
                "billing-bot",
                [false, false],
            ),
            (
                AuthMethod::JwtSvid,
                "spiffe://example.org",
                "billing-bot",
                [true, false],
            ),
            (
                AuthMethod::JwtSvid,
                "spiffe://other.org",
                "x",
                [false, false],
            ),
            (
                AuthMethod::PrivateKeyJwt,
                "billing-bot",
                "billing-bot",
                [false, true],
            ),
            (
                AuthMethod::PrivateKeyJwt,
                "other-bot",
                "other-bot",
                [false, false],
            ),
        ];
        for (method, issuer, external, expected) in cases {
            let principal = Principal::agent(&attested(method, issuer, external));
            let Principal::Agent { method: text, .. } = &principal else {
                panic!("{principal:?}")
            };
            assert_eq!(text, method.as_str());
            let allowed = ["mesh", "billing"].map(|aud| {
                engine
                    .decide(&token_request(principal.clone(), aud, 60))
                    .allowed
            });
            assert_eq!(allowed, expected, "{method} {issuer} {external}");
        }
    }

    #[test]
    fn unguarded_tag_access_is_refused() {
        let policy = r#"
            @id("needs-repo")
            permit (principal is Agent, action == Action::"issue_token", resource)
            when { principal.getTag("repository") == "acme/app" };
        "#;
        let e = PolicyEngine::from_files(files(&[("p.cedar", policy)]), "test").unwrap_err();
        assert!(e.to_string().contains("p.cedar: policy needs-repo:"), "{e}");
    }

    #[test]
    fn evaluation_error_denies_and_is_reported() {
        // Overflow is a runtime error the validator cannot rule out; the erroring permit
        // allows nothing, and the denial names it.
        let policy = r#"
            @id("overflows")
            permit (principal is Agent, action == Action::"issue_token", resource)
            when { context.now + 9223372036854775807 > 0 };
        "#;
        let engine = PolicyEngine::from_files(files(&[("p.cedar", policy)]), "test").unwrap();
        let d = engine.decide(&token_request(agent(&[]), "dev", 60));
        assert!(!d.allowed);
        assert_eq!(d.policy_ids, ["overflows"]);
        assert_eq!(d.errors.len(), 1);
        assert!(d.errors[0].contains("overflows"), "{d:?}");
        assert!(d.errors[0].contains("overflow"), "{d:?}");
        let why = d.explain();
        assert!(why.starts_with("denied by policy overflows"), "{why}");
        assert!(why.contains("evaluation failed, which denies"), "{why}");
    }

    /// The issue's pair: a permit and a forbid whose condition overflows for most
    /// lifetimes. Cedar alone skips the erroring forbid and allows; here it denies.
    const OVERFLOWING_FORBID: &str = r#"
        @id("tools")
        permit (principal is Agent, action == Action::"issue_token", resource == Audience::"x");
        @id("ttl-overflow")
        forbid (principal is Agent, action == Action::"issue_token", resource == Audience::"x")
        when { context.ttl_seconds * 9223372036854775807 > 0 };
    "#;

    #[test]
    fn an_erroring_forbid_denies_instead_of_being_skipped() {
        let engine =
            PolicyEngine::from_files(files(&[("p.cedar", OVERFLOWING_FORBID)]), "test").unwrap();
        // ttl 300: the forbid overflows. Cedar alone would allow by `tools`.
        let d = engine.decide(&token_request(agent(&[]), "x", 300));
        assert!(!d.allowed, "{d:?}");
        assert!(!d.approval_required && d.max_ttl_seconds.is_none(), "{d:?}");
        assert_eq!(d.policy_ids, ["ttl-overflow"], "the permit did not decide");
        assert_eq!(d.errors.len(), 1, "{d:?}");
        assert!(d.errors[0].contains("ttl-overflow"), "{d:?}");
        assert!(
            d.errors[0].contains("overflow while attempting to multiply"),
            "{d:?}"
        );
        let why = d.explain();
        assert!(
            why.contains("ttl-overflow") && why.contains("overflow"),
            "{why}"
        );
        // ttl 1: no overflow; the forbid holds and denies as written.
        let d = engine.decide(&token_request(agent(&[]), "x", 1));
        assert!(!d.allowed, "{d:?}");
        assert_eq!(d.policy_ids, ["ttl-overflow"]);
        assert!(d.errors.is_empty(), "{d:?}");
        assert_eq!(d.explain(), "denied by policy ttl-overflow");
        // ttl 0: the forbid is false without error; the permit allows.
        let d = engine.decide(&token_request(agent(&[]), "x", 0));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policy_ids, ["tools"]);
    }

    #[test]
    fn an_erroring_policy_that_does_not_apply_denies_nothing() {
        // The forbid's scope names another audience and another action: it is never
        // evaluated for these requests, so it cannot deny them by erroring.
        let policy = format!(
            "{OVERFLOWING_FORBID}
            @id(\"y\")
            permit (principal is Agent, action == Action::\"issue_token\", resource == Audience::\"y\");
            @id(\"exchange-overflow\")
            forbid (principal, action == Action::\"exchange_token\", resource)
            when {{ context.ttl_seconds * 9223372036854775807 > 0 }};"
        );
        let engine = PolicyEngine::from_files(files(&[("p.cedar", &policy)]), "test").unwrap();
        let d = engine.decide(&token_request(agent(&[]), "y", 300));
        assert!(d.allowed, "{d:?}");
        assert_eq!(d.policy_ids, ["y"]);
        assert!(d.errors.is_empty(), "{d:?}");
    }

    #[test]
    fn errors_and_satisfied_forbids_are_all_named() {
        let policy = format!(
            "{OVERFLOWING_FORBID}
            @id(\"no-x\")
            forbid (principal, action, resource == Audience::\"x\");"
        );
        let engine = PolicyEngine::from_files(files(&[("p.cedar", &policy)]), "test").unwrap();
        let d = engine.decide(&token_request(agent(&[]), "x", 300));
        assert!(!d.allowed);
        assert_eq!(d.policy_ids, ["no-x", "ttl-overflow"]);
        assert_eq!(d.errors.len(), 1, "{d:?}");
    }

    #[test]
    fn a_request_that_does_not_fit_the_schema_explains_itself() {
        let engine = PolicyEngine::dev().unwrap();
        let d = engine.decide(&token_request(agent(&[]), "dev", u64::MAX));
        assert!(!d.allowed && d.policy_ids.is_empty(), "{d:?}");
        let why = d.explain();
        assert!(
            why.starts_with("denied: the request could not be evaluated"),
            "{why}"
        );
        assert!(why.contains("too large"), "{why}");
    }

    #[test]
    fn broken_and_invalid_sets_are_refused_and_previous_set_stays() {
        let engine = PolicyEngine::dev().unwrap();
        let before = engine.info();
        let dev = token_request(agent(&[]), "dev", 600);
        let prod = token_request(agent(&[]), "staging", 600);

        let syntax = "@id(\"oops\") permit (principal, action, resource) when { ;";
        let e = engine
            .apply_files(files(&[("broken.cedar", syntax)]), "test")
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("broken.cedar"), "{msg}");
        assert!(matches!(e, PolicyError::Invalid { .. }));

        let invalid = r#"
            @id("bad-attr")
            permit (principal is Agent, action == Action::"issue_token", resource)
            when { principal.nosuch == "x" };
        "#;
        let e = engine
            .apply_files(
                files(&[("invalid.cedar", invalid), ("ok.cedar", DEV_POLICY)]),
                "test",
            )
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("invalid.cedar: policy bad-attr:"), "{msg}");
        assert!(msg.contains("nosuch"), "{msg}");
        let PolicyError::Invalid { problems, .. } = e else {
            panic!("{msg}")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");

        assert_eq!(engine.info(), before);
        assert!(engine.decide(&dev).allowed);
        assert!(!engine.decide(&prod).allowed);
    }

    #[test]
    fn approval_is_required_only_when_every_deciding_permit_asks_for_it() {
        let engine = PolicyEngine::dev().unwrap();
        let d = engine.decide(&token_request(agent(&[]), "prod", 60));
        assert!(d.allowed && d.approval_required, "{d:?}");
        assert_eq!(d.policy_ids, ["prod-needs-approval"]);
        assert!(
            !engine
                .decide(&token_request(agent(&[]), "dev", 60))
                .approval_required
        );
        let both = r#"
            @id("needs") @approval("required")
            permit (principal is Agent, action == Action::"issue_token", resource);
            @id("plain")
            permit (principal is Agent, action == Action::"issue_token", resource == Audience::"dev");
        "#;
        engine
            .apply_files(files(&[("a.cedar", both)]), "test")
            .unwrap();
        let d = engine.decide(&token_request(agent(&[]), "dev", 60));
        assert!(d.allowed && !d.approval_required, "{d:?}");
        let d = engine.decide(&token_request(agent(&[]), "ops", 60));
        assert!(d.allowed && d.approval_required, "{d:?}");
        for (bad, needle) in [
            (
                r#"@id("f") @approval("required") forbid (principal, action, resource);"#,
                "@approval only applies to permit",
            ),
            (
                r#"@id("p") @approval("yes") permit (principal, action, resource);"#,
                "the only value is \"required\"",
            ),
        ] {
            let e = engine
                .apply_files(files(&[("b.cedar", bad)]), "test")
                .unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn annotation_problems_are_refused() {
        for (policy, needle) in [
            (
                r#"@id("z") @max_ttl_seconds("0") permit (principal, action, resource);"#,
                "policy z: @max_ttl_seconds(\"0\")",
            ),
            (
                r#"@id("n") @max_ttl_seconds("15m") permit (principal, action, resource);"#,
                "policy n: @max_ttl_seconds(\"15m\")",
            ),
            (
                r#"@id("f") @max_ttl_seconds("60") forbid (principal, action, resource);"#,
                "policy f: @max_ttl_seconds only applies to permit",
            ),
            (
                r#"@id("") permit (principal, action, resource);"#,
                "must not be empty",
            ),
            (
                "permit (principal == ?principal, action, resource);",
                "templates",
            ),
        ] {
            let e = PolicyEngine::from_files(files(&[("a.cedar", policy)]), "test").unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn duplicate_ids_are_refused_naming_both_files() {
        let a = r#"@id("same") permit (principal is Agent, action == Action::"issue_token", resource);"#;
        let e =
            PolicyEngine::from_files(files(&[("b.cedar", a), ("a.cedar", a)]), "test").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("policy same: the id is used in both a.cedar and b.cedar"),
            "{msg}"
        );
        let twice = format!("{a}\n{a}");
        let e = PolicyEngine::from_files(files(&[("a.cedar", &twice)]), "test").unwrap_err();
        assert!(e.to_string().contains("used twice in a.cedar"), "{e}");
    }

    #[test]
    fn file_names_and_empty_sets() {
        let e = PolicyEngine::from_files(files(&[("notes.txt", "x")]), "test").unwrap_err();
        assert!(
            e.to_string().contains("notes.txt: not a policy file"),
            "{e}"
        );
        let e =
            PolicyEngine::from_files(files(&[(SCHEMA_FILE, DEFAULT_SCHEMA)]), "grpc").unwrap_err();
        assert!(matches!(e, PolicyError::NoPolicyFiles { .. }), "{e}");
        let e = PolicyEngine::from_files(files(&[("a/x.cedar", DEV_POLICY)]), "t").unwrap_err();
        assert!(e.to_string().contains("path separators"), "{e}");
    }

    #[test]
    fn custom_schema_is_used_and_checked() {
        let narrow = "entity Agent; entity Audience; action issue_token appliesTo { principal: Agent, resource: Audience };";
        let e = PolicyEngine::from_files(
            files(&[(DEV_POLICY_FILE, DEV_POLICY), (SCHEMA_FILE, narrow)]),
            "test",
        )
        .unwrap_err();
        // The dev policy names Client, which this schema lacks.
        assert!(e.to_string().contains("admin-client"), "{e}");
        let e = PolicyEngine::from_files(
            files(&[(DEV_POLICY_FILE, DEV_POLICY), (SCHEMA_FILE, "entity {")]),
            "test",
        )
        .unwrap_err();
        assert!(e.to_string().contains(SCHEMA_FILE), "{e}");
    }

    #[test]
    fn unknown_context_key_is_named() {
        let pairs = BTreeMap::from([
            ("tool".to_owned(), "shell".to_owned()),
            ("colour".to_owned(), "red".to_owned()),
        ]);
        let e = PolicyContext::default().with_pairs(&pairs).unwrap_err();
        assert!(e.contains("\"colour\""), "{e}");
        assert!(e.contains("data_sensitivity, environment, tool"), "{e}");

        let pairs = BTreeMap::from([
            ("tool".to_owned(), "shell".to_owned()),
            ("data_sensitivity".to_owned(), "pii".to_owned()),
        ]);
        let c = PolicyContext::default().with_pairs(&pairs).unwrap();
        assert_eq!(c.tool.as_deref(), Some("shell"));
        assert_eq!(c.data_sensitivity.as_deref(), Some("pii"));
        assert_eq!(c.environment, None);
    }

    #[test]
    fn dir_loading_and_reload() {
        let dir = TestDir::new("reload");
        let e = PolicyEngine::from_dir(&dir.0).unwrap_err();
        assert!(matches!(e, PolicyError::EmptyDir { .. }), "{e}");
        assert!(e.to_string().contains(&dir.0.display().to_string()), "{e}");

        dir.write(DEV_POLICY_FILE, DEV_POLICY);
        dir.write(".hidden.cedar", "this is not cedar");
        dir.write("README.md", "ignored");
        let engine = PolicyEngine::from_dir(&dir.0).unwrap();
        assert_eq!(engine.info().source, dir.0.display().to_string());
        assert_eq!(check_dir(&dir.0).unwrap().digest, engine.info().digest);
        assert_eq!(read_dir_files(&dir.0).unwrap().len(), 1);
        assert_eq!(engine.reload_dir(&dir.0).unwrap(), None);

        let mut req = token_request(agent(&[]), "dev", 600);
        req.context.environment = Some("prod".to_owned());
        assert!(engine.decide(&req).allowed);

        dir.write("guard.cedar", NO_PROD_TOOLS);
        let info = engine.reload_dir(&dir.0).unwrap().unwrap();
        let mut expected = PolicyEngine::dev().unwrap().info().policy_ids;
        expected.push("no-prod-tools".to_owned());
        assert_eq!(info.policy_ids, expected);
        assert_eq!(engine.decide(&req).policy_ids, ["no-prod-tools"]);
        assert_eq!(engine.reload_dir(&dir.0).unwrap(), None);

        // A broken edit is refused and the set stays.
        dir.write("guard.cedar", "forbid (");
        assert!(engine.reload_dir(&dir.0).is_err());
        assert!(check_dir(&dir.0).is_err());
        assert_eq!(engine.info(), info);
        assert!(!engine.decide(&req).allowed);
    }

    #[test]
    fn poll_dir_applies_only_directory_changes() {
        let dir = TestDir::new("poll");
        dir.write(DEV_POLICY_FILE, DEV_POLICY);
        let engine = PolicyEngine::from_dir(&dir.0).unwrap();
        let mut seen = engine.info().digest;
        assert_eq!(engine.poll_dir(&dir.0, &mut seen).unwrap(), None);

        // A set applied from elsewhere is not reverted while the directory is unchanged.
        let applied = engine
            .apply_files(files(&[("other.cedar", NO_PROD_TOOLS)]), "grpc")
            .unwrap();
        assert_eq!(engine.poll_dir(&dir.0, &mut seen).unwrap(), None);
        assert_eq!(engine.info(), applied);

        // A broken directory is reported once; the applied set stays.
        dir.write("guard.cedar", "forbid (");
        assert!(engine.poll_dir(&dir.0, &mut seen).is_err());
        assert_eq!(engine.poll_dir(&dir.0, &mut seen).unwrap(), None);
        assert_eq!(engine.info(), applied);

        dir.write("guard.cedar", NO_PROD_TOOLS);
        let info = engine.poll_dir(&dir.0, &mut seen).unwrap().unwrap();
        assert_eq!(info.source, dir.0.display().to_string());
        assert_eq!(engine.info(), info);
    }

    #[test]
    fn write_dev_dir_seeds_once() {
        let dir = TestDir::new("seed");
        let sub = dir.0.join("policies");
        assert!(write_dev_dir(&sub).unwrap());
        assert!(!write_dev_dir(&sub).unwrap());
        let engine = PolicyEngine::from_dir(&sub).unwrap();
        assert_eq!(
            engine.info().policy_ids,
            PolicyEngine::dev().unwrap().info().policy_ids
        );
    }

    #[tokio::test]
    async fn watch_applies_changes_and_keeps_set_on_error() {
        let dir = TestDir::new("watch");
        dir.write(DEV_POLICY_FILE, DEV_POLICY);
        let engine = Arc::new(PolicyEngine::from_dir(&dir.0).unwrap());
        let first = engine.info().digest;
        let task = Arc::clone(&engine).watch(dir.0.clone(), Duration::from_millis(20));

        dir.write("guard.cedar", "forbid (");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(engine.info().digest, first);

        dir.write("guard.cedar", NO_PROD_TOOLS);
        let mut changed = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if engine.info().digest != first {
                changed = true;
                break;
            }
        }
        task.abort();
        assert!(changed);
        assert!(
            engine
                .info()
                .policy_ids
                .contains(&"no-prod-tools".to_owned())
        );
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<PolicyEngine>();
    }
}
