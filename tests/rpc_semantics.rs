//! The RPC layer's failure semantics, against the real afsd: at-most-once
//! execution under lost replies and server crashes, authentication and
//! version refusal, and multiplexing on one connection.

use crate::support::proxy::Proxy;
use crate::support::{Afsd, TestDir};
use common::auth::{random_bytes, Key};
use common::frame::{self, Hello, Message, MAGIC, PROTOCOL_VERSION};
use common::proto::*;
use common::rpc::{fetch_to_file, Client, ClientConfig, RpcError, Sink};
use common::{Fid, FsError, Timestamp};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use uuid::Uuid;

fn create(name: &str) -> CreateReq {
    CreateReq { dir: Fid::ROOT, name: name.into(), mode: 0o644, exclusive: true, content: None }
}

/// A fault-injecting proxy in front of `afsd`, and a client config that
/// goes through it and notices a missing reply after 300 ms.
async fn through_proxy(afsd: &Afsd) -> (Proxy, ClientConfig) {
    let proxy = Proxy::start(afsd.addr.clone()).await;
    let mut cfg = afsd.client_config();
    cfg.addr = proxy.addr.to_string();
    cfg.attempt_timeout = Duration::from_millis(300);
    (proxy, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_replies_are_retried_and_mutations_run_once() {
    let dir = TestDir::new("dropped-reply");
    let afsd = Afsd::start(dir.path());
    let (proxy, cfg) = through_proxy(&afsd).await;
    let client = Client::connect(cfg).await.unwrap();

    // Exclusive create: a second execution would answer "exists".
    proxy.drop_next_replies(1);
    let made = client.create(create("once")).await.expect("retried create succeeds");
    assert_eq!(proxy.dropped.load(std::sync::atomic::Ordering::SeqCst), 1, "the first reply was dropped");
    assert!(afsd.rpcs("create") >= 2, "the create was retransmitted");
    assert!(afsd.export.join("once").is_file());

    // Rename: a second execution would fail with "not found".
    proxy.drop_next_replies(2);
    let r = client
        .rename(RenameReq {
            from_dir: Fid::ROOT,
            from_name: "once".into(),
            to_dir: Fid::ROOT,
            to_name: "renamed".into(),
            no_replace: false,
            replaced_base: None,
        })
        .await
        .expect("retried rename succeeds");
    assert_eq!(r.moved.fid, made.attr.fid, "fids survive renames");
    assert!(afsd.rpcs("rename") >= 3);
    assert!(!afsd.export.join("once").exists() && afsd.export.join("renamed").is_file());

    // And the connection carries on with fresh requests.
    let e = client.create(create("renamed")).await.unwrap_err();
    assert!(matches!(e, RpcError::Fs(FsError::Exists)), "{e:?}");
}

/// A server that is slow but alive (its replies come late, its pongs on
/// time) is waited for past the call timeout: a long request must not make
/// a client think the server is gone. One that stops answering altogether
/// still fails the call within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_server_is_waited_for_and_a_silent_one_is_not() {
    let dir = TestDir::new("slow-server");
    let afsd = Afsd::start(dir.path());
    let (proxy, mut cfg) = through_proxy(&afsd).await;
    cfg.call_timeout = Duration::from_secs(1);
    cfg.connect_timeout = Duration::from_millis(500);
    let client = Client::connect(cfg).await.unwrap();

    // Every reply (the retransmissions' too) is held back 2.5 s: more than
    // twice the call timeout.
    proxy.delay_next_replies(1000, Duration::from_millis(2500));
    let started = Instant::now();
    let made = client.create(create("slow")).await.expect("a slow server's reply is waited for");
    let took = started.elapsed();
    proxy.delay_next_replies(0, Duration::ZERO);
    assert!(took >= Duration::from_millis(2400), "the reply really was late: {took:?}");
    assert!(afsd.rpcs("create") >= 2, "the create was retransmitted while waiting");
    assert!(afsd.export.join("slow").is_file());
    let again = client.getattr(GetAttrReq { fid: made.attr.fid }).await.unwrap();
    assert_eq!(again.attr.version, made.attr.version, "the create ran once");

    // No reply and no pong on a connection that stays up: the server is
    // gone, whatever the busy limit.
    proxy.silence(true);
    let started = Instant::now();
    let e = client.getattr(GetAttrReq { fid: Fid::ROOT }).await.unwrap_err();
    assert!(e.is_transport(), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a silent server fails the call quickly: {:?}",
        started.elapsed()
    );
}

/// afsd dies after executing a mutation and before replying (a failpoint
/// aborts it there); the client's retransmission to the restarted server gets
/// the recorded reply instead of a second execution. `crash-in-commit` dies
/// half-way through the commit's database writes: the restart finishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_crash_before_reply_does_not_run_a_mutation_twice() {
    for failpoint in ["crash-before-reply", "crash-after-commit", "crash-in-commit"] {
        let dir = TestDir::new("crash-before-reply");
        let mut afsd = Afsd::start_with(dir.path(), &[("AFSD_FAILPOINT", &format!("{failpoint}:create"))]);
        let client = afsd.client().await;
        let c = client.clone();
        let call = tokio::spawn(async move { c.create(create("lockfile")).await });
        assert!(afsd.wait_exit(Duration::from_secs(10)), "{failpoint}: afsd should abort at the failpoint");
        afsd.set_env(&[]);
        afsd.restart();
        let reply = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap();
        let made = reply.unwrap_or_else(|e| panic!("{failpoint}: the retried create must succeed, got {e}"));
        assert!(afsd.export.join("lockfile").is_file(), "{failpoint}: the file exists after recovery");
        let again = client.create(create("lockfile")).await.unwrap_err();
        assert!(matches!(again, RpcError::Fs(FsError::Exists)), "{failpoint}: {again:?}");
        let found = client.lookup(LookupReq { dir: Fid::ROOT, name: "lockfile".into() }).await.unwrap();
        assert_eq!(found.attr.fid, made.attr.fid, "{failpoint}: one object, one fid");
    }
}

/// sled can deadlock for good; afsd's watchdog then restarts it in place
/// (the `stall-db` failpoint makes the watchdog see a stuck write). The
/// process keeps its pid and its address, a connected client carries on
/// through a reconnection, and nothing done before is lost or done twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_database_restarts_afsd_in_place() {
    let dir = TestDir::new("stuck-db");
    let afsd = Afsd::start_with(dir.path(), &[("AFSD_FAILPOINT", "stall-db")]);
    let client = afsd.client().await;
    let made = client.create(create("before")).await.unwrap();
    let pid = afsd.pid();
    let deadline = Instant::now() + Duration::from_secs(20);
    while afsd.stats()["restarts"].as_u64() != Some(1) {
        assert!(Instant::now() < deadline, "afsd did not restart within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process is still there");
    assert!(!status.contains("State:\tZ"), "afsd exited instead of restarting");
    let addr = std::fs::read_to_string(afsd.state.join("afsd.addr")).unwrap();
    assert_eq!(addr.trim(), afsd.addr, "the restarted image listens on the same address");
    let after = client.create(create("after")).await.expect("the client carries on after the restart");
    assert_ne!(after.attr.fid, made.attr.fid);
    let found = client.lookup(LookupReq { dir: Fid::ROOT, name: "before".into() }).await.unwrap();
    assert_eq!(found.attr.fid, made.attr.fid, "what was made before the restart is kept");
    let again = client.create(create("before")).await.unwrap_err();
    assert!(matches!(again, RpcError::Fs(FsError::Exists)), "{again:?}");
    // The restarted image does not stall again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(afsd.stats()["restarts"].as_u64(), Some(1));
    assert!(afsd.export.join("before").is_file() && afsd.export.join("after").is_file());
}

/// A call that afsd has executed but not yet answered when it restarts in
/// place (its reply held back by the proxy) is resent under the same
/// transaction id to the restarted image, which answers it from the reply
/// cache: the create runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_in_flight_across_a_restart_in_place_runs_once() {
    let dir = TestDir::new("stuck-db-inflight");
    let afsd = Afsd::start_with(dir.path(), &[("AFSD_FAILPOINT", "stall-db")]);
    let (proxy, cfg) = through_proxy(&afsd).await;
    let client = Client::connect(cfg).await.unwrap();
    proxy.delay_next_replies(1000, Duration::from_secs(4));
    let started = Instant::now();
    let made = client.create(create("inflight")).await.expect("the create survives the restart");
    proxy.delay_next_replies(0, Duration::ZERO);
    assert_eq!(afsd.stats()["restarts"].as_u64(), Some(1), "afsd restarted while the create was in flight");
    assert!(started.elapsed() >= Duration::from_secs(4), "the first reply was held back past the restart");
    assert!(afsd.rpcs("create") >= 1, "the resend reached the restarted image");
    let again = client.create(create("inflight")).await.unwrap_err();
    assert!(matches!(again, RpcError::Fs(FsError::Exists)), "{again:?}");
    let found = client.lookup(LookupReq { dir: Fid::ROOT, name: "inflight".into() }).await.unwrap();
    assert_eq!(found.attr.fid, made.attr.fid, "one object, one fid");
    assert_eq!(found.attr.version, made.attr.version, "created once");
}

/// A store into an empty file is written in place from the committed
/// intent. afsd dies after the commit (before writing a byte), or after
/// writing (before replying): either way the retransmitted store gets the
/// recorded reply, the export holds every byte, and the object's version is
/// the one that reply named (no edit seen behind the server's back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_crash_during_a_store_into_an_empty_file_keeps_every_byte() {
    for failpoint in ["crash-after-commit:store", "crash-before-reply:store"] {
        let dir = TestDir::new("crash-fill");
        let mut afsd = Afsd::start_with(dir.path(), &[("AFSD_FAILPOINT", failpoint)]);
        let client = afsd.client().await;
        let made = client.create(create("notes")).await.unwrap();
        let fid = made.attr.fid;
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let (c, d, base) = (client.clone(), data.clone(), made.attr.version.clone());
        let call = tokio::spawn(async move {
            let req = StoreReq {
                fid,
                base,
                size: d.len() as u64,
                data: StoreData::Inline(d.into()),
                mtime: None,
                mode: Some(0o640),
            };
            c.store(req).await
        });
        assert!(afsd.wait_exit(Duration::from_secs(10)), "{failpoint}: afsd should abort at the failpoint");
        afsd.set_env(&[]);
        afsd.restart();
        let reply = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap();
        let stored = reply.unwrap_or_else(|e| panic!("{failpoint}: the retried store must succeed, got {e}"));
        assert_eq!(std::fs::read(afsd.export.join("notes")).unwrap(), data, "{failpoint}: every byte is there");
        assert_eq!(stored.attr.size, data.len() as u64, "{failpoint}");
        let now = client.getattr(GetAttrReq { fid }).await.unwrap();
        assert_eq!(now.attr.version, stored.attr.version, "{failpoint}: no spurious new version");
        assert_eq!(now.attr.mode & 0o777, 0o640, "{failpoint}: the mode was applied");
    }
}

/// A create that carries content is one commit: killed right after it (or
/// before its reply), afsd redoes the file with every byte at the restart,
/// the retried create gets the recorded reply, and an unsettled one (the
/// settler held) is made again, bytes and all, from its intent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_crash_during_a_create_with_content_keeps_every_byte() {
    for failpoint in ["crash-after-commit:create", "crash-before-reply:create", "hold-settle"] {
        let dir = TestDir::new("crash-create-content");
        let mut afsd = Afsd::start_with(dir.path(), &[("AFSD_FAILPOINT", failpoint)]);
        let client = afsd.client().await;
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let mtime = Timestamp { secs: 1_700_000_000, nanos: 5 };
        let mut req = create("made");
        req.exclusive = false;
        req.content = Some(NewContent { data: StoreData::Inline(data.clone().into()), size: data.len() as u64, mtime });
        let c = client.clone();
        let mut call = Some(tokio::spawn(async move { c.create(req).await }));
        if failpoint == "hold-settle" {
            call.take().unwrap().await.unwrap().unwrap();
            afsd.kill();
            // The settler never synced it: as if a power cut lost the file.
            let _ = std::fs::remove_file(afsd.export.join("made"));
        } else {
            assert!(afsd.wait_exit(Duration::from_secs(10)), "{failpoint}: afsd should abort at the failpoint");
        }
        afsd.set_env(&[]);
        afsd.restart();
        if let Some(call) = call {
            let reply = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap();
            let made = reply.unwrap_or_else(|e| panic!("{failpoint}: the retried create must succeed, got {e}"));
            assert_eq!((made.attr.size, made.attr.mtime), (data.len() as u64, mtime), "{failpoint}");
        }
        assert_eq!(std::fs::read(afsd.export.join("made")).unwrap(), data, "{failpoint}: every byte is there");
        let client = afsd.client().await;
        let found = client.lookup(LookupReq { dir: Fid::ROOT, name: "made".into() }).await.unwrap();
        assert_eq!((found.attr.size, found.attr.mtime), (data.len() as u64, mtime), "{failpoint}");
        let names: Vec<_> = std::fs::read_dir(&afsd.export).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["made"], "{failpoint}: made once");
    }
}

/// A create with content never opens an existing file, refuses content
/// that does not match its size, and takes large content staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_with_content_never_writes_over_an_existing_file() {
    let dir = TestDir::new("create-content-exists");
    let afsd = Afsd::start(dir.path());
    let client = afsd.client().await;
    client.create(create("taken")).await.unwrap();
    let mut req = create("taken");
    req.exclusive = false;
    req.content =
        Some(NewContent { data: StoreData::Inline(b"mine".to_vec().into()), size: 4, mtime: Timestamp::now() });
    let err = client.create(req).await.unwrap_err();
    assert!(matches!(err, RpcError::Fs(FsError::Exists)), "{err:?}");
    assert_eq!(std::fs::read(afsd.export.join("taken")).unwrap(), b"");
    let mut short = create("short");
    short.content =
        Some(NewContent { data: StoreData::Inline(b"abc".to_vec().into()), size: 4, mtime: Timestamp::now() });
    let err = client.create(short).await.unwrap_err();
    assert!(matches!(err, RpcError::Fs(FsError::Invalid(_))), "{err:?}");
    assert!(!afsd.export.join("short").exists());
    // Larger content is staged first and renamed into place, in one commit.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let stage = client.stage_open(StageOpenReq {}).await.unwrap().handle;
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        let w = StageWriteReq { handle: stage, offset: (i << 20) as u64, data: piece.to_vec().into() };
        client.stage_write(w).await.unwrap();
    }
    let mut big = create("big");
    big.content = Some(NewContent { data: StoreData::Staged(stage), size: data.len() as u64, mtime: Timestamp::now() });
    let made = client.create(big).await.unwrap();
    assert_eq!(made.attr.size, data.len() as u64);
    assert_eq!(std::fs::read(afsd.export.join("big")).unwrap(), data);
    let names: Vec<_> = std::fs::read_dir(&afsd.export).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "no staging file left in the export: {names:?}");
}

/// Creates and fills keep their intents until the settler has synced the
/// export. afsd is killed before it ran (a failpoint holds it), after the
/// file was renamed and a new file took its old name; the export then loses
/// the first file, as a power cut could. The restart redoes the create and
/// the fill where the database says the object is now, with its bytes, and
/// leaves the new file at the old name alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsettled_creates_and_fills_are_redone_where_the_object_is_now() {
    let dir = TestDir::new("settle-redo");
    let mut afsd = Afsd::start_with(dir.path(), &[("AFSD_FAILPOINT", "hold-settle")]);
    let client = afsd.client().await;
    let first = client.create(create("a")).await.unwrap();
    let fid = first.attr.fid;
    let req = StoreReq {
        fid,
        base: first.attr.version.clone(),
        size: 5,
        data: StoreData::Inline(b"first".to_vec().into()),
        mtime: None,
        mode: None,
    };
    client.store(req).await.unwrap();
    let rename = RenameReq {
        from_dir: Fid::ROOT,
        from_name: "a".into(),
        to_dir: Fid::ROOT,
        to_name: "b".into(),
        no_replace: false,
        replaced_base: None,
    };
    client.rename(rename).await.unwrap();
    let second = client.create(create("a")).await.unwrap();
    afsd.kill();
    std::fs::remove_file(afsd.export.join("b")).unwrap();
    afsd.set_env(&[]);
    afsd.restart();
    assert_eq!(std::fs::read(afsd.export.join("b")).unwrap(), b"first", "redone at its current name");
    assert_eq!(std::fs::read(afsd.export.join("a")).unwrap(), b"", "the new file at the old name is untouched");
    let client = afsd.client().await;
    let b = client.lookup(LookupReq { dir: Fid::ROOT, name: "b".into() }).await.unwrap();
    assert_eq!((b.attr.fid, b.attr.size), (fid, 5));
    let a = client.lookup(LookupReq { dir: Fid::ROOT, name: "a".into() }).await.unwrap();
    assert_eq!(a.attr.fid, second.attr.fid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_key_wrong_version_and_no_key_are_refused() {
    let dir = TestDir::new("auth");
    let afsd = Afsd::start(dir.path());
    let good = afsd.client().await;

    let mut bad = afsd.client_config();
    bad.key = Key::random();
    let err = Client::connect(bad).await.err().expect("a wrong key is refused");
    match err {
        RpcError::Refused(m) => assert!(m.contains("authentication failed"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }

    // Another protocol version: the server names both versions.
    let mut s = TcpStream::connect(&afsd.addr).await.unwrap();
    let hello = Hello { magic: MAGIC, version: PROTOCOL_VERSION + 98, client: Uuid::new_v4(), nonce: vec![0; 32] };
    frame::write_message(&mut s, &hello).await.unwrap();
    match frame::read_message::<_, Message>(&mut s).await.unwrap() {
        Message::Refused { reason } => {
            assert!(reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 98)), "{reason}");
            assert!(reason.contains(&format!("speaks version {PROTOCOL_VERSION}")), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // No key: a client that cannot answer the challenge.
    let mut s = TcpStream::connect(&afsd.addr).await.unwrap();
    let hello =
        Hello { magic: MAGIC, version: PROTOCOL_VERSION, client: Uuid::new_v4(), nonce: random_bytes::<32>().to_vec() };
    frame::write_message(&mut s, &hello).await.unwrap();
    assert!(matches!(frame::read_message::<_, Message>(&mut s).await.unwrap(), Message::Challenge { .. }));
    frame::write_message(&mut s, &Message::Proof { mac: vec![] }).await.unwrap();
    assert!(matches!(frame::read_message::<_, Message>(&mut s).await.unwrap(), Message::Refused { .. }));

    // Skipping the handshake altogether is refused too.
    let mut s = TcpStream::connect(&afsd.addr).await.unwrap();
    frame::write_message(&mut s, &Message::Ping).await.unwrap();
    assert!(matches!(frame::read_message::<_, Message>(&mut s).await, Ok(Message::Refused { .. }) | Err(_)));

    // Garbage and an oversize frame header: refused, server unharmed.
    let mut s = TcpStream::connect(&afsd.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await.unwrap();
    let _ = frame::read_message::<_, Message>(&mut s).await;

    // Meanwhile the good client keeps working.
    good.getattr(GetAttrReq { fid: Fid::ROOT }).await.expect("good client still served");
    good.create(create("still-works")).await.unwrap();
}

/// 32 small requests in flight on one connection while a 256 MiB fetch
/// streams: the small ones are not queued behind the bulk data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_requests_overtake_a_large_transfer() {
    let dir = TestDir::new("multiplex");
    let afsd = Afsd::start(dir.path());
    let size = 256usize << 20;
    let mut data = vec![0u8; size];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(afsd.export.join("big"), &data).unwrap();
    let client = afsd.client().await;
    let big = client.lookup(LookupReq { dir: Fid::ROOT, name: "big".into() }).await.unwrap().attr.fid;
    for i in 0..32 {
        client.create(create(&format!("small{i}"))).await.unwrap();
    }

    let dest = Arc::new(tempfile_in(dir.path()));
    let (c, d) = (client.clone(), dest.clone());
    let start = Instant::now();
    let fetch = tokio::spawn(async move {
        let r = fetch_to_file(&c, big, d).await;
        (r, start.elapsed())
    });
    // Let the transfer get going, then fire 32 small requests at once, a few times.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut worst = Duration::ZERO;
    let mut rounds = 0;
    while !fetch.is_finished() && rounds < 20 {
        let t = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..32 {
            let c = client.clone();
            set.spawn(async move { c.lookup(LookupReq { dir: Fid::ROOT, name: format!("small{i}") }).await });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap().unwrap();
        }
        worst = worst.max(t.elapsed());
        rounds += 1;
    }
    let (r, total) = fetch.await.unwrap();
    r.unwrap();
    assert!(rounds >= 1, "the fetch ended before any small request could be measured ({total:?})");
    eprintln!(
        "256 MiB fetch took {total:?}; worst round of 32 small requests during it: {worst:?} over {rounds} rounds"
    );
    assert!(worst * 4 < total, "small requests took {worst:?} while the whole fetch took {total:?}");
    assert_eq!(std::fs::read(dest_path(dir.path())).unwrap(), data, "fetched content matches");
}

/// Chunks are sent from the server's file when the reply goes out. A file
/// cut short behind the server's back mid-fetch gives short chunks (which
/// `fetch_to_file` refuses), never bytes that are not in it, and the
/// connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_truncated_behind_the_server_mid_fetch_gives_short_chunks() {
    let dir = TestDir::new("truncated-fetch");
    let afsd = Afsd::start(dir.path());
    let data: Vec<u8> = (0..3usize << 20).map(|i| (i % 251) as u8).collect();
    let path = afsd.export.join("shrinks");
    std::fs::write(&path, &data).unwrap();
    let client = afsd.client().await;
    let fid = client.lookup(LookupReq { dir: Fid::ROOT, name: "shrinks".into() }).await.unwrap().attr.fid;
    let fetched = client.fetch(FetchReq { fid, inline_max: 1 << 20 }).await.unwrap();
    assert_eq!(fetched.data[..], data[..1 << 20]);
    let handle = fetched.handle.expect("more than one chunk");

    // An outside edit truncates the file in place to 1.5 MiB.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(3 << 19).unwrap();
    let len = 1 << 20;
    let second = client.read_chunk(ReadChunkReq { handle, offset: 1 << 20, len }).await.unwrap();
    let second = second.data.into_bytes().unwrap();
    assert_eq!(second[..], data[1 << 20..3 << 19], "the chunk holds what is left, and only that");
    let third = client.read_chunk(ReadChunkReq { handle, offset: 2 << 20, len }).await.unwrap();
    assert!(third.data.is_empty(), "past the end a chunk is empty");
    client.release(ReleaseReq { handle }).await.unwrap();

    // The same connection then fetches the file, rewritten, whole.
    std::fs::write(&path, &data).unwrap();
    let dest = Arc::new(tempfile_in(dir.path()));
    fetch_to_file(&client, fid, dest).await.unwrap();
    assert_eq!(std::fs::read(dest_path(dir.path())).unwrap(), data);
}

/// A fetch allocates the destination's blocks before its chunks land
/// (`fallocate`, keeping the size): the result holds exactly the file's
/// bytes and keeps no blocks past them (some slack for the file system's
/// own metadata), whether the destination was empty or held a longer file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetched_file_keeps_exactly_its_bytes_and_no_blocks_past_them() {
    use std::os::unix::fs::MetadataExt;
    let dir = TestDir::new("fetch-allocates");
    let afsd = Afsd::start(dir.path());
    // Not a whole number of chunks, nor of blocks.
    let data: Vec<u8> = (0..(5usize << 20) + 12_345).map(|i| (i % 241) as u8).collect();
    std::fs::write(afsd.export.join("odd"), &data).unwrap();
    let client = afsd.client().await;
    let fid = client.lookup(LookupReq { dir: Fid::ROOT, name: "odd".into() }).await.unwrap().attr.fid;
    for before in [0usize, 9 << 20] {
        let dest = Arc::new(tempfile_in(dir.path()));
        std::fs::write(dest_path(dir.path()), vec![7u8; before]).unwrap();
        let reply = fetch_to_file(&client, fid, dest).await.unwrap();
        assert_eq!(reply.attr.size, data.len() as u64);
        let got = std::fs::read(dest_path(dir.path())).unwrap();
        assert!(got == data, "the fetched bytes are the file's, with {before} bytes there before");
        let meta = std::fs::metadata(dest_path(dir.path())).unwrap();
        let needed = (data.len() as u64).div_ceil(4096) * 4096 + (64 << 10);
        assert!(meta.blocks() * 512 <= needed, "{} bytes allocated for {} bytes", meta.blocks() * 512, data.len());
    }
}

/// A chunk lands in its file straight from the socket. When the file
/// cannot take it, that call fails with the write's error, the rest of the
/// payload is taken off the stream, and the connection goes on in step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_that_cannot_be_written_fails_its_call_not_the_connection() {
    let dir = TestDir::new("landing-fails");
    let afsd = Afsd::start(dir.path());
    let data: Vec<u8> = (0..3usize << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(afsd.export.join("f"), &data).unwrap();
    let client = afsd.client().await;
    let fid = client.lookup(LookupReq { dir: Fid::ROOT, name: "f".into() }).await.unwrap().attr.fid;
    let handle = client.fetch(FetchReq { fid, inline_max: 0 }).await.unwrap().handle.unwrap();

    std::fs::write(dir.path().join("read-only"), b"").unwrap();
    let read_only = Arc::new(std::fs::File::open(dir.path().join("read-only")).unwrap());
    let len = 1 << 20;
    let bad = Sink { file: read_only, offset: 0 };
    let err = client.read_chunk_to(ReadChunkReq { handle, offset: 0, len }, bad).await.unwrap_err();
    assert!(matches!(err, RpcError::Fs(_)), "the write's error, not a transport one: {err:?}");

    let dest = Arc::new(tempfile_in(dir.path()));
    for offset in [1u64 << 20, 2 << 20, 0] {
        let sink = Sink { file: dest.clone(), offset };
        let n = client.read_chunk_to(ReadChunkReq { handle, offset, len }, sink).await.unwrap();
        assert_eq!(n, len as usize);
    }
    assert!(std::fs::read(dest_path(dir.path())).unwrap() == data, "the chunks landed where they belong");
    client.release(ReleaseReq { handle }).await.unwrap();
}

/// afsd answers a connection's chunk reads in the order they came: run in
/// parallel, their replies would leave out of order, and the kernel would
/// take the file's reads for random ones and stop reading ahead. On a
/// current-thread runtime the tasks here wake in the order their replies
/// arrive, and record it, provided all of them wait by then: afsd is
/// stopped (SIGSTOP) until every request is out, or the first replies
/// would wake their tasks between the others' first polls.
#[tokio::test(flavor = "current_thread")]
async fn chunk_reads_are_answered_in_the_order_they_were_asked() {
    let dir = TestDir::new("chunk-order");
    let afsd = Afsd::start(dir.path());
    let chunk = 64usize << 10;
    let data: Vec<u8> = (0..64 * chunk).map(|i| (i % 241) as u8).collect();
    std::fs::write(afsd.export.join("f"), &data).unwrap();
    let client = afsd.client().await;
    let fid = client.lookup(LookupReq { dir: Fid::ROOT, name: "f".into() }).await.unwrap().attr.fid;
    let handle = client.fetch(FetchReq { fid, inline_max: 0 }).await.unwrap().handle.unwrap();

    for round in 0..5 {
        let arrived = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut set = tokio::task::JoinSet::new();
        // SAFETY: signals to a child process of this test.
        assert_eq!(unsafe { libc::kill(afsd.pid(), libc::SIGSTOP) }, 0);
        for i in 0..64usize {
            let (c, arrived, data) = (client.clone(), arrived.clone(), data.clone());
            set.spawn(async move {
                let offset = (i * chunk) as u64;
                let got = c.read_chunk(ReadChunkReq { handle, offset, len: chunk as u32 }).await.unwrap();
                arrived.lock().unwrap().push(i);
                assert_eq!(got.data.into_bytes().unwrap()[..], data[i * chunk..(i + 1) * chunk]);
            });
        }
        // Every task sends its request at its first poll, which this
        // sleep lets happen.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(afsd.pid(), libc::SIGCONT) }, 0);
        while let Some(r) = set.join_next().await {
            r.unwrap();
        }
        let arrived = arrived.lock().unwrap().clone();
        assert_eq!(arrived, (0..64).collect::<Vec<_>>(), "round {round}: replies out of order");
    }
    client.release(ReleaseReq { handle }).await.unwrap();
}

fn dest_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("fetched")
}

fn tempfile_in(dir: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dest_path(dir)).unwrap()
}

/// Cumulative acks let the server drop recorded replies, and a duplicate
/// of an acknowledged request is not run again: it gets an error at once
/// (a client that lost track of it in a crash must not wait for a reply).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_replies_are_discarded() {
    let dir = TestDir::new("acks");
    let afsd = Afsd::start(dir.path());
    let client = afsd.client().await;
    for i in 0..50 {
        client.create(create(&format!("f{i}"))).await.unwrap();
    }
    // Each call acknowledges everything before it; one more call acks the last.
    client.getattr(GetAttrReq { fid: Fid::ROOT }).await.unwrap();
    let held = afsd.stats()["reply_cache"].as_u64().unwrap();
    assert!(held <= 1, "acknowledged replies are dropped from the durable cache, {held} left");
    let cfg: ClientConfig = client.config().clone();
    let replay = Client::connect(cfg).await.unwrap();
    // Seq 1 (the first create) was acknowledged, so the server no longer holds
    // its reply: resending it runs nothing (a run would fail with Exists)
    // and is refused at once.
    // (Left unanswered, the call would wait as long as the server answers
    // pings: minutes.)
    let r = tokio::time::timeout(Duration::from_secs(20), replay.call_with_seq(1, Request::Create(create("f0")))).await;
    match r {
        Ok(Err(RpcError::Fs(e))) => assert!(common::rpc::is_acknowledged_already(&e), "{e}"),
        other => panic!("an acknowledged duplicate is refused: {other:?}"),
    }
}
