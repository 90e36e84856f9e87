//! Small helpers: processes, page cache, reading and writing files, memory.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Flushes dirty pages, then drops the page, dentry and inode caches of the
/// whole machine (root only; ignored when not allowed).
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Reads a file to the end with 1 MiB reads; returns the byte count.
pub fn read_all(p: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(p).with_context(|| format!("open {}", p.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf).with_context(|| format!("read {}", p.display()))? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

/// Fills `block` with bytes derived from `seed` (cheap, not compressible to
/// nothing, different for every block).
pub fn fill_block(block: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// Writes `size` bytes of pattern to a new file in 1 MiB writes and closes
/// it (no fsync).
pub fn write_pattern(p: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?;
    let mut block = vec![0u8; 1 << 20];
    let mut done = 0u64;
    let mut i = 0u64;
    while done < size {
        let n = (size - done).min(block.len() as u64) as usize;
        fill_block(&mut block[..n], seed.wrapping_add(i));
        f.write_all(&block[..n]).with_context(|| format!("write {}", p.display()))?;
        done += n as u64;
        i += 1;
    }
    drop(f);
    Ok(())
}

/// Peak resident set size (VmHWM) of a process, in KiB.
pub fn hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Resets a process's VmHWM to its current RSS (Linux >= 4.0).
pub fn reset_hwm(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Waits for a line starting with `prefix` on the child's stdout and returns
/// the rest of it. The child's stdout keeps being drained afterwards.
pub fn wait_line(child: &mut Child, prefix: &str, wait: Duration) -> Result<String> {
    let out = child.stdout.take().context("child stdout not piped")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let want = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&want) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let deadline = Instant::now() + wait;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => return Ok(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(st) = child.try_wait()? {
                    bail!("process exited ({st}) before printing {prefix:?}");
                }
                if Instant::now() > deadline {
                    bail!("no {prefix:?} line within {wait:?}");
                }
            }
            Err(_) => bail!("process closed stdout before printing {prefix:?}"),
        }
    }
}

/// Sends a signal to a child we started.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// SIGTERM, then SIGKILL if the child has not exited within `grace`.
pub fn terminate(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child, libc::SIGKILL);
    let _ = child.wait();
}

/// Runs a command to completion; fails with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("cannot run {desc}"))?;
    if !out.status.success() {
        bail!(
            "{desc} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Whether `p` is a mount point, by /proc/self/mounts: a FUSE mount whose
/// daemon died (ENOTCONN on every access) still counts.
pub fn is_mounted(p: &Path) -> bool {
    // Canonicalize the parent only: stat on a dead mount itself fails.
    let target = match (p.parent().and_then(|d| std::fs::canonicalize(d).ok()), p.file_name()) {
        (Some(d), Some(n)) => d.join(n),
        _ => p.to_path_buf(),
    };
    let want = target.display().to_string().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(want.as_str())))
        .unwrap_or(false)
}

/// Unmounts a FUSE mount that its daemon left behind (alive or dead).
pub fn force_unmount(p: &Path) {
    for _ in 0..3 {
        if !is_mounted(p) {
            return;
        }
        let ok = Command::new("fusermount3").arg("-u").arg(p).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
            || Command::new("umount").arg(p).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

/// Polls `cond` every `every` until it holds or `limit` passes.
pub fn poll(limit: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// The machine's CPU time so far, in ticks: (stolen by the host, all).
/// Steal is the time a virtual CPU was ready to run and the host ran
/// something else instead; on a shared host it is what makes figures
/// taken minutes apart disagree.
pub fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user and nice)
    let total = fields.iter().take(8).sum();
    Some((*fields.get(7)?, total))
}

/// The share of CPU time the host took between two `cpu_ticks` readings.
pub fn steal_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    (t1 > t0).then(|| (s1.saturating_sub(s0)) as f64 / (t1 - t0) as f64)
}

/// A share as a whole percentage, or "unknown" when it could not be read.
pub fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "unknown".to_string(), |s| format!("{:.0}%", s * 100.0))
}
