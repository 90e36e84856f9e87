//! The systems under test: how to start them, make them cold, and stop them.
//!
//! - local disk: the plain data directory itself;
//! - afs: `afsd` exporting its own copy of the data, `venus` mounting it;
//! - sshfs and rclone (`--vfs-cache-mode full`, sftp remote): the plain data
//!   directory served by a private sshd on loopback (bench/scripts).

use crate::config::{Config, Kind};
use crate::util::{self, drop_caches, force_unmount, is_mounted, poll, terminate, wait_line};
use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Paths of the scratch directory.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The data as local disk sees it; also what sshfs and rclone serve.
    pub plain: PathBuf,
    /// afsd's export (a copy of the same data).
    pub export: PathBuf,
    pub state: PathBuf,
    pub cache: PathBuf,
    pub logs: PathBuf,
    pub peers: PathBuf,
    pub scratch: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Layout {
        Layout {
            plain: dir.join("plain"),
            export: dir.join("export"),
            state: dir.join("afsd-state"),
            cache: dir.join("venus-cache"),
            logs: dir.join("logs"),
            peers: dir.join("peers"),
            scratch: dir.join("scratch"),
        }
    }

    pub fn mountpoint(dir: &Path, kind: Kind) -> PathBuf {
        dir.join(format!("mnt-{}", kind.key()))
    }
}

/// One started system.
pub struct System {
    pub kind: Kind,
    /// Where the workloads do their work (the mount point, or the plain dir).
    pub root: PathBuf,
    /// The server's copy of `root` (what "the server has it" looks at).
    pub server_dir: PathBuf,
    /// The directory of small files workload 6 made last, and how many.
    pub created: Option<(PathBuf, usize)>,
    /// Workload 3 has read the large file through this mount last: it is
    /// as cached as this system caches it.
    pub big_read: bool,
    cfg: Config,
    layout: Layout,
    afsd: Option<Child>,
    venus: Option<Child>,
    addr: String,
}

fn log_file(layout: &Layout, name: &str) -> Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(layout.logs.join(name))
        .with_context(|| format!("open log {name}"))
}

impl System {
    pub fn start(cfg: &Config, layout: &Layout, kind: Kind) -> Result<System> {
        let mnt = Layout::mountpoint(&cfg.dir, kind);
        let (root, server_dir) = match kind {
            Kind::Local => (layout.plain.clone(), layout.plain.clone()),
            Kind::Afs => (mnt.clone(), layout.export.clone()),
            Kind::Sshfs | Kind::Rclone => (mnt.clone(), layout.plain.clone()),
        };
        if kind != Kind::Local {
            force_unmount(&mnt);
            std::fs::create_dir_all(&mnt)?;
        }
        let mut sys = System {
            kind,
            root,
            server_dir,
            created: None,
            big_read: false,
            cfg: cfg.clone(),
            layout: layout.clone(),
            afsd: None,
            venus: None,
            addr: String::new(),
        };
        match kind {
            Kind::Local => {}
            Kind::Afs => {
                sys.start_afsd()?;
                sys.start_venus()?;
            }
            Kind::Sshfs | Kind::Rclone => sys.peer("start")?,
        }
        Ok(sys)
    }

    fn start_afsd(&mut self) -> Result<()> {
        let mut afsd = Command::new(self.cfg.bin_dir.join("afsd"))
            .arg("serve")
            .arg("--export")
            .arg(&self.layout.export)
            .arg("--state")
            .arg(&self.layout.state)
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", std::env::var("BENCH_AFSD_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&self.layout, "afsd.log")?)
            .spawn()
            .context("spawn afsd")?;
        match wait_line(&mut afsd, "afsd listening on ", Duration::from_secs(60)) {
            Ok(addr) => self.addr = addr.trim().to_string(),
            Err(e) => {
                terminate(&mut afsd, Duration::from_secs(5));
                return Err(e.context("afsd did not start (see logs/afsd.log)"));
            }
        }
        self.afsd = Some(afsd);
        Ok(())
    }

    fn start_venus(&mut self) -> Result<()> {
        force_unmount(&self.root);
        match self.try_start_venus() {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("bench: venus did not mount ({e:#}); cleaning up and trying once more");
                force_unmount(&self.root);
                std::thread::sleep(Duration::from_secs(1));
                self.try_start_venus()
            }
        }
    }

    fn try_start_venus(&mut self) -> Result<()> {
        let cache_mib = (self.cfg.big_mib * 3 + 2048).max(4096);
        let mut venus = Command::new(self.cfg.bin_dir.join("venus"))
            .arg("mount")
            .arg(&self.root)
            .args(["--server", &self.addr, "--key"])
            .arg(self.layout.state.join("afs.key"))
            .arg("--cache")
            .arg(&self.layout.cache)
            .args(["--cache-size", &format!("{cache_mib}M")])
            .env("RUST_LOG", std::env::var("BENCH_VENUS_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&self.layout, "venus.log")?)
            .spawn()
            .context("spawn venus")?;
        let ready = wait_line(&mut venus, "venus mounted", Duration::from_secs(60)).and_then(|_| {
            // "venus mounted" is printed before the kernel's INIT handshake
            // is done: wait until the mount answers.
            if poll(Duration::from_secs(30), Duration::from_millis(20), || std::fs::read_dir(&self.root).is_ok()) {
                Ok(())
            } else {
                bail!("the mount does not answer")
            }
        });
        if let Err(e) = ready {
            terminate(&mut venus, Duration::from_secs(5));
            force_unmount(&self.root);
            return Err(e.context("venus did not mount (see logs/venus.log)"));
        }
        self.venus = Some(venus);
        Ok(())
    }

    fn stop_venus(&mut self) {
        if let Some(mut v) = self.venus.take() {
            terminate(&mut v, Duration::from_secs(60));
        }
        force_unmount(&self.root);
    }

    fn peer(&self, action: &str) -> Result<()> {
        let script = match self.kind {
            Kind::Sshfs => "peer-sshfs.sh",
            Kind::Rclone => "peer-rclone.sh",
            _ => return Ok(()),
        };
        util::run(
            Command::new("bash")
                .arg(self.cfg.scripts.join(script))
                .arg(action)
                .arg(&self.layout.plain)
                .arg(&self.root)
                .env("PEER_STATE_ROOT", &self.layout.peers)
                .stdin(Stdio::null()),
        )
        .with_context(|| format!("{script} {action}"))?;
        Ok(())
    }

    /// Makes every cache between the workload and the data cold: the
    /// client's cache (a fresh mount with an empty cache directory) and the
    /// machine's page, dentry and inode caches.
    pub fn cold(&mut self) -> Result<()> {
        self.big_read = false;
        match self.kind {
            Kind::Local => {}
            Kind::Afs => {
                self.stop_venus();
                if self.layout.cache.exists() {
                    std::fs::remove_dir_all(&self.layout.cache).context("empty the venus cache")?;
                }
                drop_caches();
                self.start_venus()?;
            }
            Kind::Sshfs | Kind::Rclone => {
                self.peer("stop")?;
                drop_caches();
                self.peer("start")?;
            }
        }
        drop_caches();
        Ok(())
    }

    /// Waits until what was written through the mount has reached the server.
    pub fn settle(&self) -> Result<()> {
        if self.kind == Kind::Rclone {
            self.peer("wait")?;
        }
        Ok(())
    }

    /// Waits until the server holds `name` (relative to the root) with `size`
    /// bytes.
    pub fn wait_server_has(&self, name: &str, size: u64) -> Result<()> {
        self.settle()?;
        let p = self.server_dir.join(name);
        if !poll(Duration::from_secs(600), Duration::from_millis(2), || {
            std::fs::metadata(&p).map(|m| m.len() == size).unwrap_or(false)
        }) {
            bail!("{} never reached {size} bytes on the server", p.display());
        }
        Ok(())
    }

    pub fn venus_pid(&self) -> Option<u32> {
        self.venus.as_ref().map(|c| c.id())
    }

    pub fn afsd_pid(&self) -> Option<u32> {
        self.afsd.as_ref().map(|c| c.id())
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn state_dir(&self) -> &Path {
        &self.layout.state
    }

    pub fn cache_dir(&self) -> &Path {
        &self.layout.cache
    }

    /// Runs `venus ARGS --cache CACHE` (afs only).
    pub fn venus_cli(&self, args: &[&str]) -> Result<()> {
        util::run(Command::new(self.cfg.bin_dir.join("venus")).args(args).arg("--cache").arg(&self.layout.cache))?;
        Ok(())
    }

    /// Total RPCs the server has answered (afs only).
    pub fn total_rpcs(&self) -> Result<u64> {
        let out = util::run(
            Command::new(self.cfg.bin_dir.join("afsd")).args(["stats", "--json", "--state"]).arg(&self.layout.state),
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("afsd stats --json")?;
        let rpcs = v["rpcs"].as_object().context("afsd stats has no rpcs object")?;
        Ok(rpcs.values().filter_map(|x| x.as_u64()).sum())
    }

    pub fn stop(&mut self) {
        match self.kind {
            Kind::Local => {}
            Kind::Afs => {
                self.stop_venus();
                if let Some(mut a) = self.afsd.take() {
                    terminate(&mut a, Duration::from_secs(30));
                }
            }
            Kind::Sshfs | Kind::Rclone => {
                if let Err(e) = self.peer("stop") {
                    eprintln!("bench: stopping {}: {e:#}", self.kind.key());
                }
                force_unmount(&self.root);
            }
        }
    }
}

impl Drop for System {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Leftovers of an interrupted earlier run: unmount everything under `dir`.
pub fn clean_leftovers(cfg: &Config, layout: &Layout) {
    for kind in Kind::ALL {
        let mnt = Layout::mountpoint(&cfg.dir, kind);
        if kind.is_peer() && layout.peers.exists() {
            let script = if kind == Kind::Sshfs { "peer-sshfs.sh" } else { "peer-rclone.sh" };
            let _ = Command::new("bash")
                .arg(cfg.scripts.join(script))
                .arg("stop")
                .arg(&layout.plain)
                .arg(&mnt)
                .env("PEER_STATE_ROOT", &layout.peers)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if is_mounted(&mnt) {
            force_unmount(&mnt);
        }
    }
}
