//! venus: the cache manager. Mounts a volume of an afsd server through FUSE,
//! caching whole files, and answers the CLI on a control socket.

mod cache;
mod cml;
mod conflicts;
mod control;
mod deferred;
mod errors;
mod fs;
mod fuse;
mod hoard;
mod link;
mod mount;
mod offline;
mod reintegrate;
mod repair;

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
        /// Seconds between hoard walks while connected.
        #[arg(long, default_value_t = 600)]
        hoard_interval: u64,
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
    /// Work offline on purpose (changes are logged).
    Disconnect {
        #[arg(long)]
        cache: PathBuf,
    },
    /// Go back online and reintegrate the log (waits until done).
    Reconnect {
        #[arg(long)]
        cache: PathBuf,
    },
    /// List, show and resolve conflicts.
    Conflicts {
        #[command(subcommand)]
        cmd: ConflictsCmd,
    },
    /// Pin what you will need offline.
    Hoard {
        #[command(subcommand)]
        cmd: HoardCmd,
    },
}

#[derive(Subcommand)]
enum HoardCmd {
    /// Hoard a path (the object alone unless --children or --descendants).
    Add {
        #[arg(long)]
        cache: PathBuf,
        path: PathBuf,
        /// 1 (lowest) to 1000 (highest).
        #[arg(long, default_value_t = hoard::DEFAULT_PRIORITY)]
        priority: u32,
        #[arg(long, conflicts_with = "descendants")]
        children: bool,
        /// Everything below, including entries created later.
        #[arg(long)]
        descendants: bool,
    },
    Rm {
        #[arg(long)]
        cache: PathBuf,
        path: PathBuf,
    },
    Ls {
        #[arg(long)]
        cache: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Fetch every hoarded object that is missing or stale, now.
    Walk {
        #[arg(long)]
        cache: PathBuf,
    },
    /// Add the entries of a profile (PATH PRIORITY SCOPE per line).
    Load {
        #[arg(long)]
        cache: PathBuf,
        file: PathBuf,
    },
    /// Write the hoard list as a profile.
    Save {
        #[arg(long)]
        cache: PathBuf,
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConflictsCmd {
    List {
        #[arg(long)]
        cache: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// A unified diff for text, sizes and hashes otherwise.
    Show {
        #[arg(long)]
        cache: PathBuf,
        path: PathBuf,
    },
    Resolve {
        #[arg(long)]
        cache: PathBuf,
        path: PathBuf,
        /// Which version to keep.
        #[arg(long, value_parser = ["local", "server", "both"], conflicts_with = "use_file")]
        keep: Option<String>,
        /// Use this file (a merge) as the result.
        #[arg(long = "use", value_name = "FILE")]
        use_file: Option<PathBuf>,
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
    common::tune_allocator();
    common::raise_fd_limit();
    common::init_logging();
    let result = match cli.cmd {
        Cmd::Mount { mountpoint, server, key, cache, cache_size, hoard_interval } => {
            mount::run(mount::MountOptions { mountpoint, server, key, cache, cache_size, hoard_interval })
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
            Cmd::Disconnect { cache } => {
                control::request(&cache, json!({"cmd": "disconnect"})).await?;
                println!("disconnected: changes are logged until venus reconnect");
            }
            Cmd::Reconnect { cache } => {
                let v = control::request(&cache, json!({"cmd": "reconnect"})).await?;
                println!("connected; {} conflict(s)", v["conflicts"]);
            }
            Cmd::Conflicts { cmd: ConflictsCmd::List { cache, json } } => {
                let v = control::request(&cache, json!({"cmd": "conflicts_list"})).await?;
                if json {
                    println!("{v}");
                } else {
                    for c in v["conflicts"].as_array().into_iter().flatten() {
                        let side = |s: &serde_json::Value| {
                            if s["exists"] == true {
                                format!("{} bytes, mtime {}", s["size"], s["mtime"])
                            } else {
                                "none".into()
                            }
                        };
                        println!(
                            "{}  [{}]  local: {}  server: {}",
                            c["path"].as_str().unwrap_or("?"),
                            c["kind"].as_str().unwrap_or("?"),
                            side(&c["local"]),
                            side(&c["server"])
                        );
                        if let Some(p) = c["local_copy"].as_str() {
                            println!("    local copy: {p}");
                        }
                    }
                }
            }
            Cmd::Conflicts { cmd: ConflictsCmd::Show { cache, path } } => {
                let v = control::request(&cache, json!({"cmd": "conflicts_show", "path": absolute(&path)?})).await?;
                println!(
                    "{} [{}]: {}",
                    v["path"].as_str().unwrap_or("?"),
                    v["kind"].as_str().unwrap_or("?"),
                    v["detail"].as_str().unwrap_or("")
                );
                match v["diff"].as_str() {
                    Some(d) => print!("{d}"),
                    None => {
                        println!("local:  {}", v["local"]);
                        println!("server: {}", v["server"]);
                    }
                }
            }
            Cmd::Conflicts { cmd: ConflictsCmd::Resolve { cache, path, keep, use_file } } => {
                let use_file = match use_file {
                    Some(f) => Some(absolute(&f)?),
                    None => None,
                };
                if keep.is_none() && use_file.is_none() {
                    anyhow::bail!("say --keep local|server|both or --use FILE");
                }
                let v = control::request(
                    &cache,
                    json!({"cmd": "conflicts_resolve", "path": absolute(&path)?, "keep": keep, "use": use_file}),
                )
                .await?;
                println!("{}", v["resolved"].as_str().unwrap_or("resolved"));
            }
            Cmd::Hoard { cmd } => hoard_command(cmd).await?,
            Cmd::Mount { .. } => unreachable!("handled in main"),
        }
        Ok(())
    })
}

async fn hoard_command(cmd: HoardCmd) -> anyhow::Result<()> {
    match cmd {
        HoardCmd::Add { cache, path, priority, children, descendants } => {
            let scope = if descendants {
                "descendants"
            } else if children {
                "children"
            } else {
                "object"
            };
            let v = control::request(
                &cache,
                json!({"cmd": "hoard_add", "path": absolute(&path)?, "priority": priority, "scope": scope}),
            )
            .await?;
            println!("hoarding {} (priority {priority}, {scope})", v["added"].as_str().unwrap_or("?"));
        }
        HoardCmd::Rm { cache, path } => {
            control::request(&cache, json!({"cmd": "hoard_rm", "path": absolute(&path)?})).await?;
        }
        HoardCmd::Ls { cache, json } => {
            let v = control::request(&cache, json!({"cmd": "hoard_ls"})).await?;
            if json {
                println!("{v}");
            } else {
                for e in v["entries"].as_array().into_iter().flatten() {
                    println!(
                        "{:>5}  {:<12} {}",
                        e["priority"],
                        e["scope"].as_str().unwrap_or("?"),
                        e["path"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        HoardCmd::Walk { cache } => {
            use std::io::IsTerminal;
            let tty = std::io::stdout().is_terminal();
            let v = control::request_stream(&cache, json!({"cmd": "hoard_walk"}), &mut |p| {
                let p = &p["progress"];
                let (done, total) = (p["done"].as_u64().unwrap_or(0), p["total"].as_u64().unwrap_or(0));
                let mib = |k: &str| p[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
                if tty {
                    let width = 30usize;
                    let filled = if total == 0 { width } else { (done as usize * width / total as usize).min(width) };
                    print!(
                        "\r[{}{}] {done}/{total} objects, {:.1}/{:.1} MiB",
                        "#".repeat(filled),
                        " ".repeat(width - filled),
                        mib("bytes"),
                        mib("total_bytes")
                    );
                    let _ = std::io::Write::flush(&mut std::io::stdout());
                } else {
                    println!("hoard: {done}/{total} objects, {:.1}/{:.1} MiB", mib("bytes"), mib("total_bytes"));
                }
            })
            .await?;
            if tty {
                println!();
            }
            let s = &v["summary"];
            println!(
                "hoard walk: {} objects ({:.1} MiB): {} fetched ({:.1} MiB), {} already current, {} failed, {} did not fit",
                s["objects"],
                s["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                s["fetched"],
                s["fetched_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                s["current"],
                s["failed"].as_array().map(|a| a.len()).unwrap_or(0),
                s["did_not_fit"].as_array().map(|a| a.len()).unwrap_or(0)
            );
            for f in s["failed"].as_array().into_iter().flatten() {
                println!("  failed: {}: {}", f[0].as_str().unwrap_or("?"), f[1].as_str().unwrap_or("?"));
            }
            for p in s["did_not_fit"].as_array().into_iter().flatten() {
                println!("  did not fit in the cache: {}", p.as_str().unwrap_or("?"));
            }
        }
        HoardCmd::Load { cache, file } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let v = control::request(&cache, json!({"cmd": "hoard_load", "text": text})).await?;
            println!("loaded {} entries", v["loaded"]);
        }
        HoardCmd::Save { cache, file } => {
            let v = control::request(&cache, json!({"cmd": "hoard_save"})).await?;
            std::fs::write(&file, v["profile"].as_str().unwrap_or(""))
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        }
    }
    Ok(())
}

/// An absolute form of a path (without resolving symlinks: the object may
/// not exist any more).
fn absolute(p: &Path) -> anyhow::Result<String> {
    let abs = if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.to_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("paths must be UTF-8"))
}

/// The fid of a path inside a mount: venus uses fids as inode numbers.
fn fid_of(path: &Path) -> anyhow::Result<u64> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(meta.ino())
}
