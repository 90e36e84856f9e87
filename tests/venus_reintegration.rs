//! Reintegration of offline work in the sequences that are easy to get
//! wrong: ordering, objects that come and go, crashes mid-way, and limits.
//! Each test ends with the server, the mount that was offline and a second
//! mount agreeing.

use crate::support::{assert_same_tree, eventually, snapshot, Afsd, TestDir, VenusMount};
use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// Reconnects `a` and checks the log emptied with `conflicts` conflicts.
fn reconnect(a: &VenusMount, conflicts: u64) {
    a.ok(&["reconnect"]);
    let s = a.status();
    assert_eq!(s["state"], "connected", "{s}");
    assert_eq!(s["cml_records"], 0, "{s}");
    assert_eq!(s["conflicts"], conflicts, "{s}");
}

/// A mount with a cached root listing, then taken offline.
fn offline_mount(dir: &TestDir, afsd: &Afsd) -> VenusMount {
    let a = VenusMount::start(dir.path(), "a", afsd);
    fs::write(a.path("seed"), "s").unwrap();
    assert!(fs::read_dir(&a.mountpoint).unwrap().count() > 0);
    a
}

#[test]
fn a_file_edited_then_removed_offline_leaves_no_trace() {
    let dir = TestDir::new("edit-remove");
    let afsd = Afsd::start(dir.path());
    let a = offline_mount(&dir, &afsd);
    fs::write(a.path("doomed"), "v1").unwrap();
    fs::write(a.path("kept"), "k1").unwrap();
    a.ok(&["disconnect"]);
    fs::write(a.path("doomed"), "v2, written offline").unwrap();
    fs::remove_file(a.path("doomed")).unwrap();
    fs::write(a.path("kept"), "k2, written offline").unwrap();
    // Removed while still open for writing: its last writes go nowhere.
    let mut open = fs::File::create(a.path("open-doomed")).unwrap();
    open.write_all(b"first").unwrap();
    fs::remove_file(a.path("open-doomed")).unwrap();
    open.write_all(b" and more").unwrap();
    drop(open);
    reconnect(&a, 0);
    assert!(!afsd.export.join("doomed").exists());
    assert!(!afsd.export.join("open-doomed").exists());
    assert_eq!(fs::read_to_string(afsd.export.join("kept")).unwrap(), "k2, written offline");
    let b = VenusMount::start(dir.path(), "b", &afsd);
    assert_same_tree(&a.mountpoint, &b.mountpoint, "A and B");
    assert_same_tree(&a.mountpoint, &afsd.export, "A and the export");
}

#[test]
fn renames_replay_in_their_order() {
    let dir = TestDir::new("rename-order");
    let afsd = Afsd::start(dir.path());
    let a = offline_mount(&dir, &afsd);
    fs::write(a.path("x"), "X").unwrap();
    fs::write(a.path("y"), "Y").unwrap();
    fs::write(a.path("a"), "A").unwrap();
    a.ok(&["disconnect"]);
    // A swap through a temporary name.
    fs::rename(a.path("x"), a.path("tmp")).unwrap();
    fs::rename(a.path("y"), a.path("x")).unwrap();
    fs::rename(a.path("tmp"), a.path("y")).unwrap();
    // A move, then a move into a directory made in between.
    fs::rename(a.path("a"), a.path("b")).unwrap();
    fs::create_dir(a.path("d")).unwrap();
    fs::rename(a.path("b"), a.path("d/b")).unwrap();
    reconnect(&a, 0);
    assert_eq!(fs::read_to_string(afsd.export.join("x")).unwrap(), "Y");
    assert_eq!(fs::read_to_string(afsd.export.join("y")).unwrap(), "X");
    assert_eq!(fs::read_to_string(afsd.export.join("d/b")).unwrap(), "A");
    assert!(!afsd.export.join("a").exists() && !afsd.export.join("b").exists());
    let b = VenusMount::start(dir.path(), "b", &afsd);
    assert_same_tree(&a.mountpoint, &b.mountpoint, "A and B");
    assert_same_tree(&a.mountpoint, &afsd.export, "A and the export");
}

/// An editor's save offline (write a temporary, rename it over the file)
/// while another client updated the file: neither version is lost.
#[test]
fn a_rename_over_a_file_changed_on_the_server_is_a_conflict() {
    let dir = TestDir::new("rename-over");
    let afsd = Afsd::start(dir.path());
    let a = offline_mount(&dir, &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    fs::write(a.path("doc"), "base").unwrap();
    assert_eq!(fs::read_to_string(b.path("doc")).unwrap(), "base");
    a.ok(&["disconnect"]);
    fs::write(b.path("doc"), "B's update").unwrap();
    fs::write(a.path(".doc.swp"), "A's offline edit").unwrap();
    fs::rename(a.path(".doc.swp"), a.path("doc")).unwrap();
    reconnect(&a, 1);
    assert_eq!(fs::read_to_string(afsd.export.join("doc")).unwrap(), "B's update");
    assert_eq!(fs::read_to_string(afsd.export.join(".doc.swp")).unwrap(), "A's offline edit");
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["conflicts", "list", "--json"])).unwrap();
    assert_eq!(list["conflicts"][0]["kind"], "rename collision", "{list}");
    assert_eq!(list["conflicts"][0]["path"], "/doc", "{list}");
    a.ok(&["conflicts", "resolve", a.path("doc").to_str().unwrap(), "--keep", "local"]);
    assert_eq!(fs::read_to_string(afsd.export.join("doc")).unwrap(), "A's offline edit");
    assert!(eventually(Duration::from_secs(5), || fs::read_to_string(b.path("doc")).ok().as_deref()
        == Some("A's offline edit")));
    assert_same_tree(&a.mountpoint, &b.mountpoint, "A and B");

    // Without a change on the server the same save simply goes through.
    a.ok(&["disconnect"]);
    fs::write(a.path(".doc.swp"), "A's second edit").unwrap();
    fs::rename(a.path(".doc.swp"), a.path("doc")).unwrap();
    reconnect(&a, 0);
    assert_eq!(fs::read_to_string(afsd.export.join("doc")).unwrap(), "A's second edit");
    assert!(eventually(Duration::from_secs(5), || snapshot(&a.mountpoint) == snapshot(&b.mountpoint)));
}

/// Both clients make the same directory offline and put files in it: the
/// directories merge and every file arrives.
#[test]
fn directories_made_on_both_sides_merge_with_their_contents() {
    let dir = TestDir::new("mkdir-merge");
    let afsd = Afsd::start(dir.path());
    let a = offline_mount(&dir, &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    assert!(fs::read_dir(&b.mountpoint).unwrap().count() > 0);
    a.ok(&["disconnect"]);
    b.ok(&["disconnect"]);
    for (m, who) in [(&a, "a"), (&b, "b")] {
        fs::create_dir_all(m.path("shared/deeper")).unwrap();
        fs::write(m.path(&format!("shared/from-{who}")), who).unwrap();
        fs::write(m.path(&format!("shared/deeper/from-{who}")), who).unwrap();
    }
    reconnect(&a, 0);
    reconnect(&b, 0);
    for who in ["a", "b"] {
        assert_eq!(fs::read_to_string(afsd.export.join(format!("shared/from-{who}"))).unwrap(), who);
        assert_eq!(fs::read_to_string(afsd.export.join(format!("shared/deeper/from-{who}"))).unwrap(), who);
    }
    assert!(eventually(Duration::from_secs(5), || snapshot(&a.mountpoint) == snapshot(&b.mountpoint)));
    assert_same_tree(&b.mountpoint, &afsd.export, "B and the export");
}

/// A file with two names, edited offline through one and then losing the
/// other: the edit reaches the server under the name that is left.
#[test]
fn an_edit_survives_removing_another_name_of_the_file() {
    let dir = TestDir::new("hardlink-edit");
    let afsd = Afsd::start(dir.path());
    let a = offline_mount(&dir, &afsd);
    fs::write(a.path("one"), "v0").unwrap();
    fs::hard_link(a.path("one"), a.path("two")).unwrap();
    // Connected, a store through either name keeps the two names one file.
    fs::write(a.path("two"), "v1").unwrap();
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    assert_eq!(ino(&afsd.export.join("one")), ino(&afsd.export.join("two")));
    assert_eq!(fs::read_to_string(afsd.export.join("one")).unwrap(), "v1");
    a.ok(&["disconnect"]);
    fs::write(a.path("two"), "v2, written offline").unwrap();
    fs::remove_file(a.path("one")).unwrap();
    reconnect(&a, 0);
    assert!(!afsd.export.join("one").exists());
    assert_eq!(fs::read_to_string(afsd.export.join("two")).unwrap(), "v2, written offline");
}

/// More large files than the server lets one client stage at once.
#[test]
fn many_large_files_written_offline_all_arrive() {
    let dir = TestDir::new("many-large");
    let afsd = Afsd::start(dir.path());
    let a = offline_mount(&dir, &afsd);
    a.ok(&["disconnect"]);
    // Over the inline limit, so each is staged; more than the 256 stage
    // handles afsd allows a client.
    let n = 260;
    let mut big = vec![0u8; (1 << 20) + 1];
    for i in 0..n {
        big[..8].copy_from_slice(&(i as u64).to_be_bytes());
        fs::write(a.path(&format!("big{i}")), &big).unwrap();
    }
    reconnect(&a, 0);
    for i in 0..n {
        let got = fs::read(afsd.export.join(format!("big{i}"))).unwrap();
        assert_eq!(got.len(), big.len(), "big{i}");
        assert_eq!(got[..8], (i as u64).to_be_bytes(), "big{i}");
    }
}

/// venus killed while it applies reintegration replies, at several points:
/// after a restart the rest goes through and nothing is lost or doubled.
#[test]
fn venus_killed_mid_reintegration_loses_nothing() {
    for (round, delay_ms) in [0u64, 150, 600].into_iter().enumerate() {
        let dir = TestDir::new(&format!("kill-mid-{round}"));
        let afsd = Afsd::start(dir.path());
        let mut a = offline_mount(&dir, &afsd);
        a.ok(&["disconnect"]);
        let n = 600;
        for i in 0..n {
            fs::write(a.path(&format!("f{i}")), format!("content of file {i}\n")).unwrap();
        }
        let total = a.status()["cml_records"].as_u64().unwrap();
        assert_eq!(total, 2 * n as u64, "a create and a store per file");
        a.kill_during_reintegration(total, Duration::from_millis(delay_ms));
        a.restart();
        assert!(
            eventually(Duration::from_secs(60), || {
                let s = a.status();
                s["state"] == "connected" && s["cml_records"] == 0
            }),
            "round {round}: {}",
            a.status()
        );
        assert_eq!(a.status()["conflicts"], 0);
        for i in 0..n {
            let got = fs::read_to_string(afsd.export.join(format!("f{i}")));
            assert_eq!(got.ok(), Some(format!("content of file {i}\n")), "round {round}: f{i}");
        }
        let b = VenusMount::start(dir.path(), "b", &afsd);
        assert_same_tree(&a.mountpoint, &b.mountpoint, "A and B");
    }
}
