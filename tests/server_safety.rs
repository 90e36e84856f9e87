//! The server keeps data whole: under SIGKILL, under many clients, and
//! against requests that try to leave the export.

use crate::support::{Afsd, TestDir};
use common::frame::Message;
use common::proto::*;
use common::rpc::{Client, RpcError};
use common::{Fid, FsError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Content that says which writer and round made it, and shows tearing:
/// every line is the same.
fn content(writer: usize, round: u64, len_hint: usize) -> Vec<u8> {
    let line = format!("writer {writer:03} round {round:08}\n");
    let reps = 1 + (round as usize * 7919 + writer * 131) % len_hint;
    line.repeat(reps).into_bytes()
}

fn parse(data: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(data).ok()?;
    let first = text.lines().next()?;
    if text.lines().any(|l| l != first) || !text.ends_with('\n') {
        return None;
    }
    let mut w = first.split_whitespace();
    let (_, writer, _, round) = (w.next()?, w.next()?, w.next()?, w.next()?);
    Some((writer.parse().ok()?, round.parse().ok()?))
}

async fn create_file(c: &Client, name: &str) -> EntryReply {
    let r = c
        .create(CreateReq { dir: Fid::ROOT, name: name.into(), mode: 0o644, exclusive: false, content: None })
        .await
        .unwrap();
    EntryReply { attr: r.attr, promise: r.promise }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_stores_loses_no_acknowledged_store() {
    let dir = TestDir::new("sigkill-stores");
    let mut afsd = Afsd::start(dir.path());
    let files = 4;
    let mut fids = Vec::new();
    {
        let c = afsd.client().await;
        for i in 0..files {
            fids.push(create_file(&c, &format!("f{i}")).await.attr.fid);
        }
    }
    // The last acknowledged round per file, and the round in flight.
    let acked: Arc<Mutex<HashMap<usize, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    for kill_round in 0..4 {
        let client = afsd.client().await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for (i, &fid) in fids.iter().enumerate() {
            let (c, acked, stop) = (client.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut round = acked.lock().unwrap().get(&i).copied().unwrap_or(0) + 1;
                let mut base = c.getattr(GetAttrReq { fid }).await.unwrap().attr.version;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let data = content(i, round, 3000);
                    let r = c
                        .store(StoreReq {
                            fid,
                            base: base.clone(),
                            size: data.len() as u64,
                            data: StoreData::Inline(data.into()),
                            mtime: None,
                            mode: None,
                        })
                        .await;
                    match r {
                        Ok(reply) => {
                            acked.lock().unwrap().insert(i, round);
                            base = reply.attr.version;
                            round += 1;
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300 + 170 * kill_round)).await;
        afsd.kill();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let snapshot = acked.lock().unwrap().clone();
        client.disconnect().await;
        for w in writers {
            w.abort();
        }
        afsd.restart();
        for (i, _) in fids.iter().enumerate() {
            let data = std::fs::read(afsd.export.join(format!("f{i}"))).unwrap();
            if data.is_empty() {
                assert!(!snapshot.contains_key(&i), "f{i} empty but round {:?} was acknowledged", snapshot.get(&i));
                continue;
            }
            let (w, round) = parse(&data).unwrap_or_else(|| panic!("f{i} is torn after kill {kill_round}"));
            assert_eq!(w, i);
            let min = snapshot.get(&i).copied().unwrap_or(0);
            // The acknowledged round or the one in flight at the kill.
            assert!(round == min || round == min + 1, "f{i}: round {round} on disk, {min} acknowledged");
            acked.lock().unwrap().insert(i, round);
        }
        let stray: Vec<_> = std::fs::read_dir(&afsd.export)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('f'))
            .collect();
        assert!(stray.is_empty(), "temporary files left in the export: {stray:?}");
        let staged = std::fs::read_dir(afsd.state.join("staging")).unwrap().count();
        assert_eq!(staged, 0, "the staging area is emptied on restart");
    }
    let total: u64 = acked.lock().unwrap().values().sum();
    assert!(total >= 8, "the writers made progress between kills ({total} stores)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_never_read_a_torn_version() {
    let dir = TestDir::new("64-clients");
    let afsd = Afsd::start(dir.path());
    let files = 8;
    let setup = afsd.client().await;
    let mut fids = Vec::new();
    for i in 0..files {
        fids.push(create_file(&setup, &format!("shared{i}")).await.attr.fid);
    }
    let fids = Arc::new(fids);
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for w in 0..64usize {
        let (cfg, fids) = (afsd.client_config(), fids.clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::connect(cfg).await.unwrap();
            let (mut stores, mut reads, mut conflicts) = (0u64, 0u64, 0u64);
            let mut round = 0u64;
            while Instant::now() < deadline {
                let fid = fids[(w + round as usize) % fids.len()];
                let got = c.fetch(FetchReq { fid, inline_max: 1 << 20 }).await.unwrap();
                assert!(got.handle.is_none());
                if !got.data.is_empty() {
                    assert!(parse(&got.data).is_some(), "client {w} read a torn version of {fid}");
                }
                assert_eq!(got.data.len() as u64, got.attr.size);
                reads += 1;
                if w % 2 == 0 {
                    let data = content(w, round, 200);
                    let r = c
                        .store(StoreReq {
                            fid,
                            base: got.attr.version,
                            size: data.len() as u64,
                            data: StoreData::Inline(data.into()),
                            mtime: None,
                            mode: None,
                        })
                        .await;
                    match r {
                        Ok(_) => stores += 1,
                        Err(RpcError::Fs(FsError::Conflict(_))) => conflicts += 1,
                        Err(e) => panic!("client {w}: store failed: {e}"),
                    }
                }
                round += 1;
            }
            (stores, reads, conflicts)
        }));
    }
    let (mut stores, mut reads, mut conflicts) = (0, 0, 0);
    for t in tasks {
        let (s, r, c) = t.await.unwrap();
        stores += s;
        reads += r;
        conflicts += c;
    }
    eprintln!("64 clients: {reads} fetches, {stores} stores, {conflicts} conflicts refused");
    assert!(stores > 0 && reads > 64);
    for i in 0..files {
        let data = std::fs::read(afsd.export.join(format!("shared{i}"))).unwrap();
        assert!(data.is_empty() || parse(&data).is_some(), "shared{i} torn on disk");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_cannot_reach_outside_the_export() {
    let dir = TestDir::new("escape");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), "secret").unwrap();
    std::fs::create_dir_all(dir.path().join("export")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.path().join("export/escape")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", dir.path().join("export/secret-link")).unwrap();
    let afsd = Afsd::start(dir.path());
    let c = afsd.client().await;

    for bad in ["..", ".", "a/b", "/etc", "/", "", "x\0y"] {
        let e = c.lookup(LookupReq { dir: Fid::ROOT, name: bad.into() }).await.unwrap_err();
        assert!(matches!(e, RpcError::Fs(FsError::InvalidName(_))), "lookup {bad:?}: {e:?}");
        let e = c
            .create(CreateReq { dir: Fid::ROOT, name: bad.into(), mode: 0o644, exclusive: true, content: None })
            .await
            .unwrap_err();
        assert!(matches!(e, RpcError::Fs(FsError::InvalidName(_))), "create {bad:?}: {e:?}");
        let e = c
            .rename(RenameReq {
                from_dir: Fid::ROOT,
                from_name: "escape".into(),
                to_dir: Fid::ROOT,
                to_name: bad.into(),
                no_replace: false,
                replaced_base: None,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, RpcError::Fs(FsError::InvalidName(_))), "rename to {bad:?}: {e:?}");
    }

    // A symlink to a directory outside is a symlink, not a way through.
    let esc = c.lookup(LookupReq { dir: Fid::ROOT, name: "escape".into() }).await.unwrap();
    assert_eq!(esc.attr.kind, common::FileKind::Symlink);
    for r in [
        c.lookup(LookupReq { dir: esc.attr.fid, name: "secret".into() }).await.map(|_| ()),
        c.create(CreateReq { dir: esc.attr.fid, name: "planted".into(), mode: 0o644, exclusive: true, content: None })
            .await
            .map(|_| ()),
        c.readdir(ReadDirReq { dir: esc.attr.fid }).await.map(|_| ()),
    ] {
        assert!(r.is_err(), "operating through a symlink must fail");
    }
    // Fetching a symlink gives its target text, never the file it points to.
    let link = c.lookup(LookupReq { dir: Fid::ROOT, name: "secret-link".into() }).await.unwrap();
    let got = c.fetch(FetchReq { fid: link.attr.fid, inline_max: 1 << 20 }).await.unwrap();
    assert_eq!(&got.data[..], b"../outside/secret");
    // A store into the symlink is refused.
    let e = c
        .store(StoreReq {
            fid: link.attr.fid,
            base: link.attr.version,
            size: 3,
            data: StoreData::Inline(b"pwn".to_vec().into()),
            mtime: None,
            mode: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(e, RpcError::Fs(_)), "{e:?}");
    // Unknown fids are stale, not a crash.
    let e = c.getattr(GetAttrReq { fid: Fid(987654321) }).await.unwrap_err();
    assert!(matches!(e, RpcError::Fs(FsError::Stale)), "{e:?}");

    assert_eq!(std::fs::read_to_string(outside.join("secret")).unwrap(), "secret");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1, "nothing was created outside the export");
}

/// Hostile but authenticated input: absurd timestamps, an ack past the
/// request, and a FIFO planted in the export. The server refuses or skips
/// each and keeps serving everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_does_not_break_the_server() {
    use common::Timestamp;
    let dir = TestDir::new("hostile");
    let afsd = Afsd::start(dir.path());
    let c = afsd.client().await;
    let f = create_file(&c, "victim").await.attr;
    let e = c
        .setattr(SetAttrReq {
            fid: f.fid,
            set: common::SetAttr {
                mtime: Some(Timestamp { secs: i64::MAX, nanos: 1_500_000_000 }),
                ..Default::default()
            },
            base: None,
        })
        .await
        .unwrap_err();
    assert!(matches!(e, RpcError::Fs(FsError::Invalid(_))), "{e:?}");

    // An ack claiming replies the client cannot have yet.
    let mut raw = raw_session(&afsd).await;
    let xid = Xid { client: raw.1, seq: 5 };
    let call = Message::Call { xid, ack: u64::MAX, body: Request::StatFs(StatFsReq {}) };
    let out = common::frame::encode_message(call).unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw.0, out.head()).await.unwrap();
    let reply = common::frame::read_message_frame(&mut raw.0).await.unwrap().unwrap();
    assert!(matches!(reply, Message::Return { seq: 5, result: Ok(_) }), "{reply:?}");

    // A FIFO in the export: skipped in listings, refused, never blocking.
    let fifo = std::ffi::CString::new(afsd.export.join("pipe").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let listing = c.readdir(ReadDirReq { dir: Fid::ROOT }).await.unwrap();
    assert!(listing.entries.iter().all(|e| e.name != "pipe"));
    assert!(listing.entries.iter().any(|e| e.name == "victim"));
    assert!(c.lookup(LookupReq { dir: Fid::ROOT, name: "pipe".into() }).await.is_err());
    // Swap the victim for a FIFO behind the server's back, then fetch it.
    std::fs::remove_file(afsd.export.join("victim")).unwrap();
    let victim = std::ffi::CString::new(afsd.export.join("victim").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(victim.as_ptr(), 0o644) }, 0);
    let r = tokio::time::timeout(Duration::from_secs(5), c.fetch(FetchReq { fid: f.fid, inline_max: 1 << 20 })).await;
    assert!(matches!(r, Ok(Err(_))), "a FIFO is refused at once: {r:?}");

    let other = afsd.client().await;
    other.statfs(StatFsReq {}).await.expect("the server still serves everyone");
    c.getattr(GetAttrReq { fid: Fid::ROOT }).await.unwrap();
}

/// A handshaken raw connection (to send frames the library never would).
async fn raw_session(afsd: &Afsd) -> (tokio::net::TcpStream, uuid::Uuid) {
    use common::frame::{Hello, MAGIC, PROTOCOL_VERSION};
    let key = afsd.key();
    let client = uuid::Uuid::new_v4();
    let mut s = tokio::net::TcpStream::connect(&afsd.addr).await.unwrap();
    let nonce = common::auth::random_bytes::<32>().to_vec();
    common::frame::write_message(
        &mut s,
        &Hello { magic: MAGIC, version: PROTOCOL_VERSION, client, nonce: nonce.clone() },
    )
    .await
    .unwrap();
    let Message::Challenge { nonce: server_nonce } = common::frame::read_message(&mut s).await.unwrap() else {
        panic!("no challenge")
    };
    let mac = key.client_proof(client, &nonce, &server_nonce);
    common::frame::write_message(&mut s, &Message::Proof { mac }).await.unwrap();
    let welcome: Message = common::frame::read_message(&mut s).await.unwrap();
    assert!(matches!(welcome, Message::Welcome { .. }));
    (s, client)
}

/// Stores into a file while another client keeps renaming its ancestor
/// directory and a third keeps asking for its attributes: every store lands
/// in that file, wherever it now lives, and nothing the server itself did is
/// taken for an outside edit (which would bump the version under the writer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stores_race_renames_of_an_ancestor() {
    let dir = TestDir::new("rename-race");
    let afsd = Afsd::start(dir.path());
    let (a, b, c) = (afsd.client().await, afsd.client().await, afsd.client().await);
    let d1 = a.mkdir(MkdirReq { dir: Fid::ROOT, name: "d1".into(), mode: 0o755 }).await.unwrap().attr.fid;
    let sub = a.mkdir(MkdirReq { dir: d1, name: "sub".into(), mode: 0o755 }).await.unwrap().attr.fid;
    let f = a
        .create(CreateReq { dir: sub, name: "f".into(), mode: 0o644, exclusive: true, content: None })
        .await
        .unwrap()
        .attr;
    let writer = tokio::spawn(async move {
        let mut base = f.version;
        for i in 0..150u32 {
            let data = format!("round {i}\n").into_bytes();
            let r = a
                .store(StoreReq {
                    fid: f.fid,
                    base,
                    size: data.len() as u64,
                    data: StoreData::Inline(data.into()),
                    mtime: None,
                    mode: None,
                })
                .await
                .unwrap_or_else(|e| panic!("store {i} failed while its directory moved: {e}"));
            base = r.attr.version;
        }
    });
    let renamer = tokio::spawn(async move {
        for i in 0..60 {
            let (from, to) = if i % 2 == 0 { ("d1", "d2") } else { ("d2", "d1") };
            b.rename(RenameReq {
                from_dir: Fid::ROOT,
                from_name: from.into(),
                to_dir: Fid::ROOT,
                to_name: to.into(),
                no_replace: true,
                replaced_base: None,
            })
            .await
            .unwrap();
        }
    });
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = tokio::spawn({
        let done = done.clone();
        async move {
            // Bounded: the writer finishes long before this many rounds.
            for _ in 0..100_000 {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let _ = c.getattr(GetAttrReq { fid: f.fid }).await;
            }
        }
    });
    writer.await.unwrap();
    renamer.await.unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.await.unwrap();
    // 60 renames end where they started.
    assert_eq!(std::fs::read_to_string(afsd.export.join("d1/sub/f")).unwrap(), "round 149\n");
    let mut all = Vec::new();
    let mut stack = vec![afsd.export.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            all.push(p.strip_prefix(&afsd.export).unwrap().display().to_string());
        }
    }
    all.sort();
    assert_eq!(all, vec!["d1", "d1/sub", "d1/sub/f"], "nothing landed anywhere else");
}
