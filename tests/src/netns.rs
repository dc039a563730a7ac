//! Test hosts in network namespaces (DESIGN.md §10): each process of a multi-host test
//! runs in a namespace of its own, with its own address in 198.18.0.0/15 (RFC 2544's
//! benchmarking range), reachable from the test process and from nothing else.
//!
//! Topology: host `j` of a [`Hosts`] is a namespace with a veth pair to the root
//! namespace (where the test process and its fault proxies run), on a /30 of its own:
//! the root side holds [`Host::gateway`], the namespace side ([`Host::addr`], interface
//! `eth0`) the other address. The namespaces have no default route, so a process in one
//! reaches only its gateway — the addresses of the root namespace — and never another
//! namespace directly: traffic between test hosts goes through whatever the test runs
//! on the root side. Loopback is up in each namespace.
//!
//! Names are `qm<pid>-<n>-<j>` (namespace and root-side veth alike), so concurrent test
//! binaries and the parallel tests of one never collide; each cluster of hosts takes a
//! /27 of the range (up to eight hosts), checked against the addresses in use. Dropping
//! a [`Hosts`] deletes its namespaces (which deletes their veth pairs); creating one first
//! deletes the namespaces and veths of processes with this prefix that no longer run
//! (a crashed or killed test).
//!
//! Everything here needs root (`CAP_NET_ADMIN`, `CAP_SYS_ADMIN`) and `ip` from iproute2.
//! [`available`] says whether this machine can do it, and [`skip_unless_available`] is
//! what a test calls first.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The prefix of every namespace and interface this module makes.
const PREFIX: &str = "qm";

/// Host addresses per cluster block (a /27: eight /30 links).
const BLOCK: u32 = 32;

/// Most hosts in one [`Hosts`].
pub const MAX_HOSTS: usize = 8;

/// Set to `1` to make [`skip_unless_available`] fail the test instead of skipping it
/// (CI sets it: there the tests must run).
pub const REQUIRE_ENV: &str = "QUORATE_REQUIRE_NETNS";

/// One test host: a network namespace with one address.
#[derive(Debug)]
pub struct Host {
    /// The namespace's name (also the root-side veth's name).
    pub name: String,
    /// The host's address, inside its namespace.
    pub addr: Ipv4Addr,
    /// The root namespace's address on this host's link: the only address the host
    /// can reach besides its own.
    pub gateway: Ipv4Addr,
}

impl Host {
    /// A command that runs `program` inside this host's namespace (`ip netns exec`,
    /// which execs it: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.arg("netns").arg("exec").arg(&self.name).arg(program);
        cmd
    }
}

/// A set of test hosts, deleted on drop.
#[derive(Debug)]
pub struct Hosts {
    hosts: Vec<Host>,
}

impl Hosts {
    /// Creates `count` hosts (1..=[`MAX_HOSTS`]), after deleting stale ones of dead
    /// processes.
    pub fn create(count: usize) -> Result<Self, String> {
        static SERIAL: AtomicU32 = AtomicU32::new(0);
        // One cluster at a time per process picks its block and sets it up, so two
        // parallel tests never see the same block free.
        static SETUP: Mutex<()> = Mutex::new(());
        if !(1..=MAX_HOSTS).contains(&count) {
            return Err(format!(
                "a test cluster has 1..={MAX_HOSTS} hosts, not {count}"
            ));
        }
        let _setup = SETUP
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        remove_stale();
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        let base = free_block(serial)?;
        let mut hosts = Hosts { hosts: Vec::new() };
        for j in 0..count {
            let name = format!("{PREFIX}{}-{serial}-{j}", std::process::id());
            let link = base + 4 * u32::try_from(j).map_err(|e| e.to_string())?;
            let host = Host {
                name,
                gateway: Ipv4Addr::from(link + 1),
                addr: Ipv4Addr::from(link + 2),
            };
            // Pushed first, so that a failure below still deletes what was made.
            hosts.hosts.push(host);
            let host = hosts.hosts.last().ok_or("no host")?;
            setup(host)?;
        }
        Ok(hosts)
    }

    /// Host `j` (0-based).
    pub fn host(&self, j: usize) -> &Host {
        &self.hosts[j]
    }

    /// All hosts.
    pub fn all(&self) -> &[Host] {
        &self.hosts
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            // Deleting the namespace deletes its veth end, and with it the root's end;
            // the link is deleted too in case the namespace never got its end.
            let _ = ip(&["netns", "del", &h.name]);
            let _ = ip(&["link", "del", &h.name]);
        }
    }
}

/// Creates `h`'s namespace, its veth pair and addresses.
fn setup(h: &Host) -> Result<(), String> {
    let ns = h.name.as_str();
    ip(&["netns", "add", ns])?;
    ip(&[
        "link", "add", ns, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])?;
    ip(&["addr", "add", &format!("{}/30", h.gateway), "dev", ns])?;
    ip(&["link", "set", ns, "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/30", h.addr),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Runs `ip ARGS`; its stdout, or what went wrong.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (is iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The first address of a /27 of 198.18.0.0/15 that no interface of the root namespace
/// uses, starting from one derived from the process id and `serial`.
fn free_block(serial: u32) -> Result<u32, String> {
    let range = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let blocks = (1 << 17) / BLOCK;
    let used: Vec<u32> = ip(&["-o", "-4", "addr", "show"])?
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
        .map(u32::from)
        .collect();
    let start = std::process::id().wrapping_mul(97).wrapping_add(serial);
    for k in 0..blocks {
        let base = range + ((start.wrapping_add(k)) % blocks) * BLOCK;
        if !used.iter().any(|a| (base..base + BLOCK).contains(a)) {
            return Ok(base);
        }
    }
    Err("no free /27 left in 198.18.0.0/15".to_owned())
}

/// The pid in a name made by this module, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Deletes the namespaces and root-side veths of processes that no longer run.
fn remove_stale() {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if dead(name) {
                eprintln!("netns: deleting stale namespace {name}");
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    if let Ok(list) = ip(&["-o", "link", "show"]) {
        // "7: qm123-0-1@if2: <BROADCAST,...> ..."
        for name in list
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n))
        {
            if dead(name) {
                eprintln!("netns: deleting stale link {name}");
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}

/// Whether this machine can run multi-host tests: root, `ip` from iproute2, network
/// namespaces and veth pairs (tried once per process by making a host and deleting it).
/// The error says what is missing.
pub fn available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let status = std::fs::read_to_string("/proc/self/status")
                .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
            let euid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .ok_or("no effective uid in /proc/self/status")?;
            if euid != "0" {
                return Err(format!(
                    "network namespaces need root, and this test runs as uid {euid}"
                ));
            }
            ip(&["-V"])?;
            Hosts::create(1).map(drop)
        })
        .clone()
}

/// Whether `test` can run here. If not, prints why and returns false (the test then
/// returns, passing as skipped), or panics if [`REQUIRE_ENV`] is `1`.
pub fn skip_unless_available(test: &str) -> bool {
    match available() {
        Ok(()) => true,
        Err(why) if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") => {
            panic!("{test}: multi-host tests cannot run here ({why}), and {REQUIRE_ENV}=1")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: multi-host tests need root and network namespaces: {why}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_names_of_this_module() {
        assert_eq!(owner_pid("qm4242-0-3"), Some(4242));
        assert_eq!(owner_pid("qm4242-probe"), Some(4242));
        assert_eq!(owner_pid("eth0"), None);
        assert_eq!(owner_pid("qmx-1-2"), None);
    }

    /// A host reaches its gateway, not another host's link nor another host, and nothing is left after
    /// drop. Skips where namespaces are not available.
    #[test]
    fn hosts_reach_the_root_namespace_only_and_are_removed_on_drop() {
        if !skip_unless_available("hosts_reach_the_root_namespace_only") {
            return;
        }
        let hosts = Hosts::create(2).unwrap();
        let (a, b) = (hosts.host(0), hosts.host(1));
        let listener = std::net::TcpListener::bind((a.gateway, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        // Bash's /dev/tcp: a TCP connect from inside the namespace.
        let connect = |h: &Host, to: Ipv4Addr| {
            h.command("timeout")
                .args(["5", "bash", "-c", &format!("echo > /dev/tcp/{to}/{port}")])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(connect(a, a.gateway), "host 0 cannot reach its gateway");
        assert!(!connect(b, a.gateway), "host 1 reached host 0's link");
        assert!(!connect(a, b.addr), "host 0 reached host 1 directly");
        let names: Vec<String> = hosts.all().iter().map(|h| h.name.clone()).collect();
        drop(hosts);
        let left = ip(&["netns", "list"]).unwrap();
        for n in &names {
            assert!(
                !left.lines().any(|l| l.split_whitespace().next() == Some(n)),
                "{n} left behind"
            );
        }
    }
}
