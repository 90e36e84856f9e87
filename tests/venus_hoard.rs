//! Hoarding over real mounts: what is pinned is there when the server is not.

use crate::support::{eventually, Afsd, TestDir, VenusMount};
use std::fs;
use std::time::Duration;

#[test]
fn a_hoarded_tree_reads_offline_new_files_included() {
    let dir = TestDir::new("hoard-offline");
    for (p, c) in
        [("proj/a.txt", "alpha"), ("proj/b.txt", "bravo"), ("proj/sub/c.txt", "charlie"), ("other/cold.txt", "cold")]
    {
        let path = dir.path().join("export").join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, c).unwrap();
    }
    let mut afsd = Afsd::start(dir.path());
    let a = VenusMount::start_args(dir.path(), "a", &afsd, "4G", &["--hoard-interval", "1"]);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    a.ok(&["hoard", "add", a.path("proj").to_str().unwrap(), "--descendants", "--priority", "500"]);
    let out = a.ok(&["hoard", "walk"]);
    assert!(out.contains("4 fetched") || out.contains("fetched"), "{out}");

    // Another mount adds a file to the hoarded tree; a periodic walk picks it up.
    fs::create_dir_all(b.path("proj/sub/deeper")).unwrap();
    fs::write(b.path("proj/sub/deeper/new.txt"), "added by B").unwrap();
    let cached = |name: &str| {
        let ls: serde_json::Value = serde_json::from_str(&a.ok(&["cache", "ls", "--json"])).unwrap();
        ls["objects"].as_array().unwrap().iter().any(|o| o["path"] == name && o["cached"] == true)
    };
    assert!(eventually(Duration::from_secs(15), || cached("/proj/sub/deeper/new.txt")), "a walk fetched the new file");
    let s = a.status();
    assert!(s["hoard"]["entries"] == 1 && s["hoard"]["objects"].as_u64().unwrap() >= 7, "{s}");

    afsd.kill();
    for (p, c) in [
        ("proj/a.txt", "alpha"),
        ("proj/b.txt", "bravo"),
        ("proj/sub/c.txt", "charlie"),
        ("proj/sub/deeper/new.txt", "added by B"),
    ] {
        assert_eq!(fs::read_to_string(a.path(p)).unwrap(), c, "{p} offline");
    }
    a.wait_state("disconnected", Duration::from_secs(10));
    let err = fs::read_to_string(a.path("other/cold.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "an unhoarded, uncached file: {err}");
}

#[test]
fn a_hoard_bigger_than_the_cache_keeps_the_highest_priorities() {
    let dir = TestDir::new("hoard-limit");
    for (d, n) in [("high", 2), ("mid", 2), ("low", 3)] {
        for i in 0..n {
            let p = dir.path().join(format!("export/{d}/f{i}"));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, vec![b'a' + i as u8; 300 << 10]).unwrap();
        }
    }
    fs::write(dir.path().join("export/loose"), vec![b'z'; 300 << 10]).unwrap();
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start_with(dir.path(), "a", &afsd.addr, &afsd.key_path(), "1M");
    // Something unhoarded in the cache first: it must give way.
    assert_eq!(fs::read(a.path("loose")).unwrap().len(), 300 << 10);
    a.ok(&["hoard", "add", a.path("high").to_str().unwrap(), "--children", "--priority", "900"]);
    a.ok(&["hoard", "add", a.path("mid").to_str().unwrap(), "--children", "--priority", "500"]);
    a.ok(&["hoard", "add", a.path("low").to_str().unwrap(), "--children", "--priority", "100"]);
    let out = a.ok(&["hoard", "walk"]);
    assert!(out.contains("did not fit in the cache: /low/"), "the walk reports what did not fit:\n{out}");
    assert!(!out.contains("did not fit in the cache: /high/"), "{out}");
    let s = a.status();
    assert!(s["cache_bytes"].as_u64().unwrap() <= 1 << 20, "{s}");
    let ls: serde_json::Value = serde_json::from_str(&a.ok(&["cache", "ls", "--json"])).unwrap();
    let cached: Vec<&str> = ls["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["cached"] == true)
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    for p in ["/high/f0", "/high/f1"] {
        assert!(cached.contains(&p), "{p} (highest priority) is cached: {cached:?}");
    }
    assert!(!cached.contains(&"/loose"), "the unhoarded file was evicted first: {cached:?}");
    assert!(!cached.iter().any(|p| p.starts_with("/low/")), "lowest priority left out: {cached:?}");
}

#[test]
fn a_saved_profile_loads_into_a_fresh_cache() {
    let dir = TestDir::new("hoard-profile");
    fs::create_dir_all(dir.path().join("export/docs/papers")).unwrap();
    fs::write(dir.path().join("export/docs/todo"), "x").unwrap();
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    a.ok(&["hoard", "add", a.path("docs").to_str().unwrap(), "--children", "--priority", "300"]);
    a.ok(&["hoard", "add", a.path("docs/papers").to_str().unwrap(), "--descendants", "--priority", "900"]);
    a.ok(&["hoard", "add", a.path("docs/todo").to_str().unwrap()]);
    let profile = dir.path().join("profile.txt");
    a.ok(&["hoard", "save", profile.to_str().unwrap()]);
    let text = fs::read_to_string(&profile).unwrap();
    assert!(text.contains("/docs/papers 900 descendants"), "{text}");

    let b = VenusMount::start(dir.path(), "b", &afsd);
    b.ok(&["hoard", "load", profile.to_str().unwrap()]);
    let list =
        |m: &VenusMount| -> serde_json::Value { serde_json::from_str(&m.ok(&["hoard", "ls", "--json"])).unwrap() };
    assert_eq!(list(&a), list(&b));
    // Bad profiles are refused with a clear message, and change nothing.
    fs::write(&profile, "/ok 5 descendants\nrelative/path 5\n").unwrap();
    let out = b.cli(&["hoard", "load", profile.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(list(&a), list(&b));
}
