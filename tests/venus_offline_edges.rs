//! Offline work and reintegration in the corners a review probed: hard
//! links, directory attributes, crashes of either side mid-way, files held
//! open across reconnection, writes during reintegration, and conflicts
//! whose directories are gone. Each reproduces a bug that was fixed.

use crate::support::{assert_same_tree, bin, eventually, snapshot, tree_diff, Afsd, TestDir, VenusMount};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

fn reconnect(a: &VenusMount) -> serde_json::Value {
    let out = a.cli(&["reconnect"]);
    eprintln!(
        "reconnect: {} {}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let s = a.status();
    eprintln!("status after reconnect: {s}");
    s
}

fn conflicts(a: &VenusMount) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(&a.ok(&["conflicts", "list", "--json"])).unwrap();
    eprintln!("conflicts: {v}");
    v
}

fn mtime(p: &Path) -> i64 {
    fs::metadata(p).unwrap().mtime()
}

fn set_mtime(p: &Path, secs: u64) {
    let f = fs::File::options().write(true).open(p).unwrap();
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t)).unwrap();
}

fn truncate(p: &Path, len: u64) {
    let f = fs::File::options().write(true).open(p).unwrap();
    f.set_len(len).unwrap();
}

fn seeded(dir: &TestDir, afsd: &Afsd, name: &str) -> VenusMount {
    let a = VenusMount::start(dir.path(), name, afsd);
    fs::write(a.path(&format!("seed-{name}")), "s").unwrap();
    assert!(fs::read_dir(&a.mountpoint).unwrap().count() > 0);
    a
}

#[test]
fn attrs_offline() {
    let dir = TestDir::new("rv-attrs");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    for n in ["chmod", "trunc", "utime", "trunc-write", "chmod-write", "write-chmod", "write-utime", "all"] {
        fs::write(a.path(n), "0123456789").unwrap();
        fs::read(a.path(n)).unwrap();
    }
    a.ok(&["disconnect"]);
    fs::set_permissions(a.path("chmod"), fs::Permissions::from_mode(0o600)).unwrap();
    truncate(&a.path("trunc"), 3);
    set_mtime(&a.path("utime"), 1_000_000_000);
    truncate(&a.path("trunc-write"), 2);
    fs::OpenOptions::new().append(true).open(a.path("trunc-write")).unwrap().write_all(b"XY").unwrap();
    fs::set_permissions(a.path("chmod-write"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(a.path("chmod-write"), "new content").unwrap();
    fs::write(a.path("write-chmod"), "new content 2").unwrap();
    fs::set_permissions(a.path("write-chmod"), fs::Permissions::from_mode(0o604)).unwrap();
    fs::write(a.path("write-utime"), "new content 3").unwrap();
    set_mtime(&a.path("write-utime"), 1_100_000_000);
    fs::set_permissions(a.path("all"), fs::Permissions::from_mode(0o611)).unwrap();
    truncate(&a.path("all"), 5);
    set_mtime(&a.path("all"), 1_200_000_000);
    // created offline
    fs::write(a.path("new"), "created offline").unwrap();
    fs::set_permissions(a.path("new"), fs::Permissions::from_mode(0o700)).unwrap();
    set_mtime(&a.path("new"), 1_300_000_000);
    truncate(&a.path("new"), 7);
    let local = snapshot(&a.mountpoint);
    let mt: Vec<(String, i64)> =
        ["utime", "write-utime", "all", "new"].iter().map(|n| (n.to_string(), mtime(&a.path(n)))).collect();
    eprintln!("records: {}", a.status()["cml_records"]);
    let s = reconnect(&a);
    assert_eq!(s["conflicts"], 0, "{s}");
    assert_eq!(s["cml_records"], 0, "{s}");
    let d = tree_diff(&a.mountpoint, &afsd.export);
    let server = snapshot(&afsd.export);
    let d2: Vec<_> = local.keys().filter(|k| local.get(*k) != server.get(*k)).collect();
    eprintln!("offline view vs server diff: {d2:?}");
    for (n, m) in &mt {
        eprintln!("{n}: offline mtime {m}, server {}, a {}", mtime(&afsd.export.join(n)), mtime(&a.path(n)));
    }
    assert!(d.is_empty() && d2.is_empty());
    for (n, m) in &mt {
        assert_eq!(mtime(&afsd.export.join(n)), *m, "mtime of {n}");
    }
}

#[test]
fn links_in_offline_dirs() {
    let dir = TestDir::new("rv-links");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::write(a.path("existing"), "E").unwrap();
    a.ok(&["disconnect"]);
    fs::create_dir_all(a.path("d/e")).unwrap();
    fs::write(a.path("d/f"), "F1").unwrap();
    std::os::unix::fs::symlink("f", a.path("d/s")).unwrap();
    std::os::unix::fs::symlink("../f", a.path("d/e/s2")).unwrap();
    fs::hard_link(a.path("d/f"), a.path("d/e/h")).unwrap();
    fs::hard_link(a.path("existing"), a.path("d/e/hx")).unwrap();
    fs::write(a.path("d/e/h"), "F2 through h").unwrap();
    fs::write(a.path("d/e/hx"), "E2 through hx").unwrap();
    fs::rename(a.path("d/s"), a.path("d/e/s3")).unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    let _ = tree_diff(&a.mountpoint, &afsd.export);
    assert_eq!(s["conflicts"], 0);
    assert_eq!(s["cml_records"], 0);
    assert_same_tree(&a.mountpoint, &afsd.export, "A vs export");
    assert_eq!(fs::read_to_string(afsd.export.join("d/f")).unwrap(), "F2 through h");
    assert_eq!(fs::read_to_string(afsd.export.join("existing")).unwrap(), "E2 through hx");
    assert_eq!(
        fs::metadata(afsd.export.join("d/f")).unwrap().ino(),
        fs::metadata(afsd.export.join("d/e/h")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(afsd.export.join("existing")).unwrap().ino(),
        fs::metadata(afsd.export.join("d/e/hx")).unwrap().ino()
    );
    let b = VenusMount::start(dir.path(), "b", &afsd);
    assert_same_tree(&b.mountpoint, &afsd.export, "B vs export");
}

#[test]
fn store_after_rename_into_offline_dir() {
    let dir = TestDir::new("rv-store-rename");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    a.ok(&["disconnect"]);
    fs::write(a.path("f"), "first").unwrap();
    fs::create_dir(a.path("d")).unwrap();
    fs::rename(a.path("f"), a.path("d/f")).unwrap();
    fs::write(a.path("d/f"), "second, after the move").unwrap();
    let mut h = fs::OpenOptions::new().append(true).open(a.path("d/f")).unwrap();
    fs::create_dir(a.path("d2")).unwrap();
    fs::rename(a.path("d"), a.path("d2/d")).unwrap();
    h.write_all(b" + appended through an open handle").unwrap();
    drop(h);
    let s = reconnect(&a);
    assert_eq!(s["conflicts"], 0);
    assert_eq!(s["cml_records"], 0);
    assert_eq!(
        fs::read_to_string(afsd.export.join("d2/d/f")).unwrap(),
        "second, after the move + appended through an open handle"
    );
    assert_same_tree(&a.mountpoint, &afsd.export, "A vs export");
}

#[test]
fn kill_venus_after_rename_over() {
    let dir = TestDir::new("rv-kill-rename-over");
    let afsd = Afsd::start(dir.path());
    let mut a = seeded(&dir, &afsd, "a");
    fs::write(a.path("doc"), "base").unwrap();
    fs::write(a.path("doc2"), "base2").unwrap();
    a.ok(&["disconnect"]);
    fs::write(a.path(".doc.swp"), "offline edit").unwrap();
    fs::rename(a.path(".doc.swp"), a.path("doc")).unwrap();
    // and an existing file renamed over another existing one
    fs::rename(a.path("doc2"), a.path("seed-a")).unwrap();
    a.kill();
    a.restart();
    assert_eq!(fs::read_to_string(a.path("doc")).unwrap(), "offline edit");
    assert_eq!(fs::read_to_string(a.path("seed-a")).unwrap(), "base2");
    let s = reconnect(&a);
    assert_eq!(s["conflicts"], 0);
    assert_eq!(s["cml_records"], 0);
    assert_eq!(fs::read_to_string(afsd.export.join("doc")).unwrap(), "offline edit");
    assert_eq!(fs::read_to_string(afsd.export.join("seed-a")).unwrap(), "base2");
    assert!(!afsd.export.join(".doc.swp").exists() && !afsd.export.join("doc2").exists());
    assert_same_tree(&a.mountpoint, &afsd.export, "A vs export");
}

/// Minimal: an existing file gets a second name offline, then is written.
#[test]
fn link_then_write_offline() {
    let dir = TestDir::new("rv-link-write");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::write(a.path("existing"), "E").unwrap();
    a.ok(&["disconnect"]);
    fs::hard_link(a.path("existing"), a.path("second")).unwrap();
    fs::write(a.path("existing"), "E2 written offline").unwrap();
    eprintln!("records: {}", a.status()["cml_records"]);
    let s = reconnect(&a);
    conflicts(&a);
    assert_eq!(s["conflicts"], 0, "{s}");
    assert_eq!(fs::read_to_string(afsd.export.join("second")).unwrap(), "E2 written offline");
}

/// Minimal: a file with two names loses one offline, then is written.
#[test]
fn unlink_other_name_then_write_offline() {
    let dir = TestDir::new("rv-unlink-write");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::write(a.path("one"), "v0").unwrap();
    fs::hard_link(a.path("one"), a.path("two")).unwrap();
    fs::read(a.path("two")).unwrap();
    a.ok(&["disconnect"]);
    fs::remove_file(a.path("one")).unwrap();
    fs::write(a.path("two"), "v1 written offline").unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    assert_eq!(s["conflicts"], 0, "{s}");
    assert_eq!(fs::read_to_string(afsd.export.join("two")).unwrap(), "v1 written offline");
    assert!(!afsd.export.join("one").exists());
}

/// A tree removed offline while another client added a file inside it.
#[test]
fn rmdir_tree_while_server_added() {
    let dir = TestDir::new("rv-rmtree");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    fs::create_dir_all(a.path("t/sub")).unwrap();
    fs::write(a.path("t/x"), "x").unwrap();
    fs::write(a.path("t/sub/y"), "y").unwrap();
    // A caches everything
    let _ = snapshot(&a.mountpoint);
    assert!(b.path("t/sub/y").exists());
    a.ok(&["disconnect"]);
    fs::remove_dir_all(a.path("t")).unwrap();
    fs::write(b.path("t/sub/added-by-b"), "B").unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    eprintln!("server: {:?}", snapshot(&afsd.export).keys().collect::<Vec<_>>());
    assert_eq!(s["cml_records"], 0, "{s}");
    assert_eq!(fs::read_to_string(afsd.export.join("t/sub/added-by-b")).unwrap(), "B");
    assert!(!afsd.export.join("t/x").exists());
    assert!(!afsd.export.join("t/sub/y").exists());
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
    assert!(s["conflicts"].as_u64().unwrap() >= 1, "the removal of t/sub and t is reported");
}

/// A directory renamed offline, with a child edited inside it, while another
/// client edits a different child.
#[test]
fn rename_dir_offline_server_changed_child() {
    let dir = TestDir::new("rv-rename-dir");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    fs::create_dir_all(a.path("d/inner")).unwrap();
    fs::write(a.path("d/x"), "x0").unwrap();
    fs::write(a.path("d/y"), "y0").unwrap();
    fs::write(a.path("d/inner/z"), "z0").unwrap();
    let _ = snapshot(&a.mountpoint);
    assert_eq!(fs::read_to_string(b.path("d/y")).unwrap(), "y0");
    a.ok(&["disconnect"]);
    fs::write(a.path("d/x"), "x1 by A").unwrap();
    fs::rename(a.path("d"), a.path("e")).unwrap();
    fs::write(a.path("e/inner/z"), "z1 by A").unwrap();
    fs::write(a.path("e/new"), "new by A").unwrap();
    fs::rename(a.path("e/inner"), a.path("inner-moved")).unwrap();
    fs::write(b.path("d/y"), "y1 by B").unwrap();
    fs::write(b.path("d/b-new"), "new by B").unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    assert_eq!(s["cml_records"], 0, "{s}");
    assert_eq!(s["conflicts"], 0, "{s}");
    for (p, c) in [
        ("e/x", "x1 by A"),
        ("e/y", "y1 by B"),
        ("inner-moved/z", "z1 by A"),
        ("e/new", "new by A"),
        ("e/b-new", "new by B"),
    ] {
        assert_eq!(fs::read_to_string(afsd.export.join(p)).ok().as_deref(), Some(c), "{p}");
    }
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
    assert!(eventually(Duration::from_secs(5), || tree_diff(&b.mountpoint, &afsd.export).is_empty()));
}

/// Same, but B edits the very child A edited: one conflict, only for it.
#[test]
fn rename_dir_offline_server_changed_same_child() {
    let dir = TestDir::new("rv-rename-dir-same");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    fs::create_dir_all(a.path("d")).unwrap();
    fs::write(a.path("d/x"), "x0").unwrap();
    let _ = snapshot(&a.mountpoint);
    assert_eq!(fs::read_to_string(b.path("d/x")).unwrap(), "x0");
    a.ok(&["disconnect"]);
    fs::write(a.path("d/x"), "x1 by A").unwrap();
    fs::rename(a.path("d"), a.path("e")).unwrap();
    fs::write(b.path("d/x"), "x1 by B").unwrap();
    let s = reconnect(&a);
    let c = conflicts(&a);
    assert_eq!(s["cml_records"], 0, "{s}");
    assert_eq!(s["conflicts"], 1, "{s}");
    assert_eq!(c["conflicts"][0]["path"], "/e/x");
    assert_eq!(fs::read_to_string(afsd.export.join("e/x")).unwrap(), "x1 by B");
    let local = c["conflicts"][0]["local_copy"].as_str().unwrap();
    assert_eq!(fs::read_to_string(local).unwrap(), "x1 by A");
    a.ok(&["conflicts", "resolve", a.path("e/x").to_str().unwrap(), "--keep", "local"]);
    assert_eq!(fs::read_to_string(afsd.export.join("e/x")).unwrap(), "x1 by A");
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
}

/// Offline changes inside a directory another client renamed meanwhile.
#[test]
fn offline_changes_while_parent_renamed_on_server() {
    parent_renamed_on_server(false);
}

/// The same, with a chmod of a subdirectory among the offline changes.
#[test]
fn offline_changes_and_chmod_while_parent_renamed_on_server() {
    parent_renamed_on_server(true);
}

fn parent_renamed_on_server(chmod: bool) {
    let dir = TestDir::new("rv-parent-renamed");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    fs::create_dir_all(a.path("p/q")).unwrap();
    fs::write(a.path("p/f"), "f0").unwrap();
    fs::write(a.path("p/g"), "g0").unwrap();
    fs::write(a.path("p/q/h"), "h0").unwrap();
    let _ = snapshot(&a.mountpoint);
    let _ = snapshot(&b.mountpoint);
    a.ok(&["disconnect"]);
    fs::write(a.path("p/f"), "f1 by A").unwrap();
    fs::write(a.path("p/new"), "new by A").unwrap();
    fs::create_dir(a.path("p/newdir")).unwrap();
    fs::write(a.path("p/newdir/n"), "n by A").unwrap();
    fs::rename(a.path("p/g"), a.path("p/q/g")).unwrap();
    fs::remove_file(a.path("p/q/h")).unwrap();
    if chmod {
        fs::set_permissions(a.path("p/q"), fs::Permissions::from_mode(0o700)).unwrap();
    }
    fs::rename(b.path("p"), b.path("renamed")).unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    eprintln!("server: {:?}", snapshot(&afsd.export).keys().collect::<Vec<_>>());
    assert_eq!(s["cml_records"], 0, "{s}");
    assert_eq!(s["conflicts"], 0, "{s}");
    for (p, c) in
        [("renamed/f", "f1 by A"), ("renamed/new", "new by A"), ("renamed/newdir/n", "n by A"), ("renamed/q/g", "g0")]
    {
        assert_eq!(fs::read_to_string(afsd.export.join(p)).ok().as_deref(), Some(c), "{p}");
    }
    assert!(!afsd.export.join("renamed/q/h").exists());
    assert!(!afsd.export.join("p").exists());
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
}

/// Minimal: a file created offline in an existing directory, then the
/// directory chmodded offline.
#[test]
fn create_in_dir_then_chmod_dir_offline() {
    let dir = TestDir::new("rv-chmod-dir");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::create_dir(a.path("d")).unwrap();
    fs::write(a.path("d/old"), "o").unwrap();
    let _ = snapshot(&a.mountpoint);
    a.ok(&["disconnect"]);
    fs::write(a.path("d/new"), "n").unwrap();
    fs::set_permissions(a.path("d"), fs::Permissions::from_mode(0o700)).unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    assert_eq!(s["conflicts"], 0, "{s}");
    assert_eq!(fs::metadata(afsd.export.join("d")).unwrap().mode() & 0o7777, 0o700);
    assert_eq!(fs::read_to_string(afsd.export.join("d/new")).unwrap(), "n");
}

/// Minimal: a file chmodded offline, then renamed (its version does not change)
/// and a file written offline, then its directory chmodded.
#[test]
fn chmod_dir_then_create_in_it_offline() {
    let dir = TestDir::new("rv-chmod-dir2");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::create_dir(a.path("d")).unwrap();
    let _ = snapshot(&a.mountpoint);
    a.ok(&["disconnect"]);
    fs::set_permissions(a.path("d"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(a.path("d/new"), "n").unwrap();
    fs::set_permissions(a.path("d"), fs::Permissions::from_mode(0o750)).unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    assert_eq!(s["conflicts"], 0, "{s}");
    assert_eq!(fs::metadata(afsd.export.join("d")).unwrap().mode() & 0o7777, 0o750);
}

/// afsd SIGKILLed while a long log is being reintegrated, then restarted:
/// nothing lost, nothing doubled, no conflicts, and the log empties.
#[test]
fn afsd_killed_mid_reintegration() {
    for (round, delay_ms) in [0u64, 100, 400].into_iter().enumerate() {
        let dir = TestDir::new(&format!("rv-afsd-kill-{round}"));
        let mut afsd = Afsd::start(dir.path());
        let a = seeded(&dir, &afsd, "a");
        fs::create_dir(a.path("keep")).unwrap();
        for i in 0..50 {
            fs::write(a.path(&format!("keep/k{i}")), format!("k{i} v0")).unwrap();
        }
        let _ = snapshot(&a.mountpoint);
        a.ok(&["disconnect"]);
        let n = 1500;
        fs::create_dir(a.path("d")).unwrap();
        for i in 0..n {
            fs::write(a.path(&format!("d/f{i}")), format!("content of file {i}\n")).unwrap();
        }
        for i in 0..50 {
            fs::write(a.path(&format!("keep/k{i}")), format!("k{i} v1 offline")).unwrap();
            fs::rename(a.path(&format!("keep/k{i}")), a.path(&format!("keep/r{i}"))).unwrap();
        }
        let total = a.status()["cml_records"].as_u64().unwrap();
        eprintln!("round {round}: {total} records");
        let (venus, cache) = (bin("venus"), a.cache.clone());
        let rc = std::thread::spawn(move || {
            std::process::Command::new(venus).args(["reconnect", "--cache"]).arg(cache).output().unwrap()
        });
        assert!(eventually(Duration::from_secs(30), || a.status()["cml_records"].as_u64().unwrap() < total));
        std::thread::sleep(Duration::from_millis(delay_ms));
        afsd.kill();
        let left = a.status()["cml_records"].as_u64().unwrap();
        eprintln!("round {round}: killed afsd with {left} records left");
        afsd.restart();
        let out = rc.join().unwrap();
        eprintln!("reconnect said: {} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let t = Instant::now();
        let ok = eventually(Duration::from_secs(90), || {
            let s = a.status();
            s["state"] == "connected" && s["cml_records"] == 0
        });
        let s = a.status();
        eprintln!("round {round}: after {:?}: {s}", t.elapsed());
        if !ok {
            // maybe it is parked in forced-offline or backing off; try reconnect
            let s2 = reconnect(&a);
            panic!("round {round}: never drained: {s} / after reconnect: {s2}");
        }
        conflicts(&a);
        assert_eq!(s["conflicts"], 0, "round {round}");
        for i in 0..n {
            let got = fs::read_to_string(afsd.export.join(format!("d/f{i}")));
            assert_eq!(got.ok(), Some(format!("content of file {i}\n")), "round {round}: f{i}");
        }
        for i in 0..50 {
            assert_eq!(
                fs::read_to_string(afsd.export.join(format!("keep/r{i}"))).ok(),
                Some(format!("k{i} v1 offline")),
                "round {round}: r{i}"
            );
            assert!(!afsd.export.join(format!("keep/k{i}")).exists());
        }
        assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
    }
}

/// Deterministic version of the afsd-kill case: afsd dies right after it
/// committed the create of a file written offline (before applying it).
#[test]
fn afsd_crash_after_create_commit_during_reintegration() {
    for fp in ["crash-after-commit:create", "crash-after-commit:store", "crash-in-commit:store"] {
        let dir = TestDir::new("rv-fp-create");
        let mut afsd = Afsd::start(dir.path());
        let a = seeded(&dir, &afsd, "a");
        a.ok(&["disconnect"]);
        fs::write(a.path("f"), "written offline").unwrap();
        afsd.stop();
        afsd.set_env(&[("AFSD_FAILPOINT", fp)]);
        afsd.restart();
        let (venus, cache) = (bin("venus"), a.cache.clone());
        let rc = std::thread::spawn(move || {
            std::process::Command::new(venus).args(["reconnect", "--cache"]).arg(cache).output().unwrap()
        });
        assert!(afsd.wait_exit(Duration::from_secs(20)), "{fp}: afsd aborts at the failpoint");
        afsd.set_env(&[]);
        afsd.restart();
        let out = rc.join().unwrap();
        eprintln!(
            "{fp}: reconnect said: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            eventually(Duration::from_secs(60), || {
                let s = a.status();
                s["state"] == "connected" && s["cml_records"] == 0
            }),
            "{fp}: {}",
            a.status()
        );
        conflicts(&a);
        assert_eq!(fs::read_to_string(afsd.export.join("f")).ok().as_deref(), Some("written offline"), "{fp}");
        assert_eq!(a.status()["conflicts"], 0, "{fp}");
    }
}

/// A 10,000-record log; `venus status` keeps answering (quickly) during
/// reintegration and reports `reintegrating` with a shrinking count.
#[test]
fn ten_thousand_records_and_status() {
    let dir = TestDir::new("rv-10k");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::create_dir(a.path("base")).unwrap();
    for i in 0..200 {
        fs::write(a.path(&format!("base/b{i}")), "v0").unwrap();
    }
    let _ = snapshot(&a.mountpoint);
    a.ok(&["disconnect"]);
    let t = Instant::now();
    fs::create_dir(a.path("d")).unwrap();
    let mut expected = 1; // mkdir
    for i in 0..4000 {
        fs::write(a.path(&format!("d/f{i}")), format!("{i}")).unwrap();
        expected += 2;
    }
    for i in 0..200 {
        fs::write(a.path(&format!("base/b{i}")), format!("v1 {i}")).unwrap();
        fs::set_permissions(a.path(&format!("base/b{i}")), fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(a.path(&format!("base/b{i}")), a.path(&format!("d/moved{i}"))).unwrap();
        expected += 2;
    }
    for i in 0..1000 {
        fs::create_dir(a.path(&format!("d/sub{i}"))).unwrap();
        expected += 1;
    }
    // remove half of the subdirs again: cancels
    for i in 0..500 {
        fs::remove_dir(a.path(&format!("d/sub{i}"))).unwrap();
        expected -= 1;
    }
    for i in 0..1300 {
        std::os::unix::fs::symlink(format!("f{i}"), a.path(&format!("d/l{i}"))).unwrap();
        expected += 1;
    }
    let s = a.status();
    eprintln!("logged in {:?}: {s}", t.elapsed());
    assert!(s["cml_records"].as_u64().unwrap() >= 10_000, "{expected}");
    let expected_tree = snapshot(&a.mountpoint);
    let (venus, cache) = (bin("venus"), a.cache.clone());
    let t = Instant::now();
    let rc = std::thread::spawn(move || {
        std::process::Command::new(venus).args(["reconnect", "--cache"]).arg(cache).output().unwrap()
    });
    let mut seen_states = Vec::new();
    let mut worst = Duration::ZERO;
    let mut last = u64::MAX;
    while !rc.is_finished() {
        let q = Instant::now();
        let s = a.status();
        worst = worst.max(q.elapsed());
        let n = s["cml_records"].as_u64().unwrap();
        assert!(n <= last, "count went up: {last} -> {n}");
        last = n;
        seen_states.push((s["state"].as_str().unwrap().to_string(), n));
        // reading a file through the mount during reintegration
        let q = Instant::now();
        let _ = fs::read_to_string(a.path("d/f1"));
        worst = worst.max(q.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = rc.join().unwrap();
    eprintln!(
        "reconnect took {:?}: {}{}",
        t.elapsed(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    seen_states.dedup();
    eprintln!("states: {:?}", &seen_states[..seen_states.len().min(30)]);
    eprintln!("worst status/read latency: {worst:?}");
    let s = a.status();
    eprintln!("{s}");
    assert_eq!(s["cml_records"], 0);
    assert_eq!(s["conflicts"], 0);
    let got = snapshot(&afsd.export);
    let d: Vec<_> =
        got.keys().chain(expected_tree.keys()).filter(|k| got.get(*k) != expected_tree.get(*k)).take(10).collect();
    assert!(d.is_empty(), "server differs from the offline view: {d:?}");
    assert!(seen_states.iter().any(|(st, _)| st == "reintegrating"), "{seen_states:?}");
}

fn resolve(m: &VenusMount, rel: &str, how: &[&str]) -> std::process::Output {
    let p = m.path(rel);
    let mut args = vec!["conflicts", "resolve", p.to_str().unwrap()];
    args.extend_from_slice(how);
    let out = m.cli(&args);
    eprintln!(
        "resolve {rel} {how:?}: ok={} {}{}",
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// create/create inside a directory both clients made offline: resolved
/// every way.
#[test]
fn create_create_in_merged_dirs_resolve() {
    let dir = TestDir::new("rv-cc-dirs");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    let merged = dir.path().join("merged");
    fs::write(&merged, "merged\n").unwrap();
    a.ok(&["disconnect"]);
    b.ok(&["disconnect"]);
    for (m, who) in [(&a, "A"), (&b, "B")] {
        fs::create_dir_all(m.path("s/deep")).unwrap();
        for how in ["local", "server", "both", "use"] {
            fs::write(m.path(&format!("s/deep/{how}")), format!("{how} by {who}\n")).unwrap();
        }
    }
    reconnect(&a);
    let s = reconnect(&b);
    let c = conflicts(&b);
    assert_eq!(s["conflicts"], 4, "{s}");
    assert_eq!(s["cml_records"], 0, "{s}");
    for how in ["local", "server", "both", "use"] {
        assert!(c["conflicts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["path"] == format!("/s/deep/{how}") && c["kind"] == "create/create"));
    }
    assert!(resolve(&b, "s/deep/local", &["--keep", "local"]).status.success());
    assert!(resolve(&b, "s/deep/server", &["--keep", "server"]).status.success());
    assert!(resolve(&b, "s/deep/both", &["--keep", "both"]).status.success());
    assert!(resolve(&b, "s/deep/use", &["--use", merged.to_str().unwrap()]).status.success());
    let rd = |p: &str| fs::read_to_string(afsd.export.join(p)).ok();
    assert_eq!(rd("s/deep/local").as_deref(), Some("local by B\n"));
    assert_eq!(rd("s/deep/server").as_deref(), Some("server by A\n"));
    assert_eq!(rd("s/deep/both").as_deref(), Some("both by A\n"));
    let beside: Vec<_> = fs::read_dir(afsd.export.join("s/deep"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("both.local-"))
        .collect();
    assert_eq!(beside.len(), 1, "{beside:?}");
    assert_eq!(rd(&format!("s/deep/{}", beside[0])).as_deref(), Some("both by B\n"));
    assert_eq!(rd("s/deep/use").as_deref(), Some("merged\n"));
    assert_eq!(b.status()["conflicts"], 0);
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
    assert!(eventually(Duration::from_secs(5), || tree_diff(&b.mountpoint, &afsd.export).is_empty()));
}

/// update/remove where the other client removed the file and its directory:
/// --keep local must bring B's content back.
#[test]
fn update_remove_dir_gone_resolve_local() {
    let dir = TestDir::new("rv-ur-dir");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    for how in ["local", "both", "use", "server"] {
        fs::create_dir_all(a.path(&format!("d-{how}/sub"))).unwrap();
        fs::write(a.path(&format!("d-{how}/sub/f")), "base\n").unwrap();
        assert_eq!(fs::read_to_string(b.path(&format!("d-{how}/sub/f"))).unwrap(), "base\n");
    }
    let _ = snapshot(&a.mountpoint);
    a.ok(&["disconnect"]);
    b.ok(&["disconnect"]);
    for how in ["local", "both", "use", "server"] {
        fs::remove_dir_all(a.path(&format!("d-{how}"))).unwrap();
        fs::write(b.path(&format!("d-{how}/sub/f")), format!("B's edit {how}\n")).unwrap();
    }
    let s = reconnect(&a);
    assert_eq!(s["conflicts"], 0, "{s}");
    let s = reconnect(&b);
    let c = conflicts(&b);
    assert_eq!(s["cml_records"], 0, "{s}");
    assert_eq!(s["conflicts"], 4, "{s}");
    for how in ["local", "both", "use", "server"] {
        assert!(c["conflicts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["path"] == format!("/d-{how}/sub/f") && c["kind"] == "update/remove"));
    }
    let merged = dir.path().join("merged");
    fs::write(&merged, "merged\n").unwrap();
    let r1 = resolve(&b, "d-local/sub/f", &["--keep", "local"]);
    let r2 = resolve(&b, "d-both/sub/f", &["--keep", "both"]);
    let r3 = resolve(&b, "d-use/sub/f", &["--use", merged.to_str().unwrap()]);
    let r4 = resolve(&b, "d-server/sub/f", &["--keep", "server"]);
    eprintln!("server: {:?}", snapshot(&afsd.export).keys().collect::<Vec<_>>());
    assert!(r4.status.success());
    assert!(r1.status.success() && r2.status.success() && r3.status.success(), "resolutions failed");
    assert_eq!(fs::read_to_string(afsd.export.join("d-local/sub/f")).ok().as_deref(), Some("B's edit local\n"));
}

/// Offline: save by rename over `doc`, then delete `doc`; meanwhile another
/// client edited `doc`. The edit must not vanish silently.
#[test]
fn rename_over_then_remove_while_server_edited() {
    let dir = TestDir::new("rv-ro-rm");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    fs::write(a.path("doc"), "base").unwrap();
    assert_eq!(fs::read_to_string(b.path("doc")).unwrap(), "base");
    a.ok(&["disconnect"]);
    fs::write(a.path(".doc.tmp"), "A's save").unwrap();
    fs::rename(a.path(".doc.tmp"), a.path("doc")).unwrap();
    fs::remove_file(a.path("doc")).unwrap();
    fs::write(b.path("doc"), "B's important edit").unwrap();
    eprintln!("records: {}", a.status()["cml_records"]);
    let s = reconnect(&a);
    conflicts(&a);
    eprintln!("server doc: {:?}", fs::read_to_string(afsd.export.join("doc")).ok());
    assert!(
        afsd.export.join("doc").exists() || s["conflicts"].as_u64().unwrap() > 0,
        "B's edit was removed and nothing was reported"
    );
}

/// For comparison: a plain offline remove of a file edited on the server.
#[test]
fn plain_remove_while_server_edited() {
    let dir = TestDir::new("rv-rm");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    fs::write(a.path("doc"), "base").unwrap();
    assert_eq!(fs::read_to_string(b.path("doc")).unwrap(), "base");
    a.ok(&["disconnect"]);
    fs::remove_file(a.path("doc")).unwrap();
    fs::write(b.path("doc"), "B's important edit").unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    assert_eq!(fs::read_to_string(afsd.export.join("doc")).ok().as_deref(), Some("B's important edit"));
    assert_eq!(s["conflicts"], 1);
}

/// Both names of a hard-linked file removed offline.
#[test]
fn remove_both_hard_links_offline() {
    let dir = TestDir::new("rv-rm-links");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::write(a.path("one"), "v0").unwrap();
    fs::hard_link(a.path("one"), a.path("two")).unwrap();
    let _ = snapshot(&a.mountpoint);
    a.ok(&["disconnect"]);
    fs::remove_file(a.path("one")).unwrap();
    fs::remove_file(a.path("two")).unwrap();
    let s = reconnect(&a);
    conflicts(&a);
    eprintln!("server: {:?}", snapshot(&afsd.export).keys().collect::<Vec<_>>());
    assert_eq!(s["conflicts"], 0, "{s}");
    assert!(!afsd.export.join("one").exists() && !afsd.export.join("two").exists());
}

/// Many directories made offline that the server already has (each merge
/// makes the records inside it go again): reintegration must not give up.
#[test]
fn many_merged_dirs_do_not_exhaust_retries() {
    let dir = TestDir::new("rv-merges");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    a.ok(&["disconnect"]);
    for d in 0..14 {
        fs::create_dir(a.path(&format!("d{d}"))).unwrap();
        for i in 0..300 {
            fs::write(a.path(&format!("d{d}/f{i}")), format!("{d}/{i}")).unwrap();
        }
    }
    for d in 0..14 {
        fs::create_dir(b.path(&format!("d{d}"))).unwrap();
    }
    let t = Instant::now();
    let s = reconnect(&a);
    eprintln!("took {:?}", t.elapsed());
    conflicts(&a);
    assert_eq!(s["cml_records"], 0, "{s}");
    assert_eq!(s["conflicts"], 0, "{s}");
    for d in 0..14 {
        for i in 0..300 {
            assert_eq!(fs::read_to_string(afsd.export.join(format!("d{d}/f{i}"))).unwrap(), format!("{d}/{i}"));
        }
    }
}

/// Files kept open across reconnection: written before and after.
#[test]
fn open_files_across_reconnect() {
    let dir = TestDir::new("rv-open-across");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::write(a.path("old"), "old:").unwrap();
    a.ok(&["disconnect"]);
    fs::create_dir(a.path("nd")).unwrap();
    let mut n = fs::OpenOptions::new().create(true).truncate(true).write(true).open(a.path("nd/new")).unwrap();
    n.write_all(b"new-before;").unwrap();
    let mut o = fs::OpenOptions::new().append(true).open(a.path("old")).unwrap();
    o.write_all(b"before;").unwrap();
    n.sync_all().unwrap();
    o.sync_all().unwrap();
    reconnect(&a);
    let c = conflicts(&a);
    for x in c["conflicts"].as_array().unwrap() {
        eprintln!("local copy {:?}", fs::read_to_string(x["local_copy"].as_str().unwrap_or("/nonexistent")).ok());
    }
    eprintln!("server after reconnect: {:?}", fs::read_to_string(afsd.export.join("nd/new")).ok());
    n.write_all(b"new-after").unwrap();
    o.write_all(b"after").unwrap();
    drop(n);
    drop(o);
    assert!(eventually(Duration::from_secs(10), || a.status()["cml_records"] == 0));
    let c = conflicts(&a);
    for x in c["conflicts"].as_array().unwrap() {
        eprintln!("local copy {:?}", fs::read_to_string(x["local_copy"].as_str().unwrap_or("/nonexistent")).ok());
    }
    eprintln!(
        "server at end: {:?} / {:?}",
        fs::read_to_string(afsd.export.join("nd/new")).ok(),
        fs::read_to_string(afsd.export.join("old")).ok()
    );
    eprintln!("{}", a.status());
    assert_eq!(fs::read_to_string(afsd.export.join("nd/new")).unwrap(), "new-before;new-after");
    assert_eq!(fs::read_to_string(afsd.export.join("old")).unwrap(), "old:before;after");
    assert_eq!(a.status()["conflicts"], 0);
}

/// Writes made while a long reintegration is running.
#[test]
fn writes_during_reintegration() {
    let dir = TestDir::new("rv-write-during");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::write(a.path("hot"), "0").unwrap();
    a.ok(&["disconnect"]);
    for i in 0..1500 {
        fs::write(a.path(&format!("f{i}")), format!("{i}")).unwrap();
    }
    fs::write(a.path("hot"), "offline").unwrap();
    let (venus, cache) = (bin("venus"), a.cache.clone());
    let rc = std::thread::spawn(move || {
        std::process::Command::new(venus).args(["reconnect", "--cache"]).arg(cache).output().unwrap()
    });
    let mut k = 0;
    let mut during = Vec::new();
    while !rc.is_finished() {
        k += 1;
        fs::write(a.path("hot"), format!("during {k}")).unwrap();
        fs::write(a.path(&format!("g{k}")), format!("g{k}")).unwrap();
        if k % 3 == 0 {
            fs::rename(a.path(&format!("g{k}")), a.path(&format!("h{k}"))).unwrap();
        }
        during.push(a.status()["state"].as_str().unwrap().to_string());
        std::thread::sleep(Duration::from_millis(20));
    }
    during.dedup();
    eprintln!("{k} writes during reintegration; states {during:?}");
    rc.join().unwrap();
    a.wait_reintegrated(Duration::from_secs(20));
    conflicts(&a);
    assert_eq!(a.status()["conflicts"], 0);
    assert_eq!(fs::read_to_string(afsd.export.join("hot")).unwrap(), format!("during {k}"));
    for j in 1..=k {
        let name = if j % 3 == 0 { format!("h{j}") } else { format!("g{j}") };
        assert_eq!(fs::read_to_string(afsd.export.join(&name)).ok(), Some(format!("g{j}")), "{name}");
    }
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
}

/// venus SIGKILLed mid-reintegration of a log of mixed operations.
#[test]
fn venus_killed_mid_mixed_reintegration() {
    for (round, delay_ms) in [0u64, 50, 200, 500].into_iter().enumerate() {
        let dir = TestDir::new(&format!("rv-vkill-mixed-{round}"));
        let afsd = Afsd::start(dir.path());
        let mut a = seeded(&dir, &afsd, "a");
        fs::create_dir(a.path("docs")).unwrap();
        for i in 0..1000 {
            fs::write(a.path(&format!("docs/doc{i}")), format!("doc{i} v0")).unwrap();
        }
        let _ = snapshot(&a.mountpoint);
        a.ok(&["disconnect"]);
        for i in 0..1000 {
            let d = format!("docs/doc{i}");
            match i % 5 {
                0 => {
                    fs::write(a.path(&format!("docs/.tmp{i}")), format!("doc{i} saved offline")).unwrap();
                    fs::rename(a.path(&format!("docs/.tmp{i}")), a.path(&d)).unwrap();
                }
                1 => {
                    fs::set_permissions(a.path(&d), fs::Permissions::from_mode(0o600)).unwrap();
                    set_mtime(&a.path(&d), 1_000_000_000 + i as u64);
                }
                2 => {
                    fs::create_dir(a.path(&format!("docs/dir{i}"))).unwrap();
                    fs::rename(a.path(&d), a.path(&format!("docs/dir{i}/moved"))).unwrap();
                    fs::hard_link(a.path(&format!("docs/dir{i}/moved")), a.path(&format!("docs/dir{i}/link"))).unwrap();
                }
                3 => fs::remove_file(a.path(&d)).unwrap(),
                _ => {
                    fs::write(a.path(&d), "rewritten").unwrap();
                    std::os::unix::fs::symlink(format!("doc{i}"), a.path(&format!("docs/sym{i}"))).unwrap();
                }
            }
        }
        let expected = snapshot(&a.mountpoint);
        let total = a.status()["cml_records"].as_u64().unwrap();
        let left = a.kill_during_reintegration(total, Duration::from_millis(delay_ms));
        eprintln!("round {round}: {total} records, killed with ~{left} left");
        a.restart();
        assert!(
            eventually(Duration::from_secs(60), || {
                let s = a.status();
                s["state"] == "connected" && s["cml_records"] == 0
            }),
            "round {round}: {}",
            a.status()
        );
        conflicts(&a);
        let got = snapshot(&afsd.export);
        let d: Vec<_> = got.keys().chain(expected.keys()).filter(|k| got.get(*k) != expected.get(*k)).collect();
        for k in d.iter().take(10) {
            eprintln!("  {k}: server {:?} expected {:?}", got.get(*k), expected.get(*k));
        }
        assert!(d.is_empty(), "round {round}: server differs: {d:?}");
        assert_eq!(a.status()["conflicts"], 0, "round {round}");
        assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
    }
}

/// After reintegrating an offline truncate, the file should be clean: no
/// extra store of its content afterwards.
#[test]
fn truncate_offline_leaves_file_dirty() {
    let dir = TestDir::new("rv-trunc-dirty");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    fs::write(a.path("t"), "0123456789").unwrap();
    a.ok(&["disconnect"]);
    truncate(&a.path("t"), 3);
    let stores0 = afsd.rpcs("store");
    let s = reconnect(&a);
    assert_eq!(s["conflicts"], 0);
    eprintln!("dirty_files right after: {} stores {}", s["dirty_files"], stores0);
    std::thread::sleep(Duration::from_secs(3));
    let s = a.status();
    let stores1 = afsd.rpcs("store");
    eprintln!("dirty_files 3s later: {} stores {}", s["dirty_files"], stores1);
    assert_eq!(fs::read_to_string(afsd.export.join("t")).unwrap(), "012");
    assert_eq!(stores1, stores0, "an extra whole-file store after reintegration");
}

/// The same, then venus SIGKILLed right after reintegration.
#[test]
fn truncate_offline_then_kill_after_reintegration() {
    let mut hits = 0;
    for round in 0..4 {
        let dir = TestDir::new(&format!("rv-trunc-kill-{round}"));
        let afsd = Afsd::start(dir.path());
        let mut a = seeded(&dir, &afsd, "a");
        for i in 0..20 {
            fs::write(a.path(&format!("t{i}")), "0123456789").unwrap();
        }
        a.ok(&["disconnect"]);
        for i in 0..20 {
            truncate(&a.path(&format!("t{i}")), 3);
        }
        a.ok(&["reconnect"]);
        // the keeper's store_dirty runs right after reintegration
        std::thread::sleep(Duration::from_millis(100 * round));
        a.kill();
        a.restart();
        std::thread::sleep(Duration::from_secs(3));
        let s = a.status();
        eprintln!("round {round}: {s}");
        if s["conflicts"].as_u64().unwrap() > 0 {
            conflicts(&a);
            hits += 1;
        }
        for i in 0..20 {
            assert_eq!(fs::read_to_string(afsd.export.join(format!("t{i}"))).unwrap(), "012");
        }
    }
    assert_eq!(hits, 0, "spurious conflicts in {hits} of 4 rounds");
}

/// A renames d->e offline and edits d/x; B removes d/x and d meanwhile.
/// A's edit must survive as a conflict with its content.
#[test]
fn rename_dir_offline_server_removed_it() {
    let dir = TestDir::new("rv-rename-removed");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    fs::create_dir(a.path("d")).unwrap();
    fs::write(a.path("d/x"), "x0").unwrap();
    let _ = snapshot(&a.mountpoint);
    let _ = snapshot(&b.mountpoint);
    a.ok(&["disconnect"]);
    fs::write(a.path("d/x"), "x1 by A").unwrap();
    fs::write(a.path("d/y"), "y new by A").unwrap();
    fs::rename(a.path("d"), a.path("e")).unwrap();
    fs::remove_dir_all(b.path("d")).unwrap();
    let s = reconnect(&a);
    let c = conflicts(&a);
    eprintln!("server: {:?}", snapshot(&afsd.export).keys().collect::<Vec<_>>());
    assert_eq!(s["cml_records"], 0);
    let mut kept = Vec::new();
    for x in c["conflicts"].as_array().unwrap() {
        if let Some(p) = x["local_copy"].as_str() {
            kept.push(fs::read_to_string(p).unwrap());
        }
    }
    eprintln!("kept: {kept:?}");
    assert!(kept.contains(&"x1 by A".to_string()), "A's edit of x lost");
    assert!(kept.contains(&"y new by A".to_string()), "A's new y lost");
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
}

/// A renames dir d->e offline; B creates e meanwhile. Rename collision of
/// directories, resolved --keep both, then --keep local on a second one.
#[test]
fn dir_rename_collision_resolve() {
    let dir = TestDir::new("rv-dir-collision");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    for n in ["d1", "d2"] {
        fs::create_dir(a.path(n)).unwrap();
        fs::write(a.path(&format!("{n}/x")), "x0").unwrap();
    }
    let _ = snapshot(&a.mountpoint);
    let _ = snapshot(&b.mountpoint);
    a.ok(&["disconnect"]);
    fs::rename(a.path("d1"), a.path("e1")).unwrap();
    fs::write(a.path("e1/x"), "x1 by A").unwrap();
    fs::rename(a.path("d2"), a.path("e2")).unwrap();
    fs::create_dir(b.path("e1")).unwrap();
    fs::write(b.path("e1/b"), "B").unwrap();
    fs::create_dir(b.path("e2")).unwrap();
    let s = reconnect(&a);
    let c = conflicts(&a);
    eprintln!("server: {:?}", snapshot(&afsd.export).keys().collect::<Vec<_>>());
    assert_eq!(s["cml_records"], 0);
    assert_eq!(s["conflicts"], 2, "{c}");
    assert_eq!(
        fs::read_to_string(afsd.export.join("d1/x")).ok().as_deref(),
        Some("x1 by A"),
        "edit went to the object"
    );
    let r = resolve(&a, "e1", &["--keep", "both"]);
    assert!(r.status.success());
    let r = resolve(&a, "e2", &["--keep", "local"]);
    assert!(r.status.success());
    eprintln!("server: {:?}", snapshot(&afsd.export).keys().collect::<Vec<_>>());
    assert!(afsd.export.join("e2/x").exists());
    assert!(eventually(Duration::from_secs(5), || tree_diff(&a.mountpoint, &afsd.export).is_empty()));
}

/// Directories created and removed offline leave nothing behind, not even
/// in venus's cache index.
#[test]
fn mkdir_rmdir_offline_leaves_no_dirty_nodes() {
    let dir = TestDir::new("rv-mkrm");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    a.ok(&["disconnect"]);
    for i in 0..10 {
        fs::create_dir(a.path(&format!("x{i}"))).unwrap();
        fs::remove_dir(a.path(&format!("x{i}"))).unwrap();
    }
    let s = a.status();
    eprintln!("offline: cml {} dirty {} objects {}", s["cml_records"], s["dirty_files"], s["objects"]);
    let s = reconnect(&a);
    std::thread::sleep(Duration::from_secs(3));
    let s2 = a.status();
    eprintln!("after: dirty {} objects {}", s2["dirty_files"], s2["objects"]);
    assert_eq!(s["cml_records"], 0);
    assert_eq!(s2["dirty_files"], 0, "{s2}");
}

/// A makes directory x (with files, nested) offline; B made a file x.
#[test]
fn offline_dir_vs_server_file() {
    let dir = TestDir::new("rv-dir-vs-file");
    let afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let b = seeded(&dir, &afsd, "b");
    a.ok(&["disconnect"]);
    fs::create_dir_all(a.path("x/sub")).unwrap();
    fs::write(a.path("x/f"), "f by A").unwrap();
    fs::write(a.path("x/sub/g"), "g by A").unwrap();
    fs::write(b.path("x"), "file by B").unwrap();
    let s = reconnect(&a);
    let c = conflicts(&a);
    assert_eq!(s["cml_records"], 0);
    let mut kept = Vec::new();
    for x in c["conflicts"].as_array().unwrap() {
        if let Some(p) = x["local_copy"].as_str() {
            kept.push(fs::read_to_string(p).unwrap());
        }
    }
    eprintln!("kept: {kept:?}");
    assert!(kept.contains(&"f by A".to_string()) && kept.contains(&"g by A".to_string()));
    for x in c["conflicts"].as_array().unwrap() {
        let p = x["path"].as_str().unwrap().trim_start_matches('/').to_string();
        let r = resolve(&a, &p, &["--keep", "server"]);
        assert!(r.status.success(), "--keep server of {p} fails");
    }
}

/// Connected: a file created, afsd SIGKILLed right away and restarted, then
/// the file written and closed. Whether venus noticed the restart before the
/// fsync (and logged the file, to reintegrate a moment later) or not, the
/// fsync succeeds and the server ends up with every byte, once.
#[test]
fn connected_create_then_afsd_sigkill_then_write() {
    let dir = TestDir::new("rv-conn-create-kill");
    let mut afsd = Afsd::start(dir.path());
    let a = seeded(&dir, &afsd, "a");
    let mut f = fs::File::create(a.path("new")).unwrap();
    afsd.kill();
    afsd.restart();
    a.wait_state("connected", Duration::from_secs(30));
    f.write_all(b"written after the server restart").unwrap();
    let r = f.sync_all();
    drop(f);
    eprintln!("fsync: {r:?}");
    assert!(r.is_ok());
    assert!(
        eventually(Duration::from_secs(30), || {
            let s = a.status();
            s["state"] == "connected" && s["cml_records"] == 0 && s["dirty_files"] == 0
        }),
        "{}",
        a.status()
    );
    assert_eq!(conflicts(&a)["conflicts"].as_array().unwrap().len(), 0);
    assert_eq!(fs::read_to_string(afsd.export.join("new")).unwrap(), "written after the server restart");
}

/// A close that decided to log a new file's store under its local fid,
/// and logged it just after reintegration gave the file its server fid and
/// rewrote the log: the store went in under the old local fid, whose
/// container name venus drops within 2 s, and its content was lost ("the
/// cached content of a logged store is missing"; seen once in a full run of
/// the suite, in `writes_during_reintegration`). The failpoint holds every
/// logged close for 3 s before it reaches the log, while `reconnect`
/// creates the file on the server.
#[test]
fn a_close_logged_as_reintegration_renumbers_the_file_keeps_its_content() {
    let dir = TestDir::new("rv-close-renumbered");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start_env(
        dir.path(),
        "a",
        &afsd,
        &[("VENUS_FAILPOINT", "before-log-store"), ("VENUS_FAILPOINT_MS", "3000")],
    );
    assert!(fs::read_dir(&a.mountpoint).unwrap().count() == 0);
    a.ok(&["disconnect"]);
    let mut f = fs::File::create(a.path("new")).unwrap();
    f.write_all(b"written offline").unwrap();
    // The close: logged after a 3 s pause.
    let closing = std::thread::spawn(move || drop(f));
    std::thread::sleep(Duration::from_millis(100));
    a.ok(&["reconnect"]);
    closing.join().unwrap();
    a.wait_reintegrated(Duration::from_secs(20));
    // Past the drop of the old container names.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(conflicts(&a)["conflicts"].as_array().map(Vec::len), Some(0));
    assert_eq!(fs::read_to_string(afsd.export.join("new")).ok().as_deref(), Some("written offline"));
    assert_eq!(fs::read_to_string(a.path("new")).unwrap(), "written offline");
}
