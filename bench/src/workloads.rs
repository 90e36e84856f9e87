//! Workloads 1-6, run against any system through its root directory.

use crate::config::{Config, Kind};
use crate::results::{Results, Show};
use crate::systems::{Layout, System};
use crate::util::{self, drop_caches, hwm_kib, read_all, reset_hwm, write_pattern};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const ANDREW_PHASES: [&str; 5] = ["MakeDir", "Copy", "ScanDir", "ReadAll", "Make"];

/// A workload's short name, for the log and the report.
pub fn name(workload: u32) -> &'static str {
    match workload {
        1 => "Andrew",
        2 => "warm read",
        3 => "cold read",
        4 => "write-back",
        5 => "small opens",
        6 => "creates",
        7 => "server scale",
        8 => "reintegration",
        _ => "?",
    }
}

/// Creates the data every system starts from: the Andrew source tree, the
/// large file and the small files, in the plain directory and (as a copy) in
/// afsd's export, plus the files of the server-scale workload.
pub fn prepare(cfg: &Config, layout: &Layout) -> Result<()> {
    // Each system's directory in a block group of its own: on ext4 without
    // a journal, creating files next to the tens of thousands the previous
    // run just removed costs up to ~1.5 ms per file for minutes (measured),
    // whichever system happened to land there.
    std::fs::create_dir_all(&cfg.dir).with_context(|| format!("mkdir {}", cfg.dir.display()))?;
    common::mark_top_dir(&cfg.dir);
    for d in [&layout.plain, &layout.export, &layout.logs, &layout.peers, &layout.scratch] {
        std::fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
    }
    let src = layout.plain.join("andrew-src");
    util::run(Command::new("python3").arg(cfg.scripts.join("gen-andrew-tree.py")).arg(&src))?;
    std::fs::write(src.join(".complete"), "")?;
    write_pattern(&layout.plain.join("big"), cfg.big_bytes(), 1)?;
    for name in ["andrew-src", "big"] {
        util::run(Command::new("cp").arg("-a").arg(layout.plain.join(name)).arg(&layout.export))?;
    }
    let scale = layout.export.join("scale");
    std::fs::create_dir_all(&scale)?;
    let mut block = vec![0u8; 4096];
    for i in 0..64u64 {
        util::fill_block(&mut block, 1000 + i);
        std::fs::write(scale.join(format!("r{i:03}")), &block)?;
        std::fs::write(scale.join(format!("w{i:03}")), &block)?;
    }
    std::fs::write(scale.join("hot"), &block)?;
    drop_caches();
    Ok(())
}

/// Runs one pass of bench/scripts/andrew.sh in `root` with the source tree
/// that lives in the same file system; returns seconds per phase. Dirty
/// pages a previous pass left (its objects, venus's containers) are
/// written out first, so that no pass pays for another's writeback.
fn andrew_pass(cfg: &Config, root: &Path, verify: bool) -> Result<Vec<(String, f64)>> {
    let _ = Command::new("sync").status();
    let out = util::run(
        Command::new("bash")
            .arg(cfg.scripts.join("andrew.sh"))
            .arg(root)
            .env("ANDREW_SRC", root.join("andrew-src"))
            .env("ANDREW_JOBS", cfg.andrew_jobs.to_string())
            .env("ANDREW_KEEP", "1")
            .env("ANDREW_VERIFY", if verify { "1" } else { "0" })
            .stdin(Stdio::null()),
    )?;
    let mut phases = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut w = line.split_whitespace();
        if let (Some("andrew"), Some(phase), Some(secs)) = (w.next(), w.next(), w.next()) {
            if let Ok(s) = secs.parse::<f64>() {
                phases.push((phase.to_string(), s));
            }
        }
    }
    if phases.len() != ANDREW_PHASES.len() + 1 {
        bail!("andrew.sh printed {} phases: {}", phases.len(), String::from_utf8_lossy(&out.stdout));
    }
    Ok(phases)
}

/// Workload 1: the Andrew benchmark, cold (client caches empty, page cache
/// dropped) then warm (second pass on the same mount), `runs` times.
///
/// When afs and local disk are both measured, local disk's cold and warm
/// passes are made here, in each afs run just before afs's own (caches
/// dropped before each cold pass, as always), rather than in local disk's
/// own turn minutes earlier. This machine's speed drifts by tens of percent
/// within minutes (one run's local passes took 12.2 s in its first minute
/// and 9.3 s four minutes later), so a ratio of passes made minutes apart
/// measured the drift as much as afs.
pub fn andrew(cfg: &Config, layout: &Layout, sys: &mut System, res: &mut Results) -> Result<()> {
    if sys.kind == Kind::Local && interleaves_andrew(cfg) {
        eprintln!("bench:   local disk's Andrew passes are made between afs's");
        return Ok(());
    }
    for run in 0..cfg.andrew_runs_for(sys.kind) {
        sys.cold()?;
        if sys.kind == Kind::Afs && interleaves_andrew(cfg) {
            let local = ["cold", "warm"]
                .iter()
                .try_for_each(|pass| andrew_record(cfg, &layout.plain, Kind::Local, pass, run, res));
            if let Err(e) = local {
                eprintln!("bench: local disk's Andrew pass failed: {e:#}");
                res.failures.push(format!("{}, workload 1 (Andrew, between afs's): {e:#}", Kind::Local.title()));
            }
            drop_caches();
        }
        for pass in ["cold", "warm"] {
            andrew_record(cfg, &sys.root, sys.kind, pass, run, res)?;
        }
    }
    Ok(())
}

/// Whether local disk's Andrew passes are made between afs's.
pub fn interleaves_andrew(cfg: &Config) -> bool {
    cfg.wants(1) && cfg.systems.contains(&Kind::Local) && cfg.systems.contains(&Kind::Afs)
}

/// One Andrew pass in `root`, recorded as `kind`'s: each phase and the total.
fn andrew_record(cfg: &Config, root: &Path, kind: Kind, pass: &str, run: usize, res: &mut Results) -> Result<()> {
    let base = if pass == "cold" { 0 } else { 10 };
    let t = Instant::now();
    let ticks = util::cpu_ticks();
    let phases = andrew_pass(cfg, root, run == 0)?;
    let steal = util::steal_share(ticks, util::cpu_ticks());
    if let Some(st) = steal {
        res.andrew_steal.entry(kind).or_default().push(st);
    }
    eprintln!(
        "bench:   andrew {} {pass} run {}: total {:.2} s (wall {:.1} s, host steal {})",
        kind.key(),
        run + 1,
        phases.last().map(|p| p.1).unwrap_or(0.0),
        t.elapsed().as_secs_f64(),
        util::percent(steal)
    );
    for (name, secs) in phases {
        let (i, label, plot) = match ANDREW_PHASES.iter().position(|p| *p == name) {
            Some(i) => (i as u32, format!("1. Andrew {pass}: {name}"), None),
            None => (ANDREW_PHASES.len() as u32, format!("1. Andrew {pass}: total"), Some(format!("Andrew {pass}"))),
        };
        res.add((1, base + i), &label, Show::Time, plot.as_deref(), kind, secs);
    }
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let t = Instant::now();
    let v = f()?;
    Ok((v, t.elapsed().as_secs_f64()))
}

fn expect_size(n: u64, want: u64, what: &Path) -> Result<()> {
    if n != want {
        bail!("{}: read {n} bytes, expected {want}", what.display());
    }
    Ok(())
}

/// Records the peak memory of venus and afsd since the last reset.
fn note_memory(sys: &System, res: &mut Results, workload: u32) {
    if let (Some(v), Some(a)) = (sys.venus_pid(), sys.afsd_pid()) {
        res.memory(workload, hwm_kib(v), hwm_kib(a));
    }
}

fn reset_memory(sys: &System) {
    for pid in [sys.venus_pid(), sys.afsd_pid()].into_iter().flatten() {
        reset_hwm(pid);
    }
}

/// Workload 3: cold sequential read of the large file (for afs: a whole-file
/// fetch), and for afs the raw TCP baseline right after each: both then see
/// the same machine, whose disk and CPU speeds drift over minutes.
pub fn cold_read(cfg: &Config, layout: &Layout, sys: &mut System, res: &mut Results) -> Result<()> {
    let size = cfg.big_bytes();
    let show = Show::Rate { mib: cfg.big_mib as f64 };
    let label = format!("3. cold read of a {} file (afs: whole-file fetch)", size_name(cfg.big_mib));
    let dst = layout.scratch.join("raw-copy");
    for run in 0..cfg.runs_for(sys.kind) {
        sys.cold()?;
        reset_memory(sys);
        let big = sys.root.join("big");
        let (n, secs) = timed(|| read_all(&big))?;
        expect_size(n, size, &big)?;
        note_memory(sys, res, 3);
        res.add((3, 0), &label, show, Some("cold read"), sys.kind, secs);
        if sys.kind == Kind::Afs {
            let _ = std::fs::remove_file(&dst);
            drop_caches();
            let raw = raw_tcp_copy(&sys.server_dir.join("big"), &dst)?;
            res.add((3, 1), "3b. baseline: raw TCP copy of the same bytes over loopback", show, None, Kind::Afs, raw);
            let rate = |s: f64| cfg.big_mib as f64 / s;
            eprintln!(
                "bench:   cold read run {}: {:.0} MiB/s, raw TCP right after {:.0} MiB/s ({:.2}x)",
                run + 1,
                rate(secs),
                rate(raw),
                raw / secs
            );
        }
        sys.big_read = true;
    }
    let _ = std::fs::remove_file(&dst);
    Ok(())
}

/// Warm reads per run on local disk and afs: one takes ~70 ms, and the
/// median of a handful steadies the ratio against this machine's noise.
pub const WARM_READS_PER_RUN: usize = 5;

/// Workload 2: warm sequential read of the (now cached) large file, and for
/// afs the same read of the container file directly. The two alternate,
/// each going first in every other pair, so both see the same machine (the
/// cold read just before leaves writeback running for a while).
pub fn warm_read(cfg: &Config, sys: &mut System, res: &mut Results) -> Result<()> {
    let size = cfg.big_bytes();
    let show = Show::Rate { mib: cfg.big_mib as f64 };
    let big = sys.root.join("big");
    if !sys.big_read {
        expect_size(read_all(&big)?, size, &big)?;
    }
    let container = if sys.kind == Kind::Afs {
        let c = largest_container(sys.cache_dir())?;
        read_all(&c)?;
        Some(c)
    } else {
        None
    };
    reset_memory(sys);
    let label = format!("2. warm read of a cached {} file", size_name(cfg.big_mib));
    let reads = if sys.kind.is_peer() { cfg.runs_for(sys.kind) } else { cfg.runs * WARM_READS_PER_RUN };
    for i in 0..reads {
        let mut through_mount = || -> Result<()> {
            let (n, secs) = timed(|| read_all(&big))?;
            expect_size(n, size, &big)?;
            res.add((2, 0), &label, show, Some("warm read"), sys.kind, secs);
            Ok(())
        };
        let Some(container) = &container else {
            through_mount()?;
            continue;
        };
        let direct = || -> Result<f64> {
            let (n, secs) = timed(|| read_all(container))?;
            expect_size(n, size, container)?;
            Ok(secs)
        };
        let secs = if i % 2 == 0 {
            through_mount()?;
            direct()?
        } else {
            let secs = direct()?;
            through_mount()?;
            secs
        };
        res.add((2, 1), "2b. baseline: the same read of venus's container file", show, None, Kind::Afs, secs);
    }
    note_memory(sys, res, 2);
    Ok(())
}

/// The largest file in venus's container shards (`containers/XX/FID`).
fn largest_container(cache: &Path) -> Result<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for shard in std::fs::read_dir(cache.join("containers")).context("read the containers directory")? {
        for e in std::fs::read_dir(shard?.path())? {
            let e = e?;
            let len = e.metadata()?.len();
            if best.as_ref().is_none_or(|b| len > b.0) {
                best = Some((len, e.path()));
            }
        }
    }
    best.map(|b| b.1).context("no container file")
}

/// Workload 4: write the large file and close it, until the server has all
/// of it (afs: the store on close; rclone: its write-back upload).
pub fn write_back(cfg: &Config, sys: &mut System, res: &mut Results) -> Result<()> {
    let size = cfg.big_bytes();
    let show = Show::Rate { mib: cfg.big_mib as f64 };
    let label = format!("4. write {} and close, until the server has it", size_name(cfg.big_mib));
    reset_memory(sys);
    for run in 0..cfg.runs_for(sys.kind) {
        let name = format!("wb-{}-{run}", sys.kind.key());
        let path = sys.root.join(&name);
        let (_, secs) = timed(|| {
            write_pattern(&path, size, 100 + run as u64)?;
            sys.wait_server_has(&name, size)
        })?;
        res.add((4, 0), &label, show, Some("write-back"), sys.kind, secs);
        note_memory(sys, res, 4);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        sys.settle()?;
        reset_memory(sys);
    }
    Ok(())
}

/// Workload 5: open+fstat+close of cached small files: those workload 6
/// just created through the mount (or, when it did not run, as many made
/// here the same way, untimed); for afs also the RPCs this costs (none,
/// when the cache holds promises).
pub fn small_opens(cfg: &Config, sys: &mut System, res: &mut Results) -> Result<()> {
    let dir = match &sys.created {
        Some((dir, n)) if *n >= cfg.small_files => dir.clone(),
        _ => {
            let dir = sys.root.join(format!("small-{}", sys.kind.key()));
            create_small_files(&dir, cfg.small_files)?;
            sys.settle()?;
            dir
        }
    };
    let files: Vec<PathBuf> = (0..cfg.small_files).map(|i| dir.join(small_name(i))).collect();
    let pass = || -> Result<()> {
        for p in &files {
            let f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
            f.metadata()?;
        }
        Ok(())
    };
    pass()?;
    let n = files.len() as f64;
    let label = format!("5. open+stat+close of {} cached small files", cfg.small_files);
    let before = if sys.kind == Kind::Afs { Some(sys.total_rpcs()?) } else { None };
    for _ in 0..cfg.runs_for(sys.kind) {
        let ((), secs) = timed(pass)?;
        res.add((5, 0), &label, Show::PerOp { n }, Some("open+stat"), sys.kind, secs);
    }
    if let Some(before) = before {
        // `afsd stats` itself is not an RPC of the volume protocol.
        let after = sys.total_rpcs()?;
        res.rpcs_per_open = Some((after - before) as f64 / (n * cfg.runs as f64));
        drop_caches();
        let before = sys.total_rpcs()?;
        pass()?;
        res.rpcs_per_open_after_drop = Some((sys.total_rpcs()? - before) as f64 / n);
    }
    Ok(())
}

fn small_name(i: usize) -> String {
    format!("f{i:05}")
}

/// Makes `dir` and `n` small files in it: create, write a line, close.
fn create_small_files(dir: &Path, n: usize) -> Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    for i in 0..n {
        let p = dir.join(small_name(i));
        let mut f = std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
        writeln!(f, "small file {i}")?;
    }
    Ok(())
}

/// Workload 6: create (and write and close) small files in one new directory.
pub fn creates(cfg: &Config, sys: &mut System, res: &mut Results) -> Result<()> {
    let label = format!("6. create {} small files in one directory", cfg.create_files);
    for run in 0..cfg.create_runs_for(sys.kind) {
        let dir = sys.root.join(format!("create-{}-{run}", sys.kind.key()));
        let ((), secs) = timed(|| create_small_files(&dir, cfg.create_files))?;
        eprintln!("bench:   creates run {}: {:.0} µs per file", run + 1, secs * 1e6 / cfg.create_files as f64);
        res.add((6, 0), &label, Show::PerOp { n: cfg.create_files as f64 }, Some("create"), sys.kind, secs);
        sys.settle()?;
        sys.created = Some((dir, cfg.create_files));
    }
    Ok(())
}

/// Workload 8 (afs only): the same operations (create and write small
/// files: a create and a store each) done connected, then done disconnected
/// and reintegrated by `venus reconnect`.
pub fn reintegration(cfg: &Config, sys: &mut System, res: &mut Results) -> Result<()> {
    let files = cfg.reint_ops / 2;
    let ops = files * 2;
    let write_files = |dir: &Path| -> Result<f64> { Ok(timed(|| create_small_files(dir, files))?.1) };
    // Two runs at most: each is ~2 x `ops` durable operations on the server.
    for run in 0..cfg.runs.min(2) {
        let secs = write_files(&sys.root.join(format!("reint-conn-{run}")))?;
        res.add(
            (8, 1),
            &format!("8b. baseline: the same {ops} operations done connected"),
            Show::Time,
            None,
            Kind::Afs,
            secs,
        );
        let off = format!("reint-off-{run}");
        sys.venus_cli(&["disconnect"])?;
        let logged = write_files(&sys.root.join(&off));
        let secs = match logged {
            Ok(s) => s,
            Err(e) => {
                let _ = sys.venus_cli(&["reconnect"]);
                return Err(e);
            }
        };
        res.add(
            (8, 2),
            &format!("8c. the same {ops} operations while disconnected (logged)"),
            Show::Time,
            None,
            Kind::Afs,
            secs,
        );
        let ((), secs) = timed(|| sys.venus_cli(&["reconnect"]))?;
        let on_server = std::fs::read_dir(sys.server_dir.join(&off))?.count();
        if on_server != files {
            bail!("after reintegration the server has {on_server} of {files} files in {off}");
        }
        res.add((8, 0), &format!("8. reintegration of {ops} logged operations"), Show::Time, None, Kind::Afs, secs);
    }
    Ok(())
}

/// A raw TCP copy over loopback: one thread reads the file from disk and
/// sends it, the other receives and writes it to disk.
fn raw_tcp_copy(src: &Path, dst: &Path) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let src = src.to_path_buf();
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        let mut f = std::fs::File::open(&src)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n])?;
        }
    });
    let mut s = TcpStream::connect(addr)?;
    let mut out = std::fs::File::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    drop(out);
    let t = start.elapsed().as_secs_f64();
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(t)
}

pub fn size_name(mib: u64) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}
