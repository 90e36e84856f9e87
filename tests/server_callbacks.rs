//! Callback promises and breaks, between clients of the real afsd.

use crate::support::{Afsd, TestDir};
use common::proto::*;
use common::rpc::{Client, ClientEvent};
use common::{Fid, FsError, VersionVector};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

async fn lookup(c: &Client, name: &str) -> EntryReply {
    c.lookup(LookupReq { dir: Fid::ROOT, name: name.into() }).await.unwrap()
}

async fn store(c: &Client, fid: Fid, base: VersionVector, data: &[u8]) -> Result<EntryReply, common::rpc::RpcError> {
    c.store(StoreReq {
        fid,
        base,
        size: data.len() as u64,
        data: StoreData::Inline(data.to_vec().into()),
        mtime: None,
        mode: None,
    })
    .await
}

/// Waits for a break naming `fid` (or a BreakAll); returns how long it took.
async fn expect_break(events: &mut UnboundedReceiver<ClientEvent>, fid: Fid, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let left = limit.checked_sub(start.elapsed()).unwrap_or_else(|| panic!("no break for {fid} within {limit:?}"));
        match tokio::time::timeout(left, events.recv()).await {
            Ok(Some(ClientEvent::Push(Push::Break { fids, .. }))) if fids.contains(&fid) => return start.elapsed(),
            Ok(Some(ClientEvent::Push(Push::BreakAll))) => return start.elapsed(),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("event stream ended"),
            Err(_) => panic!("no break for {fid} within {limit:?}"),
        }
    }
}

async fn no_break(events: &mut UnboundedReceiver<ClientEvent>, wait: Duration) {
    let deadline = Instant::now() + wait;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline.into(), events.recv()).await {
        assert!(!matches!(ev, ClientEvent::Push(_)), "unexpected push {ev:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_breaks_other_holders_at_once() {
    let dir = TestDir::new("break");
    std::fs::create_dir_all(dir.path().join("export")).unwrap();
    std::fs::write(dir.path().join("export/f"), "v1").unwrap();
    let afsd = Afsd::start(dir.path());
    let (a, b) = (afsd.client().await, afsd.client().await);
    let mut a_events = a.events();
    let fid = lookup(&a, "f").await.attr.fid;
    let fetched = a.fetch(FetchReq { fid, inline_max: 1 << 20 }).await.unwrap();
    assert_eq!(&fetched.data[..], b"v1");
    assert!(fetched.promise.is_some(), "a fetch comes with a promise");

    let base = lookup(&b, "f").await.attr.version;
    let t = Instant::now();
    let stored = store(&b, fid, base.clone(), b"v2").await.unwrap();
    let took = expect_break(&mut a_events, fid, Duration::from_secs(2)).await;
    eprintln!("break reached A {:?} after B's store returned ({:?} after it was sent)", took, t.elapsed());
    assert!(stored.attr.version.descends_from(&base) && stored.attr.version != base);
    assert_eq!(a.fetch(FetchReq { fid, inline_max: 1 << 20 }).await.unwrap().data[..], b"v2"[..]);

    // A store based on the old version is a conflict, not a silent overwrite.
    let err = store(&a, fid, base, b"stale").await.unwrap_err();
    assert!(matches!(err, common::rpc::RpcError::Fs(FsError::Conflict(_))), "{err:?}");
    assert_eq!(std::fs::read(afsd.export.join("f")).unwrap(), b"v2");
    assert!(afsd.stats()["breaks_sent"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promises_survive_a_server_restart() {
    let dir = TestDir::new("restart-promise");
    std::fs::create_dir_all(dir.path().join("export")).unwrap();
    std::fs::write(dir.path().join("export/f"), "v1").unwrap();
    let mut afsd = Afsd::start(dir.path());
    let a = afsd.client().await;
    let mut a_events = a.events();
    let fid = lookup(&a, "f").await.attr.fid;
    a.fetch(FetchReq { fid, inline_max: 1 << 20 }).await.unwrap();
    let held = afsd.stats()["callbacks"].as_u64().unwrap();
    assert!(held >= 1);

    afsd.stop();
    afsd.restart();
    assert_eq!(afsd.stats()["callbacks"].as_u64().unwrap(), held, "promises are persisted");
    // A reconnects (any call does it) and holds on to its promise.
    a.getattr(GetAttrReq { fid: Fid::ROOT }).await.unwrap();
    let b = afsd.client().await;
    let base = lookup(&b, "f").await.attr.version;
    store(&b, fid, base, b"v2").await.unwrap();
    expect_break(&mut a_events, fid, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_in_the_export_breaks_promises() {
    let dir = TestDir::new("direct-edit");
    std::fs::create_dir_all(dir.path().join("export/sub")).unwrap();
    std::fs::write(dir.path().join("export/sub/f"), "v1").unwrap();
    let afsd = Afsd::start(dir.path());
    let a = afsd.client().await;
    let mut a_events = a.events();
    let sub = lookup(&a, "sub").await.attr.fid;
    let f = a.lookup(LookupReq { dir: sub, name: "f".into() }).await.unwrap();
    a.fetch(FetchReq { fid: f.attr.fid, inline_max: 1 << 20 }).await.unwrap();
    a.readdir(ReadDirReq { dir: sub }).await.unwrap();

    std::fs::write(afsd.export.join("sub/f"), "edited by an admin").unwrap();
    let took = expect_break(&mut a_events, f.attr.fid, Duration::from_secs(3)).await;
    eprintln!("direct edit noticed after {took:?}");
    let again = a.fetch(FetchReq { fid: f.attr.fid, inline_max: 1 << 20 }).await.unwrap();
    assert_eq!(&again.data[..], b"edited by an admin");
    assert_eq!(again.attr.fid, f.attr.fid, "an edit keeps the fid");
    assert_ne!(again.attr.version, f.attr.version, "and gives a new version");

    // A new file appearing in a cached directory breaks the directory.
    std::fs::write(afsd.export.join("sub/new"), "hi").unwrap();
    expect_break(&mut a_events, sub, Duration::from_secs(3)).await;
    let listing = a.readdir(ReadDirReq { dir: sub }).await.unwrap();
    assert!(listing.entries.iter().any(|e| e.name == "new"));
}

/// A directory of 1,000 entries made behind the server's back (files,
/// subdirectories, a symlink) is adopted whole by its first listing, in
/// batches: every name gets its own fid of the right kind, and the fids
/// hold on the next listing, through lookups, and across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_directory_made_outside_is_adopted_whole() {
    let dir = TestDir::new("adopt-many");
    let big = dir.path().join("export/big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..990 {
        std::fs::write(big.join(format!("f{i:04}")), format!("{i}")).unwrap();
    }
    for i in 0..9 {
        std::fs::create_dir(big.join(format!("d{i}"))).unwrap();
    }
    std::os::unix::fs::symlink("f0001", big.join("link")).unwrap();
    let mut afsd = Afsd::start(dir.path());
    let a = afsd.client().await;
    let big_fid = lookup(&a, "big").await.attr.fid;
    let first = a.readdir(ReadDirReq { dir: big_fid }).await.unwrap();
    assert_eq!(first.entries.len(), 1000);
    let fids: std::collections::HashSet<Fid> = first.entries.iter().map(|e| e.fid).collect();
    assert_eq!(fids.len(), 1000, "every name has a fid of its own");
    let kind_of = |name: &str| first.entries.iter().find(|e| e.name == name).unwrap().kind;
    assert_eq!(kind_of("f0500"), common::FileKind::File);
    assert_eq!(kind_of("d3"), common::FileKind::Dir);
    assert_eq!(kind_of("link"), common::FileKind::Symlink);
    let by_lookup = a.lookup(LookupReq { dir: big_fid, name: "f0500".into() }).await.unwrap();
    assert_eq!(Some(by_lookup.attr.fid), first.entries.iter().find(|e| e.name == "f0500").map(|e| e.fid));
    let again = a.readdir(ReadDirReq { dir: big_fid }).await.unwrap();
    let mut before: Vec<_> = first.entries.iter().map(|e| (e.name.clone(), e.fid)).collect();
    let mut after: Vec<_> = again.entries.iter().map(|e| (e.name.clone(), e.fid)).collect();
    before.sort();
    after.sort();
    assert_eq!(before, after, "a second listing finds the same objects");
    afsd.stop();
    afsd.restart();
    let b = afsd.client().await;
    let mut restarted: Vec<_> =
        b.readdir(ReadDirReq { dir: big_fid }).await.unwrap().entries.iter().map(|e| (e.name.clone(), e.fid)).collect();
    restarted.sort();
    assert_eq!(before, restarted, "and so does one after a restart");
}

/// A tree of 1,000 known files removed behind the server's back does not
/// hold the server up: it answers at once and stops promptly on SIGTERM.
/// (The export watcher's check of each removed object used to sleep 60 ms
/// on a worker, a minute in all, and the shutdown waited for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_tree_removed_outside_does_not_hold_the_server_up() {
    let dir = TestDir::new("remove-many");
    let tree = dir.path().join("export/tree");
    for d in 0..20 {
        let sub = tree.join(format!("d{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..50 {
            std::fs::write(sub.join(format!("f{f:02}")), format!("{d}/{f}")).unwrap();
        }
    }
    let mut afsd = Afsd::start(dir.path());
    let a = afsd.client().await;
    let tree_fid = lookup(&a, "tree").await.attr.fid;
    let subs = a.readdir(ReadDirReq { dir: tree_fid }).await.unwrap().entries;
    assert_eq!(subs.len(), 20);
    for sub in &subs {
        assert_eq!(a.readdir(ReadDirReq { dir: sub.fid }).await.unwrap().entries.len(), 50, "{}", sub.name);
    }
    std::fs::remove_dir_all(&tree).unwrap();
    // The watcher gathers events for 100 ms, then checks every object.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let root = a.readdir(ReadDirReq { dir: Fid::ROOT }).await.unwrap();
    assert!(!root.entries.iter().any(|e| e.name == "tree"), "the removal is seen");
    drop(a);
    let t = Instant::now();
    afsd.stop();
    assert!(t.elapsed() < Duration::from_secs(10), "afsd took {:?} to stop after SIGTERM", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_away_at_break_time_learns_on_reconnect() {
    let dir = TestDir::new("away");
    std::fs::create_dir_all(dir.path().join("export")).unwrap();
    std::fs::write(dir.path().join("export/f"), "v1").unwrap();
    let afsd = Afsd::start(dir.path());
    let a = afsd.client().await;
    let fid = lookup(&a, "f").await.attr.fid;
    a.fetch(FetchReq { fid, inline_max: 1 << 20 }).await.unwrap();
    a.disconnect().await;
    assert!(crate::support::eventually(Duration::from_secs(5), || afsd.stats()["clients"].as_u64() == Some(0)));

    let b = afsd.client().await;
    let base = lookup(&b, "f").await.attr.version;
    store(&b, fid, base, b"v2").await.unwrap();

    let mut a_events = a.events();
    a.ensure_connected().await.unwrap();
    expect_break(&mut a_events, fid, Duration::from_secs(2)).await;
    // Delivered once: a second reconnect brings no further break.
    a.disconnect().await;
    a.ensure_connected().await.unwrap();
    no_break(&mut a_events, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_makes_returning_clients_revalidate() {
    let dir = TestDir::new("crash-breakall");
    std::fs::create_dir_all(dir.path().join("export")).unwrap();
    std::fs::write(dir.path().join("export/f"), "v1").unwrap();
    let mut afsd = Afsd::start(dir.path());
    let a = afsd.client().await;
    let mut a_events = a.events();
    let fid = lookup(&a, "f").await.attr.fid;
    a.fetch(FetchReq { fid, inline_max: 1 << 20 }).await.unwrap();
    afsd.kill();
    afsd.restart();
    a.ensure_connected().await.unwrap();
    // Promises given just before a crash may be lost, so the server tells
    // every client it knew to revalidate.
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), a_events.recv()).await {
            Ok(Some(ClientEvent::Push(Push::BreakAll))) => break,
            Ok(Some(_)) if start.elapsed() < Duration::from_secs(3) => continue,
            other => panic!("expected BreakAll after a crash, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exclusive_create_has_exactly_one_winner() {
    let dir = TestDir::new("excl");
    let afsd = Afsd::start(dir.path());
    let (a, b) = (afsd.client().await, afsd.client().await);
    for round in 0..100 {
        let name = format!("lock{round}");
        let req = |n: &str| CreateReq { dir: Fid::ROOT, name: n.into(), mode: 0o644, exclusive: true, content: None };
        let (ra, rb) = tokio::join!(a.create(req(&name)), b.create(req(&name)));
        let wins = [ra.is_ok(), rb.is_ok()].iter().filter(|w| **w).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} / {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        assert!(matches!(loser, Err(common::rpc::RpcError::Fs(FsError::Exists))));
        // Unlock, as the lockfile convention does.
        let holder = if wins == 1 { &a } else { &b };
        holder.remove(RemoveReq { dir: Fid::ROOT, name, base: None }).await.unwrap();
    }
}

/// The server's own changes are never taken for edits behind its back. A
/// store of a non-empty file installs the new content by a rename into its
/// directory; checks of that directory running meanwhile (the watcher, other
/// clients' calls in it) must not catch it half-way and give it a version
/// nobody made, which clients then meet as a spurious conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_servers_own_stores_are_not_outside_edits() {
    let dir = TestDir::new("own-stores");
    let afsd = Afsd::start(dir.path());
    let (a, b) = (afsd.client().await, afsd.client().await);
    let d = a.mkdir(MkdirReq { dir: Fid::ROOT, name: "d".into(), mode: 0o755 }).await.unwrap().attr.fid;
    let mut files = Vec::new();
    for i in 0..4 {
        let req = CreateReq { dir: d, name: format!("f{i}"), mode: 0o644, exclusive: true, content: None };
        let made = a.create(req).await.unwrap().attr;
        // Not empty from here on: later stores are staged and renamed in.
        let version = store(&a, made.fid, made.version, b"first").await.unwrap().attr.version;
        files.push((made.fid, version));
    }
    let writer = async {
        for round in 0..150 {
            for (fid, version) in files.iter_mut() {
                let data = format!("round {round} of {fid}");
                *version = store(&a, *fid, version.clone(), data.as_bytes()).await.unwrap().attr.version;
            }
        }
    };
    // Meanwhile another client keeps changing and looking in the same
    // directory, each call checking it for outside edits under its lock.
    let churn = async {
        for i in 0..300 {
            let name = format!("t{i}");
            b.create(CreateReq { dir: d, name: name.clone(), mode: 0o644, exclusive: true, content: None })
                .await
                .unwrap();
            b.lookup(LookupReq { dir: d, name: "f0".into() }).await.unwrap();
            b.remove(RemoveReq { dir: d, name, base: None }).await.unwrap();
        }
    };
    tokio::join!(writer, churn);
    // Give the watcher time to look at the last events.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(afsd.stats()["outside_edits"].as_u64(), Some(0), "the server took its own changes for outside edits");
    // And a real outside edit still counts.
    std::fs::write(dir.path().join("export/d/f0"), "edited behind the server's back").unwrap();
    let start = Instant::now();
    while afsd.stats()["outside_edits"].as_u64() == Some(0) {
        assert!(start.elapsed() < Duration::from_secs(10), "an outside edit was not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
