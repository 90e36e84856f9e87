//! Test harness: a fresh directory per test, the real binaries, and helpers
//! to start, kill and restart them.

#![allow(dead_code)]

pub mod proxy;

use common::auth::Key;
use common::rpc::{Client, ClientConfig};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The directory holding the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/tests-xxxx -> target/<profile>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} not built: run `cargo build --workspace` first", p.display());
    p
}

/// A directory for one test, removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let p = std::env::temp_dir().join("afs-tests").join(format!("{name}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running afsd.
pub struct Afsd {
    child: Option<Child>,
    pub addr: String,
    pub export: PathBuf,
    pub state: PathBuf,
    env: Vec<(String, String)>,
}

impl Afsd {
    /// Starts afsd on an ephemeral port with `export` and `state` under `dir`.
    pub fn start(dir: &Path) -> Afsd {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, env: &[(&str, &str)]) -> Afsd {
        let export = dir.join("export");
        let state = dir.join("state");
        std::fs::create_dir_all(&export).unwrap();
        let mut a = Afsd {
            child: None,
            addr: "127.0.0.1:0".into(),
            export,
            state,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(bin("afsd"));
        cmd.args(["serve", "--export"])
            .arg(&self.export)
            .arg("--state")
            .arg(&self.state)
            .args(["--listen", &self.addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd.spawn().expect("start afsd");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("afsd listening on ") {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).expect("afsd did not start listening within 20 s");
        self.addr = addr;
        self.child = Some(child);
    }

    /// Sets environment for the next (re)start.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    pub fn key(&self) -> Key {
        Key::load(&self.state.join("afs.key")).unwrap()
    }

    pub fn key_path(&self) -> PathBuf {
        self.state.join("afs.key")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (a clean shutdown), and wait.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c, "afsd");
        }
    }

    /// Waits for the process to exit by itself (a failpoint abort).
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let Some(c) = self.child.as_mut() else { return true };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if c.try_wait().unwrap().is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Starts again on the same port.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.spawn();
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.addr.clone(), self.key(), Uuid::new_v4());
        c.attempt_timeout = Duration::from_secs(2);
        c.call_timeout = Duration::from_secs(30);
        c
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.client_config()).await.expect("connect to afsd")
    }

    /// `afsd stats --json`, through the real command.
    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new(bin("afsd")).args(["stats", "--json", "--state"]).arg(&self.state).output().unwrap();
        assert!(out.status.success(), "afsd stats failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn rpcs(&self, kind: &str) -> u64 {
        self.stats()["rpcs"][kind].as_u64().unwrap()
    }
}

impl Drop for Afsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGTERM, then waits (30 s at most) for a clean exit.
fn terminate(mut c: Child, what: &str) {
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if c.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
    panic!("{what} did not stop within 30 s of SIGTERM");
}

/// Each thread's name, state and kernel stack: what a stuck process waits on.
pub fn thread_stacks(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return "(process gone)".into() };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let state = read("status").lines().find(|l| l.starts_with("State:")).unwrap_or("").to_string();
        out += &format!(
            "--- {} {} {state} wchan={}\n{}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        );
    }
    // User-space backtraces too, where gdb is installed.
    if let Ok(gdb) = Command::new("timeout")
        .args(["60", "gdb", "-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt"])
        .output()
    {
        out += &String::from_utf8_lossy(&gdb.stdout);
    }
    out
}

/// Processes called `name` whose command line mentions `text`.
pub fn processes_named(name: &str, text: &str) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.trim() == name && String::from_utf8_lossy(&cmdline).contains(text)
        })
        .collect()
}

/// Polls `f` until it returns true or `limit` passes.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A running `venus mount`.
pub struct VenusMount {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    pub cache: PathBuf,
    server: String,
    key: PathBuf,
    cache_size: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

impl VenusMount {
    /// Mounts `afsd`'s volume at `dir/<name>` with its cache in `dir/<name>-cache`.
    pub fn start(dir: &Path, name: &str, afsd: &Afsd) -> VenusMount {
        Self::start_with(dir, name, &afsd.addr, &afsd.key_path(), "4G")
    }

    pub fn start_with(dir: &Path, name: &str, server: &str, key: &Path, cache_size: &str) -> VenusMount {
        let mut v = Self::unstarted(dir, name, server, key, cache_size);
        v.spawn();
        v
    }

    /// Mounts with extra environment variables (a `VENUS_FAILPOINT`, say).
    pub fn start_env(dir: &Path, name: &str, afsd: &Afsd, env: &[(&str, &str)]) -> VenusMount {
        let mut v = Self::unstarted(dir, name, &afsd.addr, &afsd.key_path(), "4G");
        v.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        v.spawn();
        v
    }

    /// Mounts with extra `venus mount` arguments.
    pub fn start_args(dir: &Path, name: &str, afsd: &Afsd, cache_size: &str, extra: &[&str]) -> VenusMount {
        let mut v = Self::unstarted(dir, name, &afsd.addr, &afsd.key_path(), cache_size);
        v.extra = extra.iter().map(|s| s.to_string()).collect();
        v.spawn();
        v
    }

    /// The mount at `dir/<name>` (its directory made), not yet started.
    fn unstarted(dir: &Path, name: &str, server: &str, key: &Path, cache_size: &str) -> VenusMount {
        let mountpoint = dir.join(name);
        std::fs::create_dir_all(&mountpoint).unwrap();
        VenusMount {
            child: None,
            mountpoint,
            cache: dir.join(format!("{name}-cache")),
            server: server.to_string(),
            key: key.to_path_buf(),
            cache_size: cache_size.to_string(),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(bin("venus"));
        cmd.arg("mount")
            .arg(&self.mountpoint)
            .args(["--server", &self.server, "--key"])
            .arg(&self.key)
            .arg("--cache")
            .arg(&self.cache)
            .args(["--cache-size", &self.cache_size])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd.spawn().expect("start venus");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("venus mounted") {
                    let _ = tx.send(());
                }
            }
        });
        // venus mounts only after replaying a log its last run left (a
        // restart after a kill mid-reintegration): on a loaded 2-core runner
        // that has taken more than 30 s. One that exits first is reported
        // at once, with its status (its stderr is the test's).
        let deadline = Instant::now() + Duration::from_secs(90);
        while rx.recv_timeout(Duration::from_millis(100)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("venus exited before mounting {}: {status}", self.mountpoint.display());
            }
            if Instant::now() > deadline {
                let mut threads = thread_stacks(child.id());
                // The server it waits on, if it waits on one: the test's afsd.
                let dir = self.mountpoint.parent().unwrap_or(Path::new("/")).to_string_lossy().into_owned();
                for pid in processes_named("afsd", &dir) {
                    threads += &format!("\n=== afsd {pid}\n{}", thread_stacks(pid));
                }
                let _ = child.kill();
                panic!("venus did not mount {} within 90 s; its threads:\n{threads}", self.mountpoint.display());
            }
        }
        self.child = Some(child);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    /// SIGTERM: finish stores, unmount, exit.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c, "venus");
        }
    }

    /// SIGKILL; the mount is detached lazily.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).stderr(Stdio::null()).status();
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.spawn();
    }

    /// Runs a `venus` CLI command against this mount's cache.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("venus")).args(args).arg("--cache").arg(&self.cache).output().unwrap()
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "venus status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for VenusMount {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Total RPCs the server has counted, all kinds.
pub fn total_rpcs(stats: &serde_json::Value) -> u64 {
    stats["rpcs"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum()
}

/// Drops the kernel's dentry, inode and page caches, so the next access
/// really reaches venus.
pub fn drop_kernel_caches() {
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Every object under `root`: kind, permission bits, and file content.
#[derive(Debug, PartialEq)]
pub enum Entry {
    File { mode: u32, data: Vec<u8> },
    Dir { mode: u32 },
    Symlink(String),
}

pub fn snapshot(root: &Path) -> std::collections::BTreeMap<String, Entry> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let mode = std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777;
            if m.is_dir() {
                stack.push(r.clone());
                out.insert(r.display().to_string(), Entry::Dir { mode });
            } else if m.file_type().is_symlink() {
                out.insert(
                    r.display().to_string(),
                    Entry::Symlink(std::fs::read_link(e.path()).unwrap().display().to_string()),
                );
            } else {
                assert_eq!(
                    m.len(),
                    std::fs::read(e.path()).unwrap().len() as u64,
                    "stat size agrees with content: {r:?}"
                );
                out.insert(r.display().to_string(), Entry::File { mode, data: std::fs::read(e.path()).unwrap() });
            }
        }
    }
    out
}

/// The paths whose entries differ between two trees, sorted; each
/// difference is printed (the test harness shows it if the test fails).
pub fn tree_diff(a: &Path, b: &Path) -> Vec<String> {
    let (x, y) = (snapshot(a), snapshot(b));
    let mut d: Vec<String> = x.keys().chain(y.keys()).filter(|k| x.get(*k) != y.get(*k)).cloned().collect();
    d.sort();
    d.dedup();
    for k in &d {
        eprintln!("  {k}: {:?}  vs  {:?}", x.get(k), y.get(k));
    }
    d
}

/// Panics, naming the differing paths, unless the two trees are the same.
pub fn assert_same_tree(a: &Path, b: &Path, what: &str) {
    let d = tree_diff(a, b);
    assert!(d.is_empty(), "{what}: trees differ at {d:?}");
}

impl VenusMount {
    /// Starts `venus reconnect` in the background and SIGKILLs venus once
    /// the first replies are being applied (the log shrank below `total`
    /// records), `delay` later. Returns the records left just before.
    pub fn kill_during_reintegration(&mut self, total: u64, delay: Duration) -> u64 {
        let (venus, cache) = (bin("venus"), self.cache.clone());
        let reconnect = std::thread::spawn(move || {
            let _ = Command::new(venus).args(["reconnect", "--cache"]).arg(cache).output();
        });
        assert!(eventually(Duration::from_secs(30), || self.status()["cml_records"].as_u64().unwrap() < total));
        std::thread::sleep(delay);
        let left = self.status()["cml_records"].as_u64().unwrap();
        self.kill();
        let _ = reconnect.join();
        left
    }

    /// Waits until the log is empty and venus connected (reintegration
    /// done, changes logged meanwhile included); panics with the status
    /// after `limit`.
    pub fn wait_reintegrated(&self, limit: Duration) {
        let done = eventually(limit, || {
            let s = self.status();
            s["cml_records"] == 0 && s["state"] == "connected"
        });
        assert!(done, "reintegration did not finish: {}", self.status());
    }

    /// Waits until `venus status` reports `state`; panics after `limit`.
    pub fn wait_state(&self, state: &str, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status();
            if s["state"] == state {
                return s;
            }
            assert!(Instant::now() < deadline, "venus never reached {state:?}: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "venus {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}
