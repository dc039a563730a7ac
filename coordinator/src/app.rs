//! The `quorate-coordinator` process: configuration, tracing, serving and graceful drain.

use std::process::ExitCode;

use std::sync::Arc;

use crate::audit::{self, AuditLog};
use crate::authn::{Authenticator, AuthnConfig};
use crate::cluster::Cluster;
use crate::config::{Args, Command, Config, StoreSpec};
use crate::election::{Election, Job};
use crate::identity::service::IdentityApi;
use crate::identity::store::{IdentityStore, RedbIdentityStore};
use crate::identity::{IdentityConfig, IdentityPlane, http};
use crate::policy::PolicyEngine;
use crate::pools;
use crate::service::Api;
use crate::store::{KeyStore, Store};
use quorate_proto::api::approval_service_server::ApprovalServiceServer;
use quorate_proto::api::audit_service_server::AuditServiceServer;
use quorate_proto::api::cluster_service_server::ClusterServiceServer;
use quorate_proto::api::identity_service_server::IdentityServiceServer;
use quorate_proto::api::key_service_server::KeyServiceServer;
use quorate_proto::tls::{self, Identity, Role, RoleKind, Trust};
use quorate_proto::transport;

/// Runs the process with parsed arguments: sets up tracing, validates the
/// configuration (exit 2 on errors), serves until SIGTERM/SIGINT.
pub async fn main_with(args: Args) -> ExitCode {
    quorate_proto::process::init_tracing(args.log_format == "json");
    if let Some(Command::Migrate { store }) = &args.command {
        return migrate(store).await;
    }
    let cfg = match args.build() {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("quorate-coordinator: {e}");
            }
            return ExitCode::from(2);
        }
    };
    match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quorate-coordinator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How often a coordinator over a shared store picks up keys other coordinators
/// created, rotated or renewed.
const KEY_RELOAD: std::time::Duration = std::time::Duration::from_secs(2);

/// `quorate-coordinator migrate`: applies the PostgreSQL store's pending migrations.
async fn migrate(url: &str) -> ExitCode {
    let target = match crate::pg::Target::parse(url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("quorate-coordinator migrate: {e}");
            return ExitCode::from(2);
        }
    };
    match crate::pg::migrate(&target).await {
        Ok(applied) => {
            #[allow(
                clippy::print_stdout,
                reason = "the command's result, read by operators and scripts"
            )]
            if applied.is_empty() {
                println!("schema is current (version {})", crate::pg::SCHEMA_VERSION);
            } else {
                let v: Vec<String> = applied.iter().map(i32::to_string).collect();
                println!(
                    "applied migrations {}; schema version {}",
                    v.join(", "),
                    crate::pg::SCHEMA_VERSION
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("quorate-coordinator migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The three stores of `spec` (`coordinator/STORE.md`).
async fn open_stores(
    spec: &StoreSpec,
    sinks: &[audit::SinkSpec],
) -> Result<(Arc<dyn KeyStore>, Box<dyn IdentityStore>, AuditLog), String> {
    match spec {
        StoreSpec::Redb(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let keys = Store::open(&dir.join("coordinator.redb")).map_err(|e| e.to_string())?;
            let audit = AuditLog::open(&dir.join("audit.redb"), sinks)?;
            let identity =
                RedbIdentityStore::open(&dir.join("identity.redb")).map_err(|e| e.to_string())?;
            Ok((Arc::new(keys), Box::new(identity), audit))
        }
        StoreSpec::Postgres(target) => {
            let pg = crate::pg::PgStore::open(target)
                .await
                .map_err(|e| e.to_string())?;
            let audit = AuditLog::with_store(Box::new(pg.clone()), sinks)?;
            Ok((Arc::new(pg.clone()), Box::new(pg), audit))
        }
    }
}

async fn run(cfg: Config) -> Result<(), String> {
    let identity = Identity::from_pem_files(&cfg.cert, &cfg.key).map_err(|e| e.to_string())?;
    let trust = Trust::from_pem_file(&cfg.ca, &cfg.domain).map_err(|e| e.to_string())?;
    match identity.role(&cfg.domain).map_err(|e| e.to_string())? {
        Role::Coordinator => {}
        other => {
            return Err(format!(
                "{} holds the certificate of {other}, not of the coordinator",
                cfg.cert.display()
            ));
        }
    }
    let (store, identity_store, audit) = open_stores(&cfg.store, &cfg.audit_sinks).await?;
    let audit = Arc::new(audit);
    let client_tls = tls::client_config(&identity, &trust).map_err(|e| e.to_string())?;
    let mut channels = Vec::new();
    for (i, addr) in &cfg.nodes {
        let ch =
            transport::connect_lazy(*addr, &Role::Node(i.get()), &cfg.domain, client_tls.clone())
                .map_err(|e| e.to_string())?;
        channels.push((*i, *addr, ch));
    }
    let cluster = Cluster::new(
        cfg.params,
        trust.clone(),
        channels,
        store,
        cfg.record_relay.clone(),
    )
    .map_err(|e| e.to_string())?;
    let mut retiring = Vec::new();
    for (i, addr) in &cfg.retire {
        let ch = match addr {
            None => None,
            Some(a) => Some(
                transport::connect_lazy(*a, &Role::Node(i.get()), &cfg.domain, client_tls.clone())
                    .map_err(|e| e.to_string())?,
            ),
        };
        retiring.push((*i, ch));
    }
    cluster.set_retiring(retiring);
    if let Some(p) = cfg.fail_point {
        cluster.set_fail_point(p);
    }
    cluster.set_instance(cfg.instance_id.clone());
    // Singleton background jobs: elected through the shared store, or always here. Over
    // PostgreSQL this first claims the instance id, so that a second coordinator given
    // the same id stops here, before it could discard the first one's presignatures.
    let election = match &cfg.store {
        StoreSpec::Redb(_) => Election::always(&cfg.instance_id),
        StoreSpec::Postgres(target) => Election::postgres((**target).clone(), &cfg.instance_id)
            .await
            .map_err(|e| format!("the store: {e}"))?,
    };
    // The nodes may hold presignatures of an earlier process of this instance, whose
    // public halves died with it: have them forgotten before pools fill again. Nodes
    // tag presignatures by instance, so other coordinators' pools stay
    // (coordinator/STORE.md).
    cluster.discard_node_presignatures().await;
    tracing::info!(instance = %cfg.instance_id, "coordinator instance");
    let other = cluster
        .keys_with_other_params()
        .map_err(|e| e.to_string())?;
    if !other.is_empty() {
        let names: Vec<String> = other
            .iter()
            .map(|v| format!("{} {}", v.name, crate::cluster::describe(&v.public.params)))
            .collect();
        let to = crate::cluster::describe(&cfg.params);
        if !cfg.reshare {
            return Err(format!(
                "keys held with other parameters than this coordinator's {to}: {}; start once with --reshare (every node of the new set up, and --retire for each node leaving) to reshare them, or give the old --node list and --threshold",
                names.join(", ")
            ));
        }
        tracing::info!(keys = %names.join(", "), to = %to, "resharing keys to this coordinator's parameters");
        let done = cluster
            .reshare_to_params()
            .await
            .map_err(|e| format!("resharing to {to} failed: {e}"))?;
        tracing::info!(keys = done.len(), to = %to, "keys reshared");
    }
    let left = cluster
        .retire_moved_shares()
        .await
        .map_err(|e| e.to_string())?;
    if left > 0 {
        tracing::warn!(
            left,
            "old key shares not yet destroyed on nodes that left the cluster (see above)"
        );
    }
    if matches!(cfg.store, StoreSpec::Postgres(_)) {
        // Keys created, rotated or renewed by another coordinator of the shared store.
        let c = cluster.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEY_RELOAD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match c.reload_keys() {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(n, "keys changed in the shared store: reloaded"),
                    Err(e) => tracing::warn!(error = %e, "reloading keys from the store failed"),
                }
            }
        });
    }
    tokio::spawn(pools::fill_forever(cluster.clone(), cfg.marks));
    tokio::spawn(crate::lifecycle::heartbeat_forever(cluster.clone()));
    tokio::spawn(crate::lifecycle::run_forever(
        cluster.clone(),
        cfg.refresh_interval,
        election.clone(),
    ));
    if let Some(m) = cfg.metrics_listen {
        let c = cluster.clone();
        let e = election.clone();
        let render = move || format!("{}{}", c.render_metrics(), e.render_metrics());
        let at = quorate_proto::metrics::serve(m, std::sync::Arc::new(render))
            .await
            .map_err(|e| format!("cannot serve metrics on {m}: {e}"))?;
        tracing::info!(%at, "metrics at http://{at}/metrics");
    }
    let (http_task, issuer) = start_identity_http(
        &cfg,
        &trust,
        cluster.clone(),
        identity_store,
        Arc::clone(&audit),
        election.clone(),
    )
    .await?;
    let checkpoints = audit::checkpoint::spawn(
        Arc::clone(&audit),
        cluster.clone(),
        cfg.audit_key.clone(),
        issuer.url.clone(),
        cfg.audit_checkpoint,
        election,
    );
    let server_tls =
        tls::server_config(&identity, &trust, &[RoleKind::Client]).map_err(|e| e.to_string())?;
    let (listener, addr) = transport::bind(cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<KeyServiceServer<Api>>().await;
    reporter
        .set_serving::<IdentityServiceServer<IdentityApi>>()
        .await;
    let issuer_url = issuer.url.clone();
    let api = Api::new(
        cluster,
        cfg.domain.clone(),
        Arc::clone(issuer.plane.policy()),
        audit,
    );
    let agent_task = match cfg.agent_listen {
        Some(at) => Some(start_agent_listener(at, &identity, Arc::clone(&issuer.plane)).await?),
        None => None,
    };
    let identity_api = IdentityApi::new(issuer.plane);
    tracing::info!(%addr, params = %crate::cluster::describe(&cfg.params), "coordinator listening");
    #[allow(
        clippy::print_stdout,
        reason = "the readiness line is read by `quorate dev` and tests"
    )]
    {
        println!("QUORATE_READY coordinator issuer={issuer_url} addr={addr}");
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(KeyServiceServer::new(api.clone()))
        .add_service(ClusterServiceServer::new(api))
        .add_service(IdentityServiceServer::new(identity_api.clone()))
        .add_service(ApprovalServiceServer::new(identity_api.clone()))
        .add_service(AuditServiceServer::new(identity_api))
        .serve_with_incoming_shutdown(transport::incoming(listener, server_tls), async {
            let _ = stop_rx.await;
        });
    let result = quorate_proto::process::serve_until_signal(server, stop_tx, cfg.grace).await;
    http_task.abort();
    checkpoints.abort();
    if let Some(t) = agent_task {
        t.abort();
    }
    result
}

/// Binds the agent listener: gRPC `IdentityService` for agents that authenticate with
/// their X.509-SVID (hybrid-only TLS; each request's chain verified against the
/// configured SVID trust bundles, never the cluster CA).
async fn start_agent_listener(
    at: std::net::SocketAddr,
    identity: &Identity,
    plane: Arc<IdentityPlane>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let hints = plane.authn().svid_root_hints();
    if hints.is_empty() {
        return Err(
            "--agent-listen: the trust config names no `svid` trust domain with an X.509 bundle"
                .to_owned(),
        );
    }
    // The chain is verified per request (IdentityApi::for_agents), so that a refused
    // SVID hears why.
    let tls = tls::agent_server_config(identity, &hints).map_err(|e| e.to_string())?;
    let (listener, addr) = transport::bind(at)
        .await
        .map_err(|e| format!("cannot listen on {at}: {e}"))?;
    tracing::info!(%addr, "agent listener (X.509-SVID)");
    let server = tonic::transport::Server::builder()
        .add_service(IdentityServiceServer::new(IdentityApi::for_agents(plane)))
        .serve_with_incoming(transport::incoming(listener, tls));
    Ok(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "agent listener stopped");
        }
    }))
}

/// The running identity plane and its issuer URL.
struct IssuerHandle {
    plane: Arc<IdentityPlane>,
    url: String,
}

/// Loads policy and trusted issuers, opens the identity store, binds the HTTPS
/// metadata listener and starts it (and the policy watcher).
async fn start_identity_http(
    cfg: &Config,
    trust: &Trust,
    cluster: Arc<Cluster>,
    store: Box<dyn IdentityStore>,
    audit: Arc<AuditLog>,
    election: Election,
) -> Result<(tokio::task::JoinHandle<()>, IssuerHandle), String> {
    let operator_key = match &cfg.operator_public_key {
        None => None,
        Some(path) => Some(
            quorate_authz::bundle::public_key_from_file(path)
                .map_err(|e| format!("--operator-public-key {e}"))?,
        ),
    };
    let signed = match &operator_key {
        None => None,
        Some(key) => Some(starting_bundle(cfg, key, &*store)?),
    };
    let policy = match (signed, &cfg.policy_dir) {
        (Some(bundle), _) => {
            cluster.set_policy_bundle(Some((bundle.id().to_owned(), bundle.jws().to_owned())));
            tracing::info!(
                bundle = bundle.id(),
                "deciding under the operator-signed policy bundle"
            );
            PolicyEngine::from_bundle(bundle).map_err(|e| format!("policy bundle: {e}"))?
        }
        (None, Some(dir)) => PolicyEngine::from_dir(dir)
            .map_err(|e| format!("policy directory {}: {e}", dir.display()))?,
        (None, None) => PolicyEngine::from_files(
            vec![("builtin.cedar".to_owned(), BUILTIN_POLICY.to_owned())],
            "built-in (admin client only)",
        )
        .map_err(|e| format!("built-in policy: {e}"))?,
    };
    let policy = Arc::new(policy);
    if let Some(dir) = &cfg.policy_dir {
        Arc::clone(&policy).watch(dir.clone(), cfg.policy_poll);
    }
    let (listener, http_addr) = transport::bind(cfg.http_listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.http_listen))?;
    let url = cfg
        .issuer_url
        .clone()
        .unwrap_or_else(|| format!("https://localhost:{}", http_addr.port()));
    let authn = match &cfg.trust_config {
        Some(path) => {
            let ac = AuthnConfig::from_file(path)
                .map_err(|errs| format!("--trust-config: {}", errs.join("; ")))?;
            Authenticator::new(ac, &cfg.domain).await?
        }
        None => Authenticator::empty(&cfg.domain),
    }
    // Registered clients' assertions (private_key_jwt) name the issuer or the token
    // endpoint as their audience (RFC 7523 §3; fragment nodes accept the same).
    .with_client_assertion_audiences(vec![url.clone(), format!("{url}/token")]);
    let web = Identity::from_pem_files(&cfg.http_cert, &cfg.http_key).map_err(|e| e.to_string())?;
    // Agents' X.509-SVIDs are offered as client CAs too, for tls_client_auth at the
    // token endpoint.
    let http_tls = tls::metadata_server_config(&web, trust, &authn.svid_root_hints())
        .map_err(|e| e.to_string())?;
    let authn = Arc::new(authn);
    let plane = Arc::new(IdentityPlane::new(
        cluster,
        policy,
        authn,
        store,
        IdentityConfig {
            issuer: url.clone(),
            domain: cfg.domain.clone(),
            signing_key: cfg.token_key.clone(),
            credential_key: cfg.credential_key.clone(),
            approval_ttl_seconds: cfg.approval_ttl_seconds,
            operator_key,
        },
        audit,
    )?);
    let sweeper = Arc::clone(&plane);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = sweeper.sweep_approvals().await {
                tracing::warn!(error = %e, "expiring approval requests failed");
            }
        }
    });
    let purger = Arc::clone(&plane);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
        loop {
            tick.tick().await;
            if !election.is_leader(Job::Purge) {
                continue;
            }
            match purger.purge_expired() {
                Ok(0) => {}
                Ok(n) => tracing::debug!(n, "forgot revocations of expired tokens"),
                Err(e) => tracing::warn!(error = %e, "purging expired revocations failed"),
            }
        }
    });
    let task = http::serve(
        listener,
        http_tls,
        Arc::clone(&plane),
        trust.clone(),
        cfg.allow_classic_token_endpoints,
    );
    tracing::info!(%http_addr, issuer = %url, "metadata listener (discovery, JWKS, introspection, revocation)");
    Ok((task, IssuerHandle { plane, url }))
}

/// The bundle a coordinator with an operator key starts with: the one last applied
/// (in its store) or `--policy-bundle`, whichever is newer; both verified under the
/// operator key. Having neither is a configuration error.
fn starting_bundle(
    cfg: &Config,
    key: &p256::PublicKey,
    store: &dyn IdentityStore,
) -> Result<quorate_authz::bundle::PolicyBundle, String> {
    use quorate_authz::bundle::PolicyBundle;
    let stored = match store.policy_bundle().map_err(|e| e.to_string())? {
        None => None,
        Some(jws) => match PolicyBundle::verify(&jws, key) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "the stored policy bundle does not verify under --operator-public-key; ignoring it");
                None
            }
        },
    };
    let given = match &cfg.policy_bundle {
        None => None,
        Some(path) => {
            let jws = std::fs::read_to_string(path)
                .map_err(|e| format!("--policy-bundle {}: {e}", path.display()))?;
            Some(
                PolicyBundle::verify(&jws, key)
                    .map_err(|e| format!("--policy-bundle {}: {e}", path.display()))?,
            )
        }
    };
    let chosen = match (stored, given) {
        (Some(s), Some(g)) if g.seq() > s.seq() => g,
        (Some(s), _) => s,
        (None, Some(g)) => g,
        (None, None) => {
            return Err("--operator-public-key: no signed policy bundle yet; give --policy-bundle FILE (`quorate policy sign DIR --operator-key KEY --out FILE`)".into());
        }
    };
    store
        .put_policy_bundle(chosen.jws())
        .map_err(|e| e.to_string())?;
    Ok(chosen)
}

/// Without `--policy-dir`: the admin client administers, no agent gets anything until a
/// policy set is applied.
const BUILTIN_POLICY: &str = r#"@id("admin-client")
permit (principal == Client::"admin", action, resource);
"#;
