//! Workload 7: server scale. Simulated clients (the RPC library, no FUSE)
//! fetch and store small files as fast as the server lets them; then the time
//! for one callback break to reach 64 holders.

use crate::config::{Config, Kind};
use crate::results::{Results, Show};
use anyhow::{bail, Context, Result};
use common::auth::Key;
use common::proto::{CreateReq, FetchReq, LookupReq, MkdirReq, Push, StoreData, StoreReq};
use common::rpc::{Client, ClientConfig, ClientEvent};
use common::{Fid, VersionVector};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use uuid::Uuid;

const FILES: usize = 64;
const HOLDERS: usize = 64;
/// Files created and stored per run of the single-client round trip.
const ROUND_TRIP_FILES: usize = 400;

async fn client(addr: &str, key: &Key) -> Result<Client> {
    let mut cfg = ClientConfig::new(addr, key.clone(), Uuid::new_v4());
    cfg.call_timeout = Duration::from_secs(60);
    Client::connect(cfg).await.context("connect a simulated client")
}

async fn lookup(c: &Client, dir: Fid, name: &str) -> Result<(Fid, VersionVector)> {
    let e = c.lookup(LookupReq { dir, name: name.to_string() }).await.with_context(|| format!("lookup {name}"))?;
    Ok((e.attr.fid, e.attr.version))
}

pub fn run(cfg: &Config, addr: &str, state: &Path, res: &mut Results) -> Result<()> {
    let key = Key::load(&state.join("afs.key")).context("load afs.key")?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let admin = client(addr, &key).await?;
        let (scale, _) = lookup(&admin, Fid::ROOT, "scale").await?;
        let mut readers = Vec::new();
        let mut writers = Vec::new();
        for i in 0..FILES {
            readers.push(lookup(&admin, scale, &format!("r{i:03}")).await?.0);
            writers.push(lookup(&admin, scale, &format!("w{i:03}")).await?);
        }
        let readers = Arc::new(readers);
        let max = cfg.scale_clients.iter().copied().max().unwrap_or(0).max(HOLDERS);
        let mut clients = Vec::new();
        for _ in 0..max {
            clients.push(client(addr, &key).await?);
        }

        // Throughput: client i alternates a fetch of a shared read-only file
        // and a store of its own file (its own, so stores never conflict).
        for &n in &cfg.scale_clients {
            let mut per_run = Vec::new();
            for _ in 0..cfg.runs {
                let ops = Arc::new(AtomicU64::new(0));
                let start = Instant::now();
                let deadline = start + Duration::from_secs_f64(cfg.scale_secs);
                let mut tasks = tokio::task::JoinSet::new();
                for (i, c) in clients.iter().take(n).enumerate() {
                    let (c, ops, readers) = (c.clone(), ops.clone(), readers.clone());
                    let (wfid, _) = writers[i % FILES].clone();
                    tasks.spawn(async move {
                        // Re-read the base: an earlier run may have stored it.
                        let mut base = c.getattr(common::proto::GetAttrReq { fid: wfid }).await?.attr.version;
                        let body = vec![i as u8; 4096];
                        let mut k = i;
                        while Instant::now() < deadline {
                            let f = c.fetch(FetchReq { fid: readers[k % FILES], inline_max: 64 << 10 }).await?;
                            if f.handle.is_some() {
                                bail!("small file fetched with a handle");
                            }
                            ops.fetch_add(1, Ordering::Relaxed);
                            let r = c
                                .store(StoreReq {
                                    fid: wfid,
                                    base: base.clone(),
                                    size: body.len() as u64,
                                    data: StoreData::Inline(body.clone().into()),
                                    mtime: None,
                                    mode: None,
                                })
                                .await?;
                            base = r.attr.version;
                            ops.fetch_add(1, Ordering::Relaxed);
                            k += 1;
                        }
                        Ok(())
                    });
                }
                while let Some(r) = tasks.join_next().await {
                    r.context("client task")??;
                }
                let secs = start.elapsed().as_secs_f64();
                per_run.push(ops.load(Ordering::Relaxed) as f64 / secs);
            }
            eprintln!(
                "bench:   scale {n} clients: {:.0} ops/s (median)",
                crate::results::median(&per_run).unwrap_or(0.0)
            );
            res.scale.push((n, per_run));
        }

        // Break latency: HOLDERS clients hold a promise on `hot`; another
        // client stores it; time until every holder has seen the break.
        let (hot, mut hot_base) = lookup(&admin, scale, "hot").await?;
        let holders: Vec<Client> = clients.iter().take(HOLDERS).cloned().collect();
        res.break_holders = holders.len();
        for _ in 0..cfg.runs {
            let mut waiters = tokio::task::JoinSet::new();
            for h in &holders {
                let mut events = h.events();
                h.fetch(FetchReq { fid: hot, inline_max: 64 << 10 }).await.context("holder fetch")?;
                waiters.spawn(async move {
                    while let Some(ev) = events.recv().await {
                        match ev {
                            ClientEvent::Push(Push::Break { fids, .. }) if fids.contains(&hot) => {
                                return Some(Instant::now())
                            }
                            ClientEvent::Push(Push::BreakAll) => return Some(Instant::now()),
                            _ => {}
                        }
                    }
                    None
                });
            }
            let start = Instant::now();
            let r = admin
                .store(StoreReq {
                    fid: hot,
                    base: hot_base.clone(),
                    size: 4096,
                    data: StoreData::Inline(vec![7u8; 4096].into()),
                    mtime: None,
                    mode: None,
                })
                .await
                .context("breaking store")?;
            let store_secs = start.elapsed().as_secs_f64();
            hot_base = r.attr.version;
            let mut last = start;
            let mut got = 0;
            let wait = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(w) = waiters.join_next().await {
                    if let Ok(Some(t)) = w {
                        last = last.max(t);
                        got += 1;
                    }
                }
            })
            .await;
            if wait.is_err() || got != holders.len() {
                bail!("only {got} of {} holders saw the callback break", holders.len());
            }
            res.break_all.push((last - start).as_secs_f64());
            res.break_store.push(store_secs);
        }
        eprintln!(
            "bench:   break to {} holders: {:.2} ms (median)",
            holders.len(),
            crate::results::median(&res.break_all).unwrap_or(0.0) * 1e3
        );
        round_trips(cfg, &admin, scale, res).await
    })
}

/// One client creating small files and storing each, one after the other
/// (what `cp` of a tree does), over the RPC library alone: the server's part
/// of a file copied through the mount, without FUSE or venus. Each file is
/// two durable commits.
async fn round_trips(cfg: &Config, c: &Client, scale: Fid, res: &mut Results) -> Result<()> {
    let dir = c.mkdir(MkdirReq { dir: scale, name: "round-trips".into(), mode: 0o755 }).await?.attr.fid;
    let label = "7c. afs, one client: create + store of a 4 KiB file over the RPC library (no FUSE, no venus)";
    let body: Vec<u8> = vec![5u8; 4096];
    for run in 0..cfg.runs {
        let start = Instant::now();
        for i in 0..ROUND_TRIP_FILES {
            let name = format!("f{run}-{i}");
            let e = c
                .create(CreateReq { dir, name, mode: 0o644, exclusive: true, content: None })
                .await
                .context("create")?;
            c.store(StoreReq {
                fid: e.attr.fid,
                base: e.attr.version,
                size: body.len() as u64,
                data: StoreData::Inline(body.clone().into()),
                mtime: None,
                mode: None,
            })
            .await
            .context("store")?;
        }
        let secs = start.elapsed().as_secs_f64();
        res.add((7, 2), label, Show::PerOp { n: ROUND_TRIP_FILES as f64 }, None, Kind::Afs, secs);
        eprintln!("bench:   create + store round trip: {:.0} µs per file", secs / ROUND_TRIP_FILES as f64 * 1e6);
    }
    Ok(())
}
