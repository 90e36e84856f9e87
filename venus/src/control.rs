//! The control socket: how the `venus` CLI talks to a running mount.
//!
//! One JSON request per line on `CACHE/venus.sock`, one JSON reply per line.

use crate::cml::CmlOp;
use crate::fs::Venus;
use crate::hoard::{format_profile, parse_profile, Entry as HoardEntry, Scope, DEFAULT_PRIORITY};
use crate::link::State;
use crate::repair::Resolution;
use common::Fid;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub fn socket_path(cache: &Path) -> PathBuf {
    cache.join("venus.sock")
}

pub async fn serve(listener: UnixListener, venus: Arc<Venus>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let venus = venus.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let reply = match serde_json::from_str::<Value>(&line) {
                    Ok(req) if req["cmd"] == "hoard_walk" => {
                        // Progress lines first, then the summary.
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
                        let v = venus.clone();
                        let job = tokio::task::spawn_blocking(move || {
                            let mut last = 0usize;
                            v.hoard_walk(&mut |done, total, bytes, total_bytes| {
                                if done == total || done >= last + (total / 50).max(1) {
                                    last = done;
                                    let _ = tx.send(json!({ "progress": { "done": done, "total": total, "bytes": bytes, "total_bytes": total_bytes } }));
                                }
                            })
                        });
                        while let Some(p) = rx.recv().await {
                            if wr.write_all(format!("{p}\n").as_bytes()).await.is_err() {
                                break;
                            }
                        }
                        match job.await {
                            Ok(Ok(s)) => json!({ "summary": s }),
                            Ok(Err(e)) => json!({ "error": e.to_string() }),
                            Err(e) => json!({ "error": format!("walk failed: {e}") }),
                        }
                    }
                    Ok(req) => handle(&venus, &req).await,
                    Err(e) => json!({ "error": format!("bad request: {e}") }),
                };
                if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn handle(venus: &Venus, req: &Value) -> Value {
    match req["cmd"].as_str().unwrap_or("") {
        "status" => status(venus).await,
        "cache_ls" => {
            let mut items: Vec<Value> = venus
                .cache
                .all()
                .into_iter()
                .map(|(fid, n)| {
                    json!({
                        "fid": fid.0,
                        "path": venus.cache.path_of(fid),
                        "kind": format!("{:?}", n.attr.kind).to_lowercase(),
                        "size": n.attr.size,
                        "cached": n.cached,
                        "current": n.current(),
                        "dirty": n.dirty,
                        "open": venus.is_open(fid),
                    })
                })
                .collect();
            items.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
            json!({ "objects": items })
        }
        "cache_flush" => {
            let under = req["fid"].as_u64().map(Fid);
            let (n, bytes) = venus.flush_cache(under);
            json!({ "flushed": n, "bytes": bytes })
        }
        "hoard_add" => {
            let path = match venus.volume_path(req["path"].as_str().unwrap_or("")) {
                Ok(p) => p,
                Err(e) => return json!({ "error": e.to_string() }),
            };
            let scope = Scope::parse(req["scope"].as_str().unwrap_or("object")).unwrap_or(Scope::Object);
            let priority = req["priority"].as_u64().unwrap_or(DEFAULT_PRIORITY as u64).min(u32::MAX as u64) as u32;
            match venus.hoard.add(HoardEntry { path: path.clone(), priority, scope }) {
                Ok(()) => json!({ "added": path }),
                Err(e) => json!({ "error": e.to_string() }),
            }
        }
        "hoard_rm" => match venus
            .volume_path(req["path"].as_str().unwrap_or(""))
            .and_then(|p| venus.hoard.remove(&p).map(|had| (p, had)))
        {
            Ok((_, true)) => json!({ "removed": true }),
            Ok((p, false)) => json!({ "error": format!("{p} is not in the hoard list") }),
            Err(e) => json!({ "error": e.to_string() }),
        },
        "hoard_ls" => json!({ "entries": venus.hoard.list() }),
        "hoard_save" => json!({ "profile": format_profile(&venus.hoard.list()) }),
        "hoard_load" => match parse_profile(req["text"].as_str().unwrap_or("")) {
            Ok(entries) => {
                let n = entries.len();
                for e in entries {
                    if let Err(err) = venus.hoard.add(e) {
                        return json!({ "error": err.to_string() });
                    }
                }
                json!({ "loaded": n })
            }
            Err(e) => json!({ "error": e }),
        },
        "disconnect" => {
            venus.link.set_forced(true);
            let _ = venus.cache.meta_put("forced_offline", &[1]);
            let _ = venus.cache.flush();
            venus.link.set(State::Disconnected, "disconnected by the user");
            venus.client.disconnect().await;
            json!({ "state": "disconnected" })
        }
        "reconnect" => {
            venus.link.set_forced(false);
            let _ = venus.cache.meta_put("forced_offline", &[0]);
            let _ = venus.cache.flush();
            venus.link.wake.notify_one();
            // Wait (bounded) for the keeper to reach the server and reintegrate.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
            while tokio::time::Instant::now() < deadline && !venus.link.is_connected() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let (state, cause, _) = venus.link.describe();
            if state == State::Connected {
                json!({ "state": state, "conflicts": venus.conflicts.len() })
            } else {
                json!({ "error": format!("still {state:?}: {cause}").to_lowercase() })
            }
        }
        "conflicts_list" => {
            let list: Vec<Value> = venus
                .conflicts
                .list()
                .into_iter()
                .map(|c| {
                    json!({
                        "path": c.path,
                        "kind": c.kind.label(),
                        "local": { "exists": c.local.exists, "size": c.local.size, "mtime": c.local.mtime.secs },
                        "server": { "exists": c.server.exists, "size": c.server.size, "mtime": c.server.mtime.secs },
                        "renamed_from": c.renamed_from,
                        "detail": c.detail,
                        "local_copy": c.local.exists.then(|| venus.conflicts.local_copy(c.id).display().to_string()),
                    })
                })
                .collect();
            json!({ "conflicts": list })
        }
        "conflicts_show" => match venus.conflict_show(req["path"].as_str().unwrap_or("")).await {
            Ok(v) => v,
            Err(e) => json!({ "error": e.to_string() }),
        },
        "conflicts_resolve" => {
            let how = match (req["keep"].as_str(), req["use"].as_str()) {
                (Some("local"), None) => Resolution::Local,
                (Some("server"), None) => Resolution::Server,
                (Some("both"), None) => Resolution::Both,
                (None, Some(f)) => Resolution::Use(f.into()),
                _ => return json!({ "error": "say --keep local|server|both or --use FILE" }),
            };
            match venus.conflict_resolve(req["path"].as_str().unwrap_or(""), how).await {
                Ok(outcome) => json!({ "resolved": outcome }),
                Err(e) => json!({ "error": e.to_string() }),
            }
        }
        other => json!({ "error": format!("unknown command {other:?}") }),
    }
}

async fn status(venus: &Venus) -> Value {
    let (mut objects, mut dirty, mut cached) = (0, 0, 0);
    let (mut hoarded, mut hoard_bytes, mut hoard_cached, mut hoard_current) = (0, 0u64, 0, 0);
    venus.cache.visit(|_, n| {
        let file = n.attr.kind == common::FileKind::File;
        objects += 1;
        dirty += usize::from(n.dirty && file);
        cached += usize::from(n.cached);
        if n.hoard > 0 {
            hoarded += 1;
            hoard_bytes += if file { n.attr.size } else { 0 };
            hoard_cached += usize::from(n.cached || !file);
            hoard_current += usize::from(n.current());
        }
    });
    let (state, cause, since) = venus.link.describe();
    let records = venus.cml.records();
    let cml_bytes: u64 = records
        .iter()
        .map(|r| match &r.op {
            CmlOp::Store { fid, .. } => {
                std::fs::metadata(venus.cache.container_path(venus.resolve(*fid))).map(|m| m.len()).unwrap_or(0)
            }
            _ => 0,
        })
        .sum();
    json!({
        "state": state,
        "cause": cause,
        "for_seconds": since.as_secs(),
        "forced_offline": venus.link.forced(),
        "server": venus.client.config().addr,
        "client": venus.client.id().to_string(),
        "cml_records": records.len(),
        "cml_bytes": cml_bytes,
        "conflicts": venus.conflicts.len(),
        "hoard": {
            "entries": venus.hoard.list().len(),
            "objects": hoarded,
            "bytes": hoard_bytes,
            "cached": hoard_cached,
            "current": hoard_current,
            "last_walk": venus.last_walk.lock().unwrap().clone(),
        },
        "cache_bytes": venus.cache.bytes(),
        "cache_limit": venus.cache.limit,
        "objects": objects,
        "cached_files": cached,
        "dirty_files": dirty,
        "open_files": venus.open_handles(),
        // Inode numbers the kernel may still use for objects renumbered.
        "aliases": venus.aliases_snapshot().len(),
        "fetches": venus.counters.fetches.load(Ordering::Relaxed),
        "stores": venus.counters.stores.load(Ordering::Relaxed),
        "local_hits": venus.counters.local_hits.load(Ordering::Relaxed),
    })
}

async fn connect(cache: &Path) -> anyhow::Result<(tokio::net::unix::OwnedReadHalf, tokio::net::unix::OwnedWriteHalf)> {
    let path = socket_path(cache);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "venus does not seem to be running on {}: cannot connect to {}: {e}",
            cache.display(),
            path.display()
        )
    })?;
    Ok(stream.into_split())
}

/// Sends a request whose reply comes as several lines; `line` sees each,
/// and the last (with "summary" or "error") is returned.
pub async fn request_stream(cache: &Path, req: Value, line: &mut dyn FnMut(&Value)) -> anyhow::Result<Value> {
    let (rd, mut wr) = connect(cache).await?;
    wr.write_all(format!("{req}\n").as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    while let Some(l) = lines.next_line().await? {
        let v: Value = serde_json::from_str(&l).map_err(|e| anyhow::anyhow!("bad reply from venus: {e}"))?;
        if let Some(err) = v["error"].as_str() {
            anyhow::bail!("{err}");
        }
        if v.get("progress").is_some() {
            line(&v);
            continue;
        }
        return Ok(v);
    }
    anyhow::bail!("venus closed the connection early")
}

/// Sends one request to the venus running on `cache`.
pub async fn request(cache: &Path, req: Value) -> anyhow::Result<Value> {
    let (rd, mut wr) = connect(cache).await?;
    wr.write_all(format!("{req}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let v: Value = serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("bad reply from venus: {e}"))?;
    if let Some(err) = v["error"].as_str() {
        anyhow::bail!("{err}");
    }
    Ok(v)
}
