"""Checks of deploy/ that no schema makes: the security settings a review asks for first,
each node's own identity and volume, and that every flag and variable the files pass to
quorate-node and quorate-coordinator exists in that binary's --help. Run by
deploy/validate; each subcommand prints what it checked and exits 1 naming every
problem it found.

    checks.py k8s RENDERED.yaml --help-node FILE --help-coordinator FILE
    checks.py compose compose.yaml --help-node FILE --help-coordinator FILE
    checks.py systemd UNIT... --help-node FILE --help-coordinator FILE
    checks.py containerfile Containerfile --root REPO
"""

import argparse
import re
import sys
from pathlib import Path

import yaml

# Read by tracing, not by clap, so absent from --help.
EXTRA_ENV = {"QUORATE_LOG"}


class Report:
    def __init__(self, what):
        self.what = what
        self.problems = []
        self.checked = 0

    def check(self, ok, problem):
        self.checked += 1
        if not ok:
            self.problems.append(problem)

    def finish(self):
        for p in self.problems:
            print(f"  FAIL {self.what}: {p}")
        if self.problems:
            print(f"{self.what}: {len(self.problems)} of {self.checked} checks failed")
            sys.exit(1)
        print(f"{self.what}: {self.checked} checks passed")


class Help:
    """The long flags and environment variables one binary's --help names."""

    def __init__(self, path):
        text = Path(path).read_text()
        self.flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", text, re.M))
        # `[env: NAME=value]`, or `[env: NAME]` where clap hides the value (a store URL).
        self.env = set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", text)) | EXTRA_ENV
        if not self.flags:
            sys.exit(f"{path}: no flags found; is it the output of --help?")


def check_args(report, where, args, help_):
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            report.check(flag in help_.flags, f"{where}: {flag} is not a flag of the binary")


def binary_help(command, helps):
    name = Path(command).name if command else ""
    return helps.get(name)


# --------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------

def check_k8s(path, helps):
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    r = Report(f"k8s {path}")
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    servers = by_kind.get("StatefulSet", []) + by_kind.get("Deployment", [])
    workloads = servers + by_kind.get("Job", [])
    nodes, coordinators, jobs = [], [], []
    for w in workloads:
        name = w["metadata"]["name"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        component = labels.get("app.kubernetes.io/component")
        if w["kind"] == "Job":
            jobs.append(w)
        else:
            r.check(component in ("fragment-node", "coordinator"),
                    f"{name}: component {component!r} is neither fragment-node nor coordinator")
            (nodes if component == "fragment-node" else coordinators).append(w)
        pod = w["spec"]["template"]["spec"]
        sc = pod.get("securityContext", {})
        r.check(sc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot is not true")
        r.check(sc.get("runAsUser", 0) != 0, f"{name}: pod runs as uid 0")
        r.check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                f"{name}: pod seccompProfile is not RuntimeDefault")
        r.check(pod.get("automountServiceAccountToken") is False,
                f"{name}: the pod mounts a service account token")
        for c in pod.get("initContainers", []) + pod["containers"]:
            cname = f"{name}/{c['name']}"
            csc = c.get("securityContext", {})
            r.check(csc.get("readOnlyRootFilesystem") is True, f"{cname}: root filesystem writable")
            r.check(csc.get("allowPrivilegeEscalation") is False, f"{cname}: privilege escalation allowed")
            r.check(csc.get("capabilities", {}).get("drop") == ["ALL"], f"{cname}: capabilities not all dropped")
            r.check(not csc.get("capabilities", {}).get("add"), f"{cname}: adds capabilities")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for what in ("cpu", "memory"):
                    r.check(what in res.get(kind, {}), f"{cname}: no {what} {kind[:-1]}")
        for c in pod["containers"]:
            cname = f"{name}/{c['name']}"
            # A Job runs to completion: nothing to probe.
            for probe in ("readinessProbe", "livenessProbe") if w["kind"] != "Job" else ():
                r.check(probe in c, f"{cname}: no {probe}")
            command = (c.get("command") or [None])[0]
            h = binary_help(command, helps)
            r.check(h is not None, f"{cname}: command {command!r} is not a Quorate binary")
            if h:
                check_args(r, cname, c.get("args", []) + c["command"][1:], h)
                for e in c.get("env", []):
                    r.check(e["name"] in h.env, f"{cname}: {e['name']} is not read by {command}")

    # Each fragment node: its own Secret, its own volume claim, one replica.
    r.check(len(coordinators) == 1, f"{len(coordinators)} coordinators, expected 1")
    secrets, claims = [], []
    for w in nodes:
        name = w["metadata"]["name"]
        spec = w["spec"]
        r.check(spec.get("replicas") == 1, f"{name}: replicas is not 1")
        vols = spec["template"]["spec"].get("volumes", [])
        names = [v["secret"]["secretName"] for v in vols if "secret" in v]
        r.check(len(names) == 1, f"{name}: {len(names)} Secret volumes, expected 1")
        secrets += names
        vcts = spec.get("volumeClaimTemplates", [])
        r.check(len(vcts) == 1, f"{name}: no volume claim template of its own")
        claims += [(name, v["metadata"]["name"]) for v in vcts]
    r.check(len(set(secrets)) == len(secrets) == len(nodes), f"nodes share Secrets: {secrets}")

    # The coordinator names every node, by its Service, and a threshold with n >= 2t+1.
    services = {s["metadata"]["name"] for s in by_kind.get("Service", [])}
    node_services = sorted(w["spec"]["serviceName"] for w in nodes)
    for s in node_services:
        r.check(s in services, f"node Service {s} is missing")
    if coordinators:
        env = {e["name"]: e.get("value") for c in coordinators[0]["spec"]["template"]["spec"]["containers"]
               for e in c.get("env", [])}
        listed = env.get("QUORATE_COORDINATOR_NODES") or ""
        entries = [e for e in listed.split(",") if e]
        expected = [f"{i}=$({s.upper().replace('-', '_')}_SERVICE_HOST):7101"
                    for i, s in enumerate(sorted(node_services, key=lambda s: int(s.rsplit('-', 1)[1])), 1)]
        r.check(entries == expected,
                f"QUORATE_COORDINATOR_NODES is {listed!r}, expected {','.join(expected)!r}")
        t = int(env.get("QUORATE_THRESHOLD") or 1)
        n = len(nodes)
        r.check(n >= 2 * t + 1, f"n={n} t={t}: needs n >= 2t+1")
        print(f"  coordinator: n={n} t={t}")

    # Nodes take ingress from the coordinator (and the monitoring namespace) only.
    policies = by_kind.get("NetworkPolicy", [])
    node_policies = [p for p in policies
                     if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == "fragment-node"]
    r.check(len(node_policies) == 1, "no NetworkPolicy selecting the fragment nodes")
    for p in node_policies:
        r.check("Ingress" in p["spec"].get("policyTypes", []), "node NetworkPolicy does not restrict ingress")
        for rule in p["spec"].get("ingress", []):
            sources = rule.get("from", [])
            r.check(bool(sources), "a node ingress rule admits any source")
            for src in sources:
                pod_sel = src.get("podSelector", {}).get("matchLabels", {})
                ns_sel = src.get("namespaceSelector", {}).get("matchLabels", {})
                ok = (pod_sel.get("app.kubernetes.io/component") == "coordinator" and not ns_sel) or \
                     (ns_sel == {"kubernetes.io/metadata.name": "monitoring"} and not pod_sel
                      and [pt["port"] for pt in rule.get("ports", [])] == [9090])
                r.check(ok, f"node ingress from {src} is neither the coordinator nor metrics scraping")
    r.check(not by_kind.get("Secret"), "the manifests carry a Secret: secrets are made by their operators, never committed")
    for w in workloads:
        for c in w["spec"]["template"]["spec"].get("initContainers", []) + w["spec"]["template"]["spec"]["containers"]:
            inline = [e["name"] for e in c.get("env", []) if "postgres" in str(e.get("value", ""))]
            inline += [a for a in c.get("args", []) + c.get("command", []) if "postgres://" in a or "postgresql://" in a]
            r.check(not inline, f"{w['metadata']['name']}/{c['name']}: a store URL inline ({inline}); it comes from a Secret")
    if coordinators:
        check_k8s_store(r, coordinators[0], jobs, by_kind)
    pdbs = by_kind.get("PodDisruptionBudget", [])
    r.check(any(p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/component") == "fragment-node"
                for p in pdbs), "no PodDisruptionBudget for the fragment nodes")
    ns = by_kind.get("Namespace", [])
    r.check(bool(ns) and ns[0]["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "restricted",
            "the namespace does not enforce the restricted Pod Security Standard")
    print(f"  {len(nodes)} fragment nodes: {', '.join(w['metadata']['name'] for w in nodes)}")
    r.finish()


def selects(selector, labels):
    """Whether a podSelector (matchLabels and `In` matchExpressions) selects `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        if e["operator"] != "In" or labels.get(e["key"]) not in e.get("values", []):
            return False
    return True


def check_k8s_store(r, coordinator, jobs, by_kind):
    """redb: one replica with its volume. PostgreSQL (QUORATE_COORDINATOR_STORE set):
    the URL from a Secret, at least two replicas and no volume, a migrate Job, a budget
    and a Service over the coordinators, egress to the database."""
    name = coordinator["metadata"]["name"]
    spec = coordinator["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container.get("env", [])}
    store = env.get("QUORATE_COORDINATOR_STORE")
    if store is None:
        r.check(spec.get("replicas") == 1, f"{name}: the redb store is single-writer, replicas must be 1")
        print("  coordinator store: redb, 1 replica")
        return
    ref = store.get("valueFrom", {}).get("secretKeyRef")
    r.check(ref is not None and "value" not in store,
            f"{name}: QUORATE_COORDINATOR_STORE (it holds the password) is not from a Secret")
    replicas = spec.get("replicas", 1)
    r.check(replicas >= 2, f"{name}: {replicas} replica(s) on the shared store, expected at least 2")
    r.check(not spec.get("volumeClaimTemplates"), f"{name}: a volume claim, but its state is in PostgreSQL")
    r.check(not any(a.startswith("--data-dir") for a in container.get("args", [])),
            f"{name}: --data-dir with the PostgreSQL store")
    migrates = [j for j in jobs if j["spec"]["template"]["spec"]["containers"][0].get("command") ==
                ["quorate-coordinator", "migrate"]]
    r.check(len(migrates) == 1, f"{len(migrates)} Jobs run `quorate-coordinator migrate`, expected 1")
    for j in migrates:
        jenv = {e["name"]: e for e in j["spec"]["template"]["spec"]["containers"][0].get("env", [])}
        jref = jenv.get("QUORATE_COORDINATOR_STORE", {}).get("valueFrom", {}).get("secretKeyRef")
        r.check(jref is not None and jref == ref,
                f"{j['metadata']['name']}: does not take the coordinators' store URL from their Secret")
    labels = spec["template"]["metadata"]["labels"]
    pdbs = [p for p in by_kind.get("PodDisruptionBudget", []) if selects(p["spec"]["selector"], labels)]
    r.check(len(pdbs) == 1 and (pdbs[0]["spec"].get("maxUnavailable") == 1 or
                                pdbs[0]["spec"].get("minAvailable", 0) >= 1),
            "no PodDisruptionBudget keeping a coordinator serving")
    services = [s for s in by_kind.get("Service", []) if s["metadata"]["name"] == spec["serviceName"]]
    r.check(bool(services) and all(s["spec"].get("selector") and
                                   all(labels.get(k) == v for k, v in s["spec"]["selector"].items())
                                   for s in services),
            f"the Service {spec['serviceName']} does not select every coordinator")
    egress = [p for p in by_kind.get("NetworkPolicy", [])
              if selects(p["spec"]["podSelector"], labels) and "Egress" in p["spec"].get("policyTypes", [])]
    r.check(any(pt.get("port") == 5432 for p in egress for rule in p["spec"].get("egress", [])
                for pt in rule.get("ports", [])),
            "no NetworkPolicy lets the coordinators reach PostgreSQL (TCP 5432)")
    print(f"  coordinator store: PostgreSQL from Secret {ref and ref.get('name')}, {replicas} replicas")


# --------------------------------------------------------------------------------------
# Compose
# --------------------------------------------------------------------------------------

# Files several services may share: the cluster CA, PostgreSQL's CA, and the metadata
# (issuer) certificate that every coordinator of one cluster serves.
SHARED_SECRETS = {"ca", "db-ca", "metadata-cert", "metadata-key"}


def check_compose(path, helps):
    """Both compose files: compose.yaml (3 nodes, 1 coordinator on redb) and
    compose.postgres.yaml (3 nodes, 2 coordinators on PostgreSQL, a migrate job, db)."""
    text = Path(path).read_text()
    d = yaml.safe_load(text)
    r = Report(f"compose {path}")
    services = d.get("services", {})
    quorate = {k: v for k, v in services.items() if v["command"][0] in ("quorate-node", "quorate-coordinator")}
    others = {k: v for k, v in services.items() if k not in quorate}
    nodes = {k: v for k, v in quorate.items() if v["command"][0] == "quorate-node"}
    migrate = {k: v for k, v in quorate.items() if v["command"] == ["quorate-coordinator", "migrate"]}
    coord = {k: v for k, v in quorate.items() if v["command"][0] == "quorate-coordinator" and k not in migrate}
    postgres = bool(migrate) or any("env_file" in v for v in coord.values())
    if postgres:
        r.check(len(nodes) == 3 and len(coord) >= 2 and len(migrate) == 1 and list(others) == ["db"],
                f"expected 3 nodes, 2 or more coordinators, a migrate job and db, got {list(services)}")
    else:
        r.check(len(nodes) == 3 and len(coord) == 1 and not others,
                f"expected 3 nodes and a coordinator, got {list(services)}")
    volumes_seen, secrets_seen = [], []
    for name, s in services.items():
        r.check(s.get("read_only") is True, f"{name}: root filesystem writable")
        r.check(s.get("cap_drop") == ["ALL"], f"{name}: capabilities not all dropped")
        r.check("no-new-privileges:true" in s.get("security_opt", []), f"{name}: no no-new-privileges")
        user = str(s.get("user", "0")).split(":")[0]
        r.check(user not in ("0", "root"), f"{name}: runs as root")
        vols = [v.split(":")[0] for v in s.get("volumes", [])]
        # Stateless: the migrate job, and coordinators whose state is in PostgreSQL.
        stateless = name in migrate or (postgres and name in coord)
        if stateless:
            r.check(not vols, f"{name}: a volume, but its state is in PostgreSQL")
        else:
            r.check(len(vols) == 1 and vols[0] in d.get("volumes", {}), f"{name}: not exactly one named volume")
        volumes_seen += vols
        own = [x["source"] for x in s.get("secrets", []) if x["source"] not in SHARED_SECRETS]
        secrets_seen += own
        for x in s.get("secrets", []):
            r.check(x["source"] in d.get("secrets", {}), f"{name}: secret {x['source']} is not declared")
        h = binary_help(s["command"][0], helps)
        if name in quorate:
            check_args(r, name, s["command"][1:], h)
            for e in s.get("environment", {}):
                r.check(e in h.env, f"{name}: {e} is not read by {s['command'][0]}")
    r.check(len(set(volumes_seen)) == len(volumes_seen), f"services share volumes: {volumes_seen}")
    r.check(len(set(secrets_seen)) == len(secrets_seen), f"services share secrets: {secrets_seen}")
    for name, s in nodes.items():
        targets = {x["target"] for x in s.get("secrets", [])}
        r.check(targets == {"node.pem", "node-key.pem", "ca.pem", "kek"}, f"{name}: secrets {sorted(targets)}")
    addrs = {v["networks"]["quorate"]["ipv4_address"]: k for k, v in nodes.items()}
    for cname, c in coord.items():
        listed = [a.split("=", 2)[2] for a in c["command"] if a.startswith("--node=")]
        r.check(sorted(a.rsplit(":", 1)[0] for a in listed) == sorted(addrs),
                f"{cname}: --node addresses {listed} are not the nodes' {sorted(addrs)}")
    if postgres:
        check_compose_store(r, d, text, coord, migrate)
    r.finish()


def check_compose_store(r, d, text, coord, migrate):
    """The PostgreSQL variant: the store URL (with its password) only in an env file,
    each coordinator its own certificate, migrate before the coordinators, TLS on db."""
    r.check("postgres://" not in re.sub(r"#.*", "", text), "a store URL inline in the compose file")
    for name, s in list(coord.items()) + list(migrate.items()):
        r.check(bool(s.get("env_file")), f"{name}: no env_file with QUORATE_COORDINATOR_STORE")
        r.check("QUORATE_COORDINATOR_STORE" not in s.get("environment", {}),
                f"{name}: QUORATE_COORDINATOR_STORE inline (it holds the password)")
        r.check(any(x["target"] == "db-ca.pem" for x in s.get("secrets", [])),
                f"{name}: no db-ca.pem to verify PostgreSQL's certificate")
    certs = [next((x["source"] for x in s.get("secrets", []) if x["target"] == "coordinator.pem"), None)
             for s in coord.values()]
    r.check(None not in certs and len(set(certs)) == len(certs),
            f"coordinators do not each have their own certificate: {certs}")
    for name, s in coord.items():
        dep = s.get("depends_on", {})
        for m in migrate:
            r.check(dep.get(m, {}).get("condition") == "service_completed_successfully",
                    f"{name}: does not wait for {m} to complete")
    ports = [p for s in coord.values() for p in s.get("ports", [])]
    r.check(len(ports) == len(set(ports)) and len(coord) <= len(ports),
            f"each coordinator needs its own published API port: {ports}")
    db = d["services"].get("db", {})
    r.check("ssl=on" in db.get("command", []), "db: TLS is not on (ssl=on)")
    r.check("ssl_groups=X25519MLKEM768" in db.get("command", []),
            "db: the key exchange is not limited to X25519MLKEM768 (ssl_groups=X25519MLKEM768)")
    env = db.get("environment", {})
    r.check("POSTGRES_PASSWORD" not in env and "POSTGRES_PASSWORD_FILE" in env,
            "db: the password is not read from a secret file (POSTGRES_PASSWORD_FILE)")
    for m, s in migrate.items():
        r.check(s.get("depends_on", {}).get("db", {}).get("condition") == "service_healthy",
                f"{m}: does not wait for db to be healthy")
        r.check(s.get("restart") == "no", f"{m}: a one-shot job must not restart")


# --------------------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------------------

REQUIRED_UNIT_SETTINGS = {
    "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
    "CapabilityBoundingSet": "", "MemoryDenyWriteExecute": "yes",
    "SystemCallFilter": "@system-service", "LimitCORE": "0", "UMask": "0077",
}


def unit_settings(text):
    joined = re.sub(r"\\\n\s*", " ", text)
    out = {}
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def check_systemd(paths, helps):
    r = Report("systemd units")
    for path in paths:
        s = unit_settings(Path(path).read_text())
        name = Path(path).name
        for k, v in REQUIRED_UNIT_SETTINGS.items():
            r.check(v in s.get(k, []), f"{name}: {k}={v} missing")
        r.check(any(x.startswith("AF_") for x in s.get("RestrictAddressFamilies", [])),
                f"{name}: RestrictAddressFamilies missing")
        exec_args = s["ExecStart"][0].split()
        if "--data-dir" in exec_args:
            r.check(bool(s.get("StateDirectory")), f"{name}: no StateDirectory")
        else:
            # The PostgreSQL store: no local state, and the URL (with its password) only
            # in a root-only EnvironmentFile, never in the unit.
            r.check(not s.get("StateDirectory"), f"{name}: a StateDirectory but no --data-dir")
            r.check(len(s.get("EnvironmentFile", [])) >= 2,
                    f"{name}: no EnvironmentFile for QUORATE_COORDINATOR_STORE")
            code = "\n".join(l for l in Path(path).read_text().splitlines() if not l.lstrip().startswith("#"))
            r.check("postgres://" not in code and "QUORATE_COORDINATOR_STORE" not in code,
                    f"{name}: the store URL is in the unit (it holds the password)")
        creds = s.get("LoadCredential", [])
        r.check(len(creds) >= 3, f"{name}: keys not passed with LoadCredential")
        exec_start = s["ExecStart"][0].split()
        h = binary_help(exec_start[0], helps)
        r.check(h is not None, f"{name}: ExecStart is not a Quorate binary")
        if h:
            check_args(r, name, exec_start[1:], h)
            for env in s.get("Environment", []):
                for pair in env.split():
                    var = pair.split("=", 1)[0]
                    r.check(var in h.env, f"{name}: {var} is not read by {exec_start[0]}")
        key_args = [a for a in exec_start if a.endswith("key.pem") or a.endswith("/kek")]
        r.check(all(a.startswith("%d/") for a in key_args),
                f"{name}: a private key is not read from the credentials directory: {key_args}")
    r.finish()


# --------------------------------------------------------------------------------------
# Containerfile
# --------------------------------------------------------------------------------------

def check_containerfile(path, root):
    r = Report(f"containerfile {path}")
    text = Path(path).read_text()
    root = Path(root)
    channel = re.search(r'^channel = "([^"]+)"', (root / "rust-toolchain.toml").read_text(), re.M).group(1)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    r.check(len(froms) >= 2, "not a multi-stage build")
    r.check(any(f"rust:{channel}-" in f for f in froms), f"the build stage is not rust:{channel}-…")
    r.check(all(":" in f.split("/")[-1] and ":latest" not in f for f in froms), f"an image is not pinned: {froms}")
    r.check(f'ENV RUSTUP_TOOLCHAIN={channel}' in text, f"RUSTUP_TOOLCHAIN is not {channel}")
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        parts = line.split()
        for src in parts[:-1]:
            r.check((root / src).exists(), f"COPY source {src} does not exist")
            copied.add(src.rstrip("/"))
    members = re.search(r"^members = \[(.*?)\]", (root / "Cargo.toml").read_text(), re.M | re.S).group(1)
    for m in re.findall(r'"([^"]+)"', members):
        r.check(m.split("/")[0] in copied, f"workspace member {m} is not copied into the build stage")
    users = re.findall(r"^USER (\S+)", text, re.M)
    r.check(bool(users) and users[-1].split(":")[0] not in ("0", "root"), "the runtime stage runs as root")
    r.finish()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["k8s", "compose", "systemd", "containerfile"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--help-node")
    ap.add_argument("--help-coordinator")
    ap.add_argument("--root")
    a = ap.parse_args()
    helps = {}
    if a.help_node:
        helps["quorate-node"] = Help(a.help_node)
    if a.help_coordinator:
        helps["quorate-coordinator"] = Help(a.help_coordinator)
    if a.what == "k8s":
        check_k8s(a.paths[0], helps)
    elif a.what == "compose":
        check_compose(a.paths[0], helps)
    elif a.what == "systemd":
        check_systemd(a.paths, helps)
    else:
        check_containerfile(a.paths[0], a.root)


if __name__ == "__main__":
    main()
