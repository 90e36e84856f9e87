//! The control socket: how the `venus` CLI talks to a running mount.
//!
//! One JSON request per line on `CACHE/venus.sock`, one JSON reply per line.

use crate::fs::Venus;
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
        other => json!({ "error": format!("unknown command {other:?}") }),
    }
}

async fn status(venus: &Venus) -> Value {
    let all = venus.cache.all();
    let dirty = all.iter().filter(|(_, n)| n.dirty).count();
    let cached = all.iter().filter(|(_, n)| n.cached).count();
    let state = if venus.client.is_connected().await { "connected" } else { "disconnected" };
    json!({
        "state": state,
        "server": venus.client.config().addr,
        "client": venus.client.id().to_string(),
        "cml_records": 0,
        "conflicts": std::fs::read_dir(venus.cache.dir.join("conflicts")).map(|d| d.count()).unwrap_or(0),
        "cache_bytes": venus.cache.bytes(),
        "cache_limit": venus.cache.limit,
        "objects": all.len(),
        "cached_files": cached,
        "dirty_files": dirty,
        "open_files": venus.open_handles(),
        "fetches": venus.counters.fetches.load(Ordering::Relaxed),
        "stores": venus.counters.stores.load(Ordering::Relaxed),
        "local_hits": venus.counters.local_hits.load(Ordering::Relaxed),
    })
}

/// Sends one request to the venus running on `cache`.
pub async fn request(cache: &Path, req: Value) -> anyhow::Result<Value> {
    let path = socket_path(cache);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "venus does not seem to be running on {}: cannot connect to {}: {e}",
            cache.display(),
            path.display()
        )
    })?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(format!("{req}\n").as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let v: Value = serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("bad reply from venus: {e}"))?;
    if let Some(err) = v["error"].as_str() {
        anyhow::bail!("{err}");
    }
    Ok(v)
}
