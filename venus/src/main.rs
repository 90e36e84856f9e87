//! venus: the cache manager. Mounts a volume of an afsd server through FUSE,
//! caching whole files, and answers the CLI on a control socket.

mod cache;
mod control;
mod errors;
mod fs;
mod fuse;
mod mount;

use clap::{Parser, Subcommand};
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "venus", version, about = "AFS/Coda-style caching client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount a volume (foreground, until unmounted or SIGTERM/SIGINT).
    Mount {
        mountpoint: PathBuf,
        /// The afsd server, host:port.
        #[arg(long)]
        server: String,
        /// The server's key file (afsd creates STATE/afs.key).
        #[arg(long)]
        key: PathBuf,
        /// The cache directory (created if missing).
        #[arg(long)]
        cache: PathBuf,
        /// Cache size limit, e.g. 512M, 10G.
        #[arg(long, default_value = "4G", value_parser = parse_size)]
        cache_size: u64,
    },
    /// State, cache use, pending changes.
    Status {
        #[arg(long)]
        cache: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Inspect or trim the cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cached objects.
    Ls {
        #[arg(long)]
        cache: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Drop cached content of clean, closed files (all, or under PATH).
    Flush {
        #[arg(long)]
        cache: PathBuf,
        path: Option<PathBuf>,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                other => return Err(format!("unknown size unit {other:?} (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size"))?;
    if n < 0.0 {
        return Err("sizes cannot be negative".into());
    }
    Ok((n * mult as f64) as u64)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.cmd {
        Cmd::Mount { mountpoint, server, key, cache, cache_size } => {
            mount::run(mount::MountOptions { mountpoint, server, key, cache, cache_size })
        }
        other => cli_command(other),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("venus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cli_command(cmd: Cmd) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        match cmd {
            Cmd::Status { cache, json } => {
                let v = control::request(&cache, json!({"cmd": "status"})).await?;
                if json {
                    println!("{v}");
                } else if let Some(map) = v.as_object() {
                    for (k, val) in map {
                        println!("{k:>14}: {}", val.as_str().map(str::to_string).unwrap_or_else(|| val.to_string()));
                    }
                }
            }
            Cmd::Cache { cmd: CacheCmd::Ls { cache, json } } => {
                let v = control::request(&cache, json!({"cmd": "cache_ls"})).await?;
                if json {
                    println!("{v}");
                } else {
                    for o in v["objects"].as_array().into_iter().flatten() {
                        let flags = format!(
                            "{}{}{}{}",
                            if o["cached"] == true { 'c' } else { '-' },
                            if o["current"] == true { 'v' } else { '-' },
                            if o["dirty"] == true { 'd' } else { '-' },
                            if o["open"] == true { 'o' } else { '-' },
                        );
                        println!("{flags} {:>12} {}", o["size"], o["path"].as_str().unwrap_or("?"));
                    }
                }
            }
            Cmd::Cache { cmd: CacheCmd::Flush { cache, path } } => {
                let fid = match path {
                    Some(p) => Some(fid_of(&p)?),
                    None => None,
                };
                let v = control::request(&cache, json!({"cmd": "cache_flush", "fid": fid})).await?;
                println!("flushed {} files, {} bytes", v["flushed"], v["bytes"]);
            }
            Cmd::Mount { .. } => unreachable!("handled in main"),
        }
        Ok(())
    })
}

/// The fid of a path inside a mount: venus uses fids as inode numbers.
fn fid_of(path: &Path) -> anyhow::Result<u64> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(meta.ino())
}

/// Bulk data moves in 1 MiB buffers. glibc would serve each from a fresh
/// mmap and unmap it on free (page faults on every chunk); keeping such
/// buffers on the heap and not trimming it eagerly makes transfers several
/// times cheaper. Memory stays bounded by the transfer windows.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}
