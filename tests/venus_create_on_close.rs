//! Files created without `O_EXCL` reach the server at their first close
//! (`venus/src/deferred.rs`): one request where a create and a store were
//! two, and every path that needs the server to know the file earlier
//! (renames, removals, a disconnection, a name taken meanwhile) still keeps
//! what was written.

use crate::support::{eventually, Afsd, TestDir, VenusMount};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

/// Opens `path` the way `open(O_WRONLY | O_CREAT | O_TRUNC)` does (no O_EXCL).
fn create(path: &std::path::Path) -> fs::File {
    fs::OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap()
}

/// Lists a directory through the mount: venus defers a create to its close
/// only in a directory whose listing it holds.
fn list(dir: &std::path::Path) {
    fs::read_dir(dir).unwrap().for_each(drop);
}

/// A child process (`dd`) that creates or truncates `path` (`O_CREAT |
/// O_TRUNC`, no `O_EXCL`) and writes to it what comes on its stdin, until
/// that ends. A descriptor the test process held would be inherited by the
/// processes other tests fork meanwhile, and each `exec` would close it: a
/// close, and so a store, of its own. (`dd` opens its output as fd 1,
/// closed for it, so it needs no `dup2` and no close of a spare copy.)
fn writer_child(path: &std::path::Path) -> std::process::Child {
    std::process::Command::new("sh")
        .args(["-c", "exec dd of=\"$1\" bs=1M status=none >&-", "sh"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Writes `data` to `path` from a `writer_child`, and waits for its close.
fn write_from_child(path: &std::path::Path, data: &[u8]) {
    let mut dd = writer_child(path);
    dd.stdin.take().unwrap().write_all(data).unwrap();
    assert!(dd.wait().unwrap().success(), "dd into {}", path.display());
}

#[test]
fn a_small_new_file_reaches_the_server_in_one_request_at_close() {
    let dir = TestDir::new("create-on-close");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    fs::create_dir(a.path("out")).unwrap();
    list(&a.path("out"));
    let (creates, stores) = (afsd.rpcs("create"), afsd.rpcs("store"));

    let mut dd = writer_child(&a.path("out/x.o"));
    let mut input = dd.stdin.take().unwrap();
    input.write_all(b"object code").unwrap();
    // Not closed yet: this mount sees the file, the server does not.
    assert!(
        eventually(Duration::from_secs(5), || fs::read(a.path("out/x.o")).is_ok_and(|d| d == b"object code")),
        "the new file never showed its content"
    );
    assert!(!afsd.export.join("out/x.o").exists(), "the server has the file before its close");
    drop(input);
    assert!(dd.wait().unwrap().success());
    // The kernel still knows the file by its local number.
    assert_eq!(a.status()["aliases"], 1);

    assert_eq!(fs::read(afsd.export.join("out/x.o")).unwrap(), b"object code");
    assert_eq!(fs::read(b.path("out/x.o")).unwrap(), b"object code");
    assert_eq!(afsd.rpcs("create"), creates + 1, "one create");
    assert_eq!(afsd.rpcs("store"), stores, "and no store: the content came with the create");
    let names: Vec<_> = fs::read_dir(a.path("out")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["x.o"]);

    // The file is an ordinary one from now on: written again, it is stored.
    write_from_child(&a.path("out/x.o"), b"relinked");
    assert_eq!(fs::read_to_string(b.path("out/x.o")).unwrap(), "relinked");
    assert_eq!(afsd.rpcs("store"), stores + 1);

    // An empty file (touch) is created at close too.
    write_from_child(&a.path("out/empty"), b"");
    assert_eq!(fs::metadata(afsd.export.join("out/empty")).unwrap().len(), 0);
    // A larger file is staged, then created with it: one commit too.
    let (creates, stores) = (afsd.rpcs("create"), afsd.rpcs("store"));
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    write_from_child(&a.path("out/big"), &big);
    assert_eq!((afsd.rpcs("create"), afsd.rpcs("store")), (creates + 1, stores));
    assert_eq!(fs::read(afsd.export.join("out/big")).unwrap(), big);
    assert_eq!(fs::read(b.path("out/big")).unwrap(), big);
    // Those numbers are forgotten with the kernel's inodes.
    crate::support::drop_kernel_caches();
    assert!(eventually(Duration::from_secs(10), || a.status()["aliases"] == 0), "{}", a.status());
}

/// Closes `f` and returns what `close(2)` said (dropping a `File` ignores it).
fn close(f: fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: the descriptor is owned here and closed once.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Two closes of one new file at once: a forked child closes its inherited
/// copy of the descriptor at `exec` while the parent writes on and closes
/// its own. The first close creates the file on the server; the second
/// used to store in the middle of that create, based on the version from
/// before it: a conflict with itself, and EIO from `close`. The failpoint
/// holds the first close inside the create, just after the file got its
/// server number, where the second came in.
#[test]
fn two_closes_of_a_new_file_at_once_store_it_once_without_a_conflict() {
    let dir = TestDir::new("create-on-close-two-closes");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start_env(dir.path(), "a", &afsd, &[("VENUS_FAILPOINT", "renumbered")]);
    fs::create_dir(a.path("out")).unwrap();
    list(&a.path("out"));
    let (creates, stores) = (afsd.rpcs("create"), afsd.rpcs("store"));

    let mut f = create(&a.path("out/two"));
    f.write_all(b"first").unwrap();
    let copy = f.try_clone().unwrap();
    let first = std::thread::spawn(move || close(copy));
    // The first close is now paused inside the create.
    assert!(
        eventually(Duration::from_secs(5), || afsd.export.join("out/two").exists()),
        "the first close did not create the file"
    );
    f.write_all(b" and second").unwrap();
    close(f).expect("the second close");
    first.join().unwrap().expect("the first close");

    assert_eq!(fs::read_to_string(afsd.export.join("out/two")).unwrap(), "first and second");
    assert_eq!(fs::read_to_string(a.path("out/two")).unwrap(), "first and second");
    assert_eq!(a.status()["conflicts"], 0, "{}", a.status());
    assert_eq!(afsd.rpcs("create"), creates + 1, "one create");
    assert_eq!(afsd.rpcs("store"), stores + 1, "and one store of what was written after it");
}

/// A file created at close gets its server number, and its container a
/// second name; the old one is dropped within 2 s, which moves the
/// container's ctime. That is no write: the close of a second open of the
/// file after it stores nothing.
#[test]
fn dropping_a_new_files_old_container_name_is_not_a_write() {
    let dir = TestDir::new("create-on-close-rename");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    fs::create_dir(a.path("out")).unwrap();
    list(&a.path("out"));
    let mut f = create(&a.path("out/obj"));
    f.write_all(&vec![7u8; 100_000]).unwrap();
    let g = fs::OpenOptions::new().write(true).open(a.path("out/obj")).unwrap();
    drop(f);
    assert_eq!(fs::read(afsd.export.join("out/obj")).unwrap(), vec![7u8; 100_000], "on the server at the first close");
    let stores = afsd.rpcs("store");
    // venus drops old container names every 2 s.
    std::thread::sleep(Duration::from_millis(4500));
    drop(g);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(afsd.rpcs("store"), stores, "the second close stored the unchanged file again");
}

#[test]
fn a_file_not_yet_on_the_server_can_be_renamed_changed_and_removed_while_open() {
    let dir = TestDir::new("create-on-close-edits");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    fs::create_dir(a.path("d")).unwrap();
    list(&a.path("d"));

    // Renamed while open: the server learns the file first, then the rename.
    let mut f = create(&a.path("d/tmp"));
    f.write_all(b"first half ").unwrap();
    fs::rename(a.path("d/tmp"), a.path("d/final")).unwrap();
    f.write_all(b"second half").unwrap();
    drop(f);
    assert!(!afsd.export.join("d/tmp").exists());
    assert_eq!(fs::read_to_string(b.path("d/final")).unwrap(), "first half second half");

    // chmod and truncate while open.
    let mut f = create(&a.path("d/script"));
    f.write_all(b"#!/bin/sh\necho hi\nrest").unwrap();
    fs::set_permissions(a.path("d/script"), fs::Permissions::from_mode(0o755)).unwrap();
    f.set_len(18).unwrap();
    drop(f);
    assert_eq!(fs::read_to_string(b.path("d/script")).unwrap(), "#!/bin/sh\necho hi\n");
    assert_eq!(fs::metadata(b.path("d/script")).unwrap().permissions().mode() & 0o777, 0o755);

    // Removed while open: gone everywhere once closed.
    let mut f = create(&a.path("d/scratch"));
    f.write_all(b"scratch").unwrap();
    fs::remove_file(a.path("d/scratch")).unwrap();
    drop(f);
    assert!(!a.path("d/scratch").exists());
    assert!(!b.path("d/scratch").exists());
    assert!(!afsd.export.join("d/scratch").exists());

    // A directory holding a file not yet on the server is not empty.
    fs::create_dir(a.path("d/sub")).unwrap();
    list(&a.path("d/sub"));
    let f = create(&a.path("d/sub/keep"));
    let err = fs::remove_dir(a.path("d/sub")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTEMPTY), "{err}");
    drop(f);
    assert!(b.path("d/sub/keep").exists());
}

#[test]
fn a_name_another_client_takes_before_the_close_keeps_both_files() {
    let dir = TestDir::new("create-on-close-race");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    list(&a.path(""));

    let mut f = create(&a.path("report"));
    f.write_all(b"A's report").unwrap();
    fs::write(b.path("report"), "B's report").unwrap();
    let err = f.sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "the fsync (which creates the file) reports the clash: {err}");
    // Written after the clash: kept in the conflict's copy at the close.
    f.write_all(b", revised").unwrap();
    drop(f);
    assert_eq!(a.status()["cml_records"], 0, "nothing logged for a file the server refused");

    assert_eq!(fs::read_to_string(afsd.export.join("report")).unwrap(), "B's report");
    assert_eq!(fs::read_to_string(a.path("report")).unwrap(), "B's report");
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["conflicts", "list", "--json"])).unwrap();
    assert_eq!(list["conflicts"].as_array().unwrap().len(), 1, "{list}");
    let c = &list["conflicts"][0];
    assert_eq!((&c["path"], &c["kind"]), (&"/report".into(), &"create/create".into()), "{c}");
    assert_eq!(fs::read_to_string(c["local_copy"].as_str().unwrap()).unwrap(), "A's report, revised");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(a.status()["cml_records"], 0);
    assert_eq!(a.status()["conflicts"], 1);
}

#[test]
fn a_file_whose_server_is_gone_at_its_close_is_logged_and_reintegrated() {
    let dir = TestDir::new("create-on-close-offline");
    let mut afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    list(&a.path(""));

    let mut f = create(&a.path("notes"));
    f.write_all(b"written ").unwrap();
    // (`venus disconnect` would not do here: running any program closes
    // the descriptors it inherits, and that close creates the file.)
    afsd.kill();
    f.write_all(b"offline").unwrap();
    drop(f);
    assert_eq!(a.status()["state"], "disconnected");
    assert!(a.status()["cml_records"].as_u64().unwrap() >= 1, "the create is logged");
    assert!(!afsd.export.join("notes").exists());
    assert_eq!(fs::read_to_string(a.path("notes")).unwrap(), "written offline");

    afsd.restart();
    assert!(eventually(Duration::from_secs(30), || a.status()["cml_records"] == 0));
    assert_eq!(fs::read_to_string(afsd.export.join("notes")).unwrap(), "written offline");
    assert_eq!(fs::read_to_string(a.path("notes")).unwrap(), "written offline");
    let b = VenusMount::start(dir.path(), "b", &afsd);
    assert_eq!(fs::read_to_string(b.path("notes")).unwrap(), "written offline");
}

#[test]
fn a_file_open_when_venus_is_killed_is_created_after_the_restart() {
    let dir = TestDir::new("create-on-close-crash");
    let afsd = Afsd::start(dir.path());
    let mut a = VenusMount::start(dir.path(), "a", &afsd);
    list(&a.path(""));

    let mut f = create(&a.path("draft"));
    f.write_all(b"kept through a crash").unwrap();
    // The local record reaches the disk within sled's flush interval.
    std::thread::sleep(Duration::from_millis(1500));
    a.kill();
    drop(f);
    a.restart();
    assert!(eventually(Duration::from_secs(20), || a.status()["cml_records"] == 0));
    assert_eq!(fs::read_to_string(afsd.export.join("draft")).unwrap(), "kept through a crash");
    assert_eq!(fs::read_to_string(a.path("draft")).unwrap(), "kept through a crash");
}

#[test]
fn a_create_whose_reply_a_server_crash_lost_runs_once_and_keeps_the_content() {
    let dir = TestDir::new("create-on-close-lost-reply");
    let mut afsd = Afsd::start_with(dir.path(), &[("AFSD_FAILPOINT", "crash-before-reply:create")]);
    let a = VenusMount::start(dir.path(), "a", &afsd);
    list(&a.path(""));

    // The server commits the create, content and all, and dies before its
    // reply: venus logs the create under the same transaction id.
    let mut f = create(&a.path("result"));
    f.write_all(b"computed").unwrap();
    drop(f);
    assert!(afsd.wait_exit(Duration::from_secs(10)), "afsd should abort at the failpoint");
    assert!(a.status()["cml_records"].as_u64().unwrap() >= 1, "the create is logged");

    afsd.set_env(&[]);
    afsd.restart();
    a.wait_reintegrated(Duration::from_secs(30));
    assert_eq!(fs::read_to_string(afsd.export.join("result")).unwrap(), "computed");
    assert_eq!(fs::read_to_string(a.path("result")).unwrap(), "computed");
    let list: serde_json::Value = serde_json::from_str(&a.ok(&["conflicts", "list", "--json"])).unwrap();
    assert_eq!(list["conflicts"].as_array().unwrap().len(), 0, "not a conflict with itself: {list}");
    let names: Vec<_> = fs::read_dir(&afsd.export).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["result"], "created once");
}

#[test]
fn files_created_on_close_are_not_stored_again_after_a_restart() {
    let dir = TestDir::new("create-on-close-restart");
    let afsd = Afsd::start(dir.path());
    let mut a = VenusMount::start(dir.path(), "a", &afsd);
    list(&a.path(""));
    for i in 0..20 {
        fs::write(a.path(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    // Past the flush that drops the containers' old names.
    std::thread::sleep(Duration::from_millis(2500));
    let (creates, stores) = (afsd.rpcs("create"), afsd.rpcs("store"));
    a.stop();
    a.restart();
    std::thread::sleep(Duration::from_millis(2500));
    for i in 0..20 {
        assert_eq!(fs::read_to_string(a.path(&format!("f{i}"))).unwrap(), format!("file {i}"));
    }
    assert_eq!((afsd.rpcs("create"), afsd.rpcs("store")), (creates, stores), "nothing sent again");
    assert_eq!(a.status()["conflicts"], 0);
}

/// venus's 2-second sweep creates on the server the deferred files no
/// handle holds (their last close failed). A file between its deferred
/// create and the open that follows is held by no handle yet: the sweep
/// used to take it for such a file, create it on the server and renumber
/// it under the open, which then failed with EIO ("node vanished"; seen
/// once in tens of thousands of creates under load). The failpoint holds
/// each create there for 500 ms, so the sweep comes by during the run.
#[test]
fn a_file_being_created_is_not_taken_for_an_orphan_by_the_sweep() {
    let dir = TestDir::new("create-on-close-sweep");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start_env(dir.path(), "a", &afsd, &[("VENUS_FAILPOINT", "deferred-before-open")]);
    fs::create_dir(a.path("out")).unwrap();
    list(&a.path("out"));
    // 10 creates of 500 ms each: the sweep runs during several of them.
    for i in 0..10 {
        let name = format!("out/f{i}");
        fs::write(a.path(&name), format!("content {i}")).unwrap_or_else(|e| panic!("creating {name}: {e}"));
    }
    for i in 0..10 {
        let name = format!("out/f{i}");
        assert_eq!(
            fs::read_to_string(afsd.export.join(&name)).unwrap(),
            format!("content {i}"),
            "{name} on the server"
        );
        assert_eq!(fs::read_to_string(a.path(&name)).unwrap(), format!("content {i}"), "{name} through the mount");
    }
    assert_eq!(a.status()["conflicts"], 0, "{}", a.status());
}
