//! What to run, and how big: everything comes from `BENCH_*` environment
//! variables so that a quick run (`BENCH_QUICK=1`) is one variable away.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The systems compared, in the order they run.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Local,
    Afs,
    Sshfs,
    Rclone,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Local, Kind::Afs, Kind::Sshfs, Kind::Rclone];

    /// One of the file systems afs is compared with (see `peer_runs`).
    pub fn is_peer(self) -> bool {
        matches!(self, Kind::Sshfs | Kind::Rclone)
    }

    /// Short name, as in `BENCH_SYSTEMS`.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Local => "local",
            Kind::Afs => "afs",
            Kind::Sshfs => "sshfs",
            Kind::Rclone => "rclone",
        }
    }

    /// Column heading.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Local => "local disk",
            Kind::Afs => "afs (ours)",
            Kind::Sshfs => "sshfs",
            Kind::Rclone => "rclone vfs=full",
        }
    }

    fn parse(s: &str) -> Result<Kind> {
        Kind::ALL.into_iter().find(|k| k.key() == s).with_context(|| format!("unknown system {s:?} in BENCH_SYSTEMS"))
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Scratch directory: data, mounts, caches, logs. Must be on a real disk.
    pub dir: PathBuf,
    /// Runs per figure (the table shows the median, min and max).
    pub runs: usize,
    /// Runs of the Andrew benchmark (each a cold and a warm pass).
    pub andrew_runs: usize,
    /// The same two for sshfs and rclone, which take 3-10 times as long as
    /// afs at most workloads: with as many runs as afs the suite cannot end
    /// within 15 minutes on 2 cores, and their figures are far enough from
    /// ours that fewer runs change no conclusion.
    pub peer_runs: usize,
    pub peer_andrew_runs: usize,
    /// Runs of workload 6 for sshfs and rclone: 10,000 creates take them
    /// 25-35 s a run, a minute of the suite's 15 for a second run.
    pub peer_create_runs: usize,
    /// Size of the large file of workloads 2-4.
    pub big_mib: u64,
    /// Small files opened by workload 5.
    pub small_files: usize,
    /// Files created by workload 6.
    pub create_files: usize,
    /// Logged operations reintegrated by workload 8 (a create and a store
    /// per file).
    pub reint_ops: usize,
    /// `make -j` of the Andrew Make phase.
    pub andrew_jobs: usize,
    /// Client counts of workload 7.
    pub scale_clients: Vec<usize>,
    /// Seconds each client count of workload 7 runs.
    pub scale_secs: f64,
    pub systems: Vec<Kind>,
    pub workloads: BTreeSet<u32>,
    pub out_md: PathBuf,
    pub out_png: PathBuf,
    /// Keep the scratch directory afterwards.
    pub keep: bool,
    /// Where afsd and venus are (target/release).
    pub bin_dir: PathBuf,
    /// bench/scripts.
    pub scripts: PathBuf,
    pub quick: bool,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.trim().is_empty())
}

fn num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match var(name) {
        None => Ok(default),
        Some(s) => s.trim().parse().map_err(|_| anyhow::anyhow!("{name}={s:?} is not a number")),
    }
}

/// The workspace root (bench/..).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).to_path_buf()
}

impl Config {
    pub fn from_env() -> Result<Config> {
        let quick = var("BENCH_QUICK").is_some_and(|v| v != "0");
        let root = workspace_root();
        let (runs, big, small, create, secs) =
            if quick { (2, 64, 1000, 1000, 1.0) } else { (3, 1024, 10_000, 10_000, 2.0) };
        let runs = num("BENCH_RUNS", runs)?;
        let systems = match var("BENCH_SYSTEMS") {
            None => Kind::ALL.to_vec(),
            Some(s) => s.split(',').map(|k| Kind::parse(k.trim())).collect::<Result<Vec<_>>>()?,
        };
        let workloads = match var("BENCH_WORKLOADS") {
            None => (1..=8).collect(),
            Some(s) => s
                .split(',')
                .map(|w| w.trim().parse::<u32>().map_err(|_| anyhow::anyhow!("bad workload {w:?} in BENCH_WORKLOADS")))
                .collect::<Result<BTreeSet<_>>>()?,
        };
        let scale_clients = match var("BENCH_SCALE_CLIENTS") {
            None => vec![1, 8, 32, 64],
            Some(s) => s
                .split(',')
                .map(|n| {
                    n.trim().parse::<usize>().map_err(|_| anyhow::anyhow!("bad count {n:?} in BENCH_SCALE_CLIENTS"))
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let default_out = if quick { root.join("target/bench-quick") } else { root.clone() };
        let bin_dir = match var("BENCH_BIN") {
            Some(b) => PathBuf::from(b),
            None => {
                // target/release/bench -> target/release
                let exe = std::env::current_exe().context("current_exe")?;
                exe.parent().context("exe has no parent")?.to_path_buf()
            }
        };
        let cfg = Config {
            dir: var("BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/var/tmp/afs-bench")),
            runs,
            // Two by default: the Andrew passes on sshfs alone take ~40 s each, and
            // the whole suite has to stay under 15 minutes on 2 cores.
            andrew_runs: num("BENCH_ANDREW_RUNS", if quick { 1 } else { runs.min(2) })?,
            peer_runs: num("BENCH_PEER_RUNS", runs.min(2))?,
            peer_andrew_runs: num("BENCH_PEER_ANDREW_RUNS", 1)?,
            peer_create_runs: num("BENCH_PEER_CREATE_RUNS", 1)?,
            big_mib: num("BENCH_BIG_MIB", big)?,
            small_files: num("BENCH_SMALL_FILES", small)?,
            create_files: num("BENCH_CREATE_FILES", create)?,
            reint_ops: num("BENCH_REINT_OPS", if quick { 1000 } else { 10_000 })?,
            andrew_jobs: num("BENCH_ANDREW_JOBS", 2)?,
            scale_clients,
            scale_secs: num("BENCH_SCALE_SECS", secs)?,
            systems,
            workloads,
            out_md: var("BENCH_OUT").map(PathBuf::from).unwrap_or_else(|| default_out.join("BENCHMARKS.md")),
            out_png: var("BENCH_PLOT").map(PathBuf::from).unwrap_or_else(|| {
                if quick {
                    default_out.join("benchmarks.png")
                } else {
                    root.join("bench/benchmarks.png")
                }
            }),
            keep: var("BENCH_KEEP").is_some_and(|v| v != "0"),
            bin_dir,
            scripts: var("BENCH_SCRIPTS").map(PathBuf::from).unwrap_or_else(|| root.join("bench/scripts")),
            quick,
        };
        if cfg.runs == 0
            || cfg.andrew_runs == 0
            || cfg.peer_runs == 0
            || cfg.peer_andrew_runs == 0
            || cfg.peer_create_runs == 0
            || cfg.big_mib == 0
            || cfg.small_files == 0
            || cfg.create_files == 0
            || cfg.reint_ops < 2
        {
            bail!("BENCH_RUNS, BENCH_ANDREW_RUNS, BENCH_PEER_RUNS, BENCH_PEER_ANDREW_RUNS, BENCH_PEER_CREATE_RUNS, BENCH_BIG_MIB, BENCH_SMALL_FILES and BENCH_CREATE_FILES must be positive");
        }
        for b in ["afsd", "venus"] {
            if !cfg.bin_dir.join(b).exists() {
                bail!(
                    "{} is missing: build with `cargo build --release -p afsd -p venus` (or set BENCH_BIN)",
                    cfg.bin_dir.join(b).display()
                );
            }
        }
        Ok(cfg)
    }

    /// Runs per figure for `kind`.
    pub fn runs_for(&self, kind: Kind) -> usize {
        if kind.is_peer() {
            self.peer_runs
        } else {
            self.runs
        }
    }

    /// Workload 6's runs for `kind`.
    pub fn create_runs_for(&self, kind: Kind) -> usize {
        if kind.is_peer() {
            self.peer_create_runs
        } else {
            self.runs
        }
    }

    /// Andrew runs for `kind`.
    pub fn andrew_runs_for(&self, kind: Kind) -> usize {
        if kind.is_peer() {
            self.peer_andrew_runs
        } else {
            self.andrew_runs
        }
    }

    pub fn wants(&self, workload: u32) -> bool {
        self.workloads.contains(&workload)
    }

    pub fn big_bytes(&self) -> u64 {
        self.big_mib << 20
    }
}
