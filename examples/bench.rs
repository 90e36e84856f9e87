//! Benchmark of the connected data path, with baselines measured in the
//! same run on the same machine:
//!
//! - warm sequential read of a large cached file through the mount, against
//!   reading its container file directly;
//! - cold fetch of that file through the mount, against a raw TCP copy of the
//!   same bytes over loopback (read from disk, send, receive, write to disk);
//! - RPCs per warm open+stat+close of small cached files (target 0);
//! - reintegration of BENCH_OPS logged operations vs the same done connected;
//! - peak memory (VmHWM) of venus and afsd.
//!
//! Run: `cargo build --release --workspace && cargo run --release --example bench`
//! (`BENCH_SIZE_MIB` sets the file size, default 1024; `BENCH_RUNS` the runs
//! per figure, default 3). Needs root (FUSE, drop_caches).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/release/examples/bench -> target/release
    let p = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(p.exists(), "{} missing: run cargo build --release --workspace", p.display());
    p
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn read_all(p: &Path) -> u64 {
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf).unwrap() {
            0 => return n,
            k => n += k as u64,
        }
    }
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn wait_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("process did not start")
}

fn hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn stats(state: &Path) -> serde_json::Value {
    let out = Command::new(bin("afsd")).args(["stats", "--json", "--state"]).arg(state).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn total_rpcs(v: &serde_json::Value) -> u64 {
    v["rpcs"].as_object().unwrap().values().map(|x| x.as_u64().unwrap()).sum()
}

/// A raw TCP copy: a sender thread streams the file, the receiver writes it.
fn raw_tcp_copy(src: &Path, dst: &Path) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let src = src.to_path_buf();
    let sender = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut f = std::fs::File::open(&src).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
        }
    });
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).unwrap();
    let mut out = std::fs::File::create(dst).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).unwrap();
    }
    let t = start.elapsed();
    sender.join().unwrap();
    t
}

fn main() {
    let size_mib: u64 = std::env::var("BENCH_SIZE_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("afs-bench-{}", std::process::id()));
    let (export, state, mnt, cache) = (dir.join("export"), dir.join("state"), dir.join("mnt"), dir.join("cache"));
    for d in [&export, &state, &mnt, &cache] {
        std::fs::create_dir_all(d).unwrap();
    }
    eprintln!("bench: writing a {size_mib} MiB file and 1000 small files in {}", export.display());
    {
        let mut f = std::fs::File::create(export.join("big")).unwrap();
        let mut block = vec![0u8; 1 << 20];
        for i in 0..size_mib {
            for (j, b) in block.iter_mut().enumerate() {
                *b = (i as usize * 31 + j * 7) as u8;
            }
            f.write_all(&block).unwrap();
        }
        std::fs::create_dir_all(export.join("small")).unwrap();
        for i in 0..1000 {
            std::fs::write(export.join(format!("small/f{i:04}")), format!("small file {i}\n")).unwrap();
        }
    }

    let mut afsd = Command::new(bin("afsd"))
        .args(["serve", "--export"])
        .arg(&export)
        .arg("--state")
        .arg(&state)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = wait_line(&mut afsd, "afsd listening on ");
    let mut venus = Command::new(bin("venus"))
        .arg("mount")
        .arg(&mnt)
        .args(["--server", &addr, "--key"])
        .arg(state.join("afs.key"))
        .arg("--cache")
        .arg(&cache)
        .args(["--cache-size", &format!("{}M", size_mib * 2 + 512)])
        .env("RUST_LOG", std::env::var("BENCH_VENUS_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_line(&mut venus, "venus mounted");

    let big = mnt.join("big");
    let flush = || {
        let st = Command::new(bin("venus")).args(["cache", "flush", "--cache"]).arg(&cache).output().unwrap();
        assert!(st.status.success());
    };

    // Cold fetch through the mount vs raw TCP.
    let mut cold = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..runs {
        flush();
        drop_caches();
        let t = Instant::now();
        assert_eq!(read_all(&big), size_mib << 20);
        cold.push(t.elapsed());
        let dst = dir.join("raw-copy");
        let _ = std::fs::remove_file(&dst);
        drop_caches();
        raw.push(raw_tcp_copy(&export.join("big"), &dst));
        let _ = std::fs::remove_file(&dst);
    }

    // Warm read through the mount vs the container directly.
    // Container files live in shards: containers/XX/FID.
    let container = std::fs::read_dir(cache.join("containers"))
        .unwrap()
        .flat_map(|shard| std::fs::read_dir(shard.unwrap().path()).unwrap())
        .map(|e| e.unwrap())
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    read_all(&big);
    read_all(&container);
    let mut warm = Vec::new();
    let mut direct = Vec::new();
    for _ in 0..runs.max(3) {
        let t = Instant::now();
        read_all(&big);
        warm.push(t.elapsed());
        let t = Instant::now();
        read_all(&container);
        direct.push(t.elapsed());
    }

    // RPCs per warm open of small files, and their latency.
    let small: Vec<PathBuf> = (0..1000).map(|i| mnt.join(format!("small/f{i:04}"))).collect();
    for p in &small {
        std::fs::metadata(p).unwrap();
        read_all(p);
    }
    drop_caches();
    let before = total_rpcs(&stats(&state));
    let t = Instant::now();
    for p in &small {
        let f = std::fs::File::open(p).unwrap();
        f.metadata().unwrap();
        drop(f);
    }
    let open_time = t.elapsed();
    let rpcs = total_rpcs(&stats(&state)) - before;
    let local_small = dir.join("local-small");
    std::fs::create_dir_all(&local_small).unwrap();
    for i in 0..1000 {
        std::fs::write(local_small.join(format!("f{i:04}")), "x").unwrap();
    }
    let _ = std::fs::read_dir(&local_small).unwrap().count();
    let t = Instant::now();
    for i in 0..1000 {
        let f = std::fs::File::open(local_small.join(format!("f{i:04}"))).unwrap();
        f.metadata().unwrap();
    }
    let local_open = t.elapsed();

    // Peak memory over the large transfers (the bounded-memory target).
    let (venus_transfer_hwm, afsd_transfer_hwm) = (hwm_kib(venus.id()), hwm_kib(afsd.id()));

    // Reintegration of N logged operations vs doing them connected.
    let ops: usize = std::env::var("BENCH_OPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let files = ops / 2; // each file is two operations: create, store
    let connected_dir = mnt.join("connected");
    std::fs::create_dir_all(&connected_dir).unwrap();
    let t = Instant::now();
    for i in 0..files {
        std::fs::write(connected_dir.join(format!("f{i:05}")), format!("file {i}\n")).unwrap();
    }
    let connected_time = t.elapsed();
    let venus_cli = |args: &[&str]| {
        let out = Command::new(bin("venus")).args(args).arg("--cache").arg(&cache).output().unwrap();
        assert!(out.status.success(), "venus {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let offline_dir = mnt.join("offline");
    std::fs::create_dir_all(&offline_dir).unwrap();
    venus_cli(&["disconnect"]);
    let t = Instant::now();
    for i in 0..files {
        std::fs::write(offline_dir.join(format!("f{i:05}")), format!("file {i}\n")).unwrap();
    }
    let offline_time = t.elapsed();
    let t = Instant::now();
    venus_cli(&["reconnect"]);
    let reintegration_time = t.elapsed();
    assert_eq!(
        std::fs::read_dir(export.join("offline")).unwrap().count(),
        files,
        "every offline file reached the server"
    );

    let venus_hwm = hwm_kib(venus.id());
    let afsd_hwm = hwm_kib(afsd.id());

    unsafe { libc::kill(venus.id() as i32, libc::SIGTERM) };
    let _ = venus.wait();
    unsafe { libc::kill(afsd.id() as i32, libc::SIGTERM) };
    let _ = afsd.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let mib = size_mib as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    let (cm, cmin, cmax) = median(cold);
    let (rm, _, _) = median(raw);
    let (wm, wmin, wmax) = median(warm);
    let (dm, _, _) = median(direct);
    println!("\n## afs connected data path ({size_mib} MiB file, median of {runs} runs, min-max in brackets)\n");
    println!("| workload | ours | baseline | ratio (ours/baseline) | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| warm sequential read via mount vs container file | {:.0} MiB/s [{:.0}-{:.0}] | {:.0} MiB/s | {:.2} | >= 0.90 |",
        rate(wm),
        rate(wmax),
        rate(wmin),
        rate(dm),
        rate(wm) / rate(dm)
    );
    println!(
        "| cold fetch via mount vs raw TCP copy | {:.0} MiB/s [{:.0}-{:.0}] | {:.0} MiB/s | {:.2} | >= 0.80 |",
        rate(cm),
        rate(cmax),
        rate(cmin),
        rate(rm),
        rate(cm) / rate(rm)
    );
    println!(
        "| warm open+stat+close, 1000 small files | {:.1} us/open | {:.1} us/open (local disk) | {:.2} | - |",
        open_time.as_secs_f64() * 1e6 / 1000.0,
        local_open.as_secs_f64() * 1e6 / 1000.0,
        open_time.as_secs_f64() / local_open.as_secs_f64()
    );
    println!("| RPCs per warm open | {:.3} | 0 | - | 0 |", rpcs as f64 / 1000.0);
    println!(
        "| {ops} operations ({files} small files created and written): reintegration vs connected | {:.2} s | {:.2} s | {:.2} | <= 1.0 |",
        reintegration_time.as_secs_f64(),
        connected_time.as_secs_f64(),
        reintegration_time.as_secs_f64() / connected_time.as_secs_f64()
    );
    println!(
        "| the same {ops} operations made offline (logged locally) | {:.2} s | - | - | - |",
        offline_time.as_secs_f64()
    );
    println!(
        "| peak memory (VmHWM) venus / afsd over the {size_mib} MiB transfers | {} MiB / {} MiB | - | - | venus < 100 MiB |",
        venus_transfer_hwm / 1024,
        afsd_transfer_hwm / 1024
    );
    println!(
        "| peak memory (VmHWM) venus / afsd over the whole run | {} MiB / {} MiB | - | - | - |",
        venus_hwm / 1024,
        afsd_hwm / 1024
    );
}
