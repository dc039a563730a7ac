//! A small tmpfs mounted over a directory, for tests of what a process does when its
//! disk fills up: writes to it fail with `ENOSPC` once it is full, and succeed again once
//! a file on it is deleted. Unmounted on drop.
//!
//! Mounting needs root (`CAP_SYS_ADMIN`) and `mount` from util-linux. [`Tmpfs::mount`]
//! says what went wrong, and [`Tmpfs::mount_or_skip`] is what a test calls: without
//! root, or where mounting fails, it prints why and the test passes as skipped, unless
//! [`crate::netns::REQUIRE_ENV`] is `1` (as in CI, which runs as root), which makes that
//! a failure.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted at a directory; unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    /// Where it is mounted.
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size_bytes` at `dir` (created if absent; what it held is
    /// hidden until unmounting).
    pub fn mount(dir: &Path, size_bytes: u64) -> Result<Self, String> {
        if !is_root() {
            return Err("mounting a tmpfs needs root".to_owned());
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_bytes},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run `mount`: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`mount -t tmpfs` on {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    /// [`Tmpfs::mount`], or `None` after printing why `test` is skipped (a panic
    /// instead if [`crate::netns::REQUIRE_ENV`] is `1`).
    pub fn mount_or_skip(test: &str, dir: &Path, size_bytes: u64) -> Option<Self> {
        let env = crate::netns::REQUIRE_ENV;
        match Self::mount(dir, size_bytes) {
            Ok(t) => Some(t),
            Err(why) if std::env::var(env).is_ok_and(|v| v == "1") => {
                panic!("{test}: cannot mount a tmpfs ({why}), and {env}=1")
            }
            Err(why) => {
                eprintln!("SKIPPED {test}: it fills a small tmpfs, which needs root: {why}");
                None
            }
        }
    }

    /// Writes `file` (on this tmpfs) until the tmpfs is full: in 1 MiB writes, then in
    /// 4 KiB ones, until a write fails with `ENOSPC`. Returns the bytes written.
    pub fn fill(&self, file: &str) -> u64 {
        let path = self.dir.join(file);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        let mut written = 0u64;
        for chunk in [1 << 20, 4 << 10] {
            let buf = vec![0x5au8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                    Err(e) => panic!("writing {}: {e}", path.display()),
                }
            }
        }
        let _ = f.sync_all();
        written
    }

    /// Bytes free on the tmpfs (`df`), if it can be read.
    pub fn free_bytes(&self) -> Option<u64> {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir)
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A process still holding a file on it makes a plain unmount fail (busy); a lazy
        // one detaches it now and frees it when the last file closes.
        let plain = Command::new("umount")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
        if !plain.is_ok_and(|s| s.success()) {
            let lazy = Command::new("umount").arg("-l").arg(&self.dir).status();
            if !lazy.is_ok_and(|s| s.success()) {
                eprintln!("tmpfs: cannot unmount {}", self.dir.display());
            }
        }
    }
}

/// Whether this process runs as root (effective uid 0).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
