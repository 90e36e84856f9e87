//! venus over real FUSE mounts of the real binaries, connected.

use crate::support::{drop_kernel_caches, total_rpcs, Afsd, TestDir, VenusMount};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::time::Duration;

#[test]
fn close_to_open_between_two_mounts() {
    let dir = TestDir::new("close-to-open");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);

    fs::create_dir_all(a.path("docs/deep")).unwrap();
    fs::write(a.path("docs/deep/note.txt"), "written on A").unwrap();
    assert_eq!(fs::read_to_string(b.path("docs/deep/note.txt")).unwrap(), "written on A");
    assert_eq!(fs::read_to_string(afsd.export.join("docs/deep/note.txt")).unwrap(), "written on A");

    // B changes it; A's next open sees B's version.
    fs::write(b.path("docs/deep/note.txt"), "B was here").unwrap();
    assert_eq!(fs::read_to_string(a.path("docs/deep/note.txt")).unwrap(), "B was here");

    // Namespace changes show up on the other side too.
    fs::rename(a.path("docs/deep/note.txt"), a.path("docs/moved.txt")).unwrap();
    assert!(!b.path("docs/deep/note.txt").exists());
    assert_eq!(fs::read_to_string(b.path("docs/moved.txt")).unwrap(), "B was here");
    fs::remove_file(b.path("docs/moved.txt")).unwrap();
    assert!(!a.path("docs/moved.txt").exists(), "a cached negative/positive entry was invalidated");
    let names: Vec<_> = fs::read_dir(a.path("docs")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["deep"]);
}

#[test]
fn an_open_reader_keeps_its_copy_until_it_reopens() {
    let dir = TestDir::new("open-copy");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    fs::write(a.path("f"), "version one").unwrap();

    let mut reader = fs::File::open(b.path("f")).unwrap();
    let mut first = String::new();
    reader.read_to_string(&mut first).unwrap();
    assert_eq!(first, "version one");

    let breaks_before = afsd.stats()["breaks_sent"].as_u64().unwrap();
    fs::write(a.path("f"), "version two, longer").unwrap();
    assert!(
        crate::support::eventually(Duration::from_secs(5), || afsd.stats()["breaks_sent"].as_u64().unwrap()
            > breaks_before),
        "B's promise was broken"
    );
    // The open file still reads the copy it opened, and has its size.
    assert_eq!(forced_stat(&b.path("f")).1, 11, "the size of the copy that is open");
    assert_eq!(reader.metadata().unwrap().len(), 11);
    reader.seek(SeekFrom::Start(0)).unwrap();
    let mut again = String::new();
    reader.read_to_string(&mut again).unwrap();
    assert_eq!(again, "version one");
    drop(reader);
    // A new open sees the new version.
    assert_eq!(fs::read_to_string(b.path("f")).unwrap(), "version two, longer");
}

#[test]
fn a_warm_cache_costs_no_rpcs() {
    let dir = TestDir::new("warm");
    fs::create_dir_all(dir.path().join("export/src")).unwrap();
    for i in 0..100 {
        fs::write(dir.path().join(format!("export/src/file{i:03}.c")), format!("int f{i}(void) {{ return {i}; }}\n"))
            .unwrap();
    }
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let walk = || {
        let mut bytes = 0;
        let mut entries: Vec<_> = fs::read_dir(a.path("src")).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        assert_eq!(entries.len(), 100);
        for p in &entries {
            let m = fs::metadata(p).unwrap(); // stat / ls -l
            assert!(m.is_file());
            bytes += fs::read(p).unwrap().len(); // cat
        }
        // Failed lookups are answered too (a compiler's include search).
        for i in 0..50 {
            assert!(fs::metadata(a.path(&format!("src/missing{i}.h"))).is_err());
        }
        bytes
    };
    let cold = walk();
    let before = afsd.stats();
    for _ in 0..3 {
        // Make the kernel ask venus again each time.
        drop_kernel_caches();
        assert_eq!(walk(), cold);
    }
    let after = afsd.stats();
    assert_eq!(
        total_rpcs(&after),
        total_rpcs(&before),
        "warm passes made RPCs: {} then {}",
        before["rpcs"],
        after["rpcs"]
    );
    assert!(a.status()["local_hits"].as_u64().unwrap() > 300, "venus answered from its cache");
}

#[test]
fn a_restart_reuses_the_cache() {
    let dir = TestDir::new("restart-cache");
    fs::create_dir_all(dir.path().join("export/data")).unwrap();
    for i in 0..20 {
        fs::write(dir.path().join(format!("export/data/{i}")), vec![i as u8; 10_000 + i]).unwrap();
    }
    let afsd = Afsd::start(dir.path());
    let mut a = VenusMount::start(dir.path(), "a", &afsd);
    for i in 0..20 {
        assert_eq!(fs::read(a.path(&format!("data/{i}"))).unwrap().len(), 10_000 + i);
    }
    let fetches = afsd.rpcs("fetch");
    assert!(fetches >= 20);
    a.stop();
    // One file changes while A is away: only it is fetched again.
    fs::write(afsd.export.join("data/7"), "changed while away").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.restart();
    for i in 0..20 {
        let got = fs::read(a.path(&format!("data/{i}"))).unwrap();
        if i == 7 {
            assert_eq!(got, b"changed while away");
        } else {
            assert_eq!(got, vec![i as u8; 10_000 + i]);
        }
    }
    assert_eq!(afsd.rpcs("fetch"), fetches + 1, "only the changed file was fetched again");

    // And after a restart with nothing changed: no fetch at all.
    a.stop();
    a.restart();
    let before = afsd.rpcs("fetch");
    for i in 0..20 {
        fs::read(a.path(&format!("data/{i}"))).unwrap();
    }
    assert_eq!(afsd.rpcs("fetch"), before);
}

#[test]
fn eviction_keeps_the_cache_under_its_limit() {
    let dir = TestDir::new("evict");
    fs::create_dir_all(dir.path().join("export")).unwrap();
    for i in 0..12 {
        fs::write(dir.path().join(format!("export/blob{i}")), vec![b'a' + i as u8; 300 << 10]).unwrap();
    }
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start_with(dir.path(), "a", &afsd.addr, &afsd.key_path(), "1M");
    for round in 0..2 {
        for i in 0..12 {
            let data = fs::read(a.path(&format!("blob{i}"))).unwrap();
            assert_eq!(data, vec![b'a' + i as u8; 300 << 10], "round {round} blob{i}");
            let used = a.status()["cache_bytes"].as_u64().unwrap();
            assert!(used <= 1 << 20, "cache holds {used} bytes, over its 1 MiB limit");
        }
    }
    // A file that is open is never evicted from under its reader.
    let mut held = fs::File::open(a.path("blob0")).unwrap();
    for i in 1..12 {
        fs::read(a.path(&format!("blob{i}"))).unwrap();
    }
    let mut data = Vec::new();
    held.read_to_end(&mut data).unwrap();
    assert_eq!(data, vec![b'a'; 300 << 10]);

    let out = a.cli(&["cache", "flush"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let after = a.status()["cache_bytes"].as_u64().unwrap();
    assert!(after <= 300 << 10, "flush left {after} bytes (only the open file may stay)");
}

#[test]
fn exclusive_create_works_as_a_lock_between_mounts() {
    let dir = TestDir::new("lockfile");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    for round in 0..20 {
        let name = format!("job{round}.lock");
        let (pa, pb) = (a.path(&name), b.path(&name));
        let ta = std::thread::spawn(move || fs::OpenOptions::new().write(true).create_new(true).open(pa).is_ok());
        let tb = std::thread::spawn(move || fs::OpenOptions::new().write(true).create_new(true).open(pb).is_ok());
        let (wa, wb) = (ta.join().unwrap(), tb.join().unwrap());
        assert!(wa ^ wb, "round {round}: exactly one mount gets the lock (a={wa}, b={wb})");
        fs::remove_file(if wa { a.path(&name) } else { b.path(&name) }).unwrap();
    }
}

#[test]
fn ordinary_operations_behave_like_a_local_disk() {
    let dir = TestDir::new("posix");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let p = |s: &str| a.path(s);

    // O_APPEND, O_TRUNC, fsync.
    fs::write(p("log"), "one\n").unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(p("log")).unwrap();
    f.write_all(b"two\n").unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read_to_string(afsd.export.join("log")).unwrap(), "one\ntwo\n", "fsync stores at once");
    drop(f);
    let mut f = fs::OpenOptions::new().write(true).truncate(true).open(p("log")).unwrap();
    f.write_all(b"fresh").unwrap();
    drop(f);
    assert_eq!(fs::read_to_string(p("log")).unwrap(), "fresh");

    // Sparse files and writes at offsets.
    let mut f = fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(p("sparse")).unwrap();
    f.seek(SeekFrom::Start(5 << 20)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let data = fs::read(p("sparse")).unwrap();
    assert_eq!(data.len(), (5 << 20) + 3);
    assert!(data[..5 << 20].iter().all(|b| *b == 0) && &data[5 << 20..] == b"end");
    assert_eq!(fs::read(afsd.export.join("sparse")).unwrap(), data);

    // chmod, truncate, utimens.
    fs::set_permissions(p("log"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(p("log")).unwrap().permissions().mode() & 0o777, 0o640);
    assert_eq!(fs::metadata(afsd.export.join("log")).unwrap().permissions().mode() & 0o777, 0o640);
    fs::OpenOptions::new().write(true).open(p("log")).unwrap().set_len(2).unwrap();
    assert_eq!(fs::read_to_string(p("log")).unwrap(), "fr");
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options().write(true).open(p("log")).unwrap().set_modified(t).unwrap();
    assert_eq!(fs::metadata(p("log")).unwrap().modified().unwrap(), t);
    assert_eq!(fs::metadata(afsd.export.join("log")).unwrap().modified().unwrap(), t);

    // Symlinks and hard links.
    std::os::unix::fs::symlink("log", p("link")).unwrap();
    assert_eq!(fs::read_link(p("link")).unwrap().to_str(), Some("log"));
    assert_eq!(fs::read_to_string(p("link")).unwrap(), "fr");
    fs::hard_link(p("log"), p("hard")).unwrap();
    assert_eq!(fs::metadata(p("hard")).unwrap().len(), 2);

    // Rename over an existing target, across directories.
    fs::create_dir(p("d1")).unwrap();
    fs::create_dir(p("d2")).unwrap();
    fs::write(p("d1/x"), "x").unwrap();
    fs::write(p("d2/y"), "y").unwrap();
    fs::rename(p("d1/x"), p("d2/y")).unwrap();
    assert_eq!(fs::read_to_string(p("d2/y")).unwrap(), "x");
    assert!(!p("d1/x").exists());

    // Errors are the errno a program expects.
    let errno = |r: std::io::Result<()>| r.unwrap_err().raw_os_error().unwrap();
    assert_eq!(errno(fs::remove_dir(p("d2"))), libc::ENOTEMPTY);
    assert_eq!(errno(fs::create_dir(p("d2"))), libc::EEXIST);
    assert_eq!(errno(fs::remove_file(p("nope"))), libc::ENOENT);
    assert_eq!(errno(fs::remove_file(p("d2"))), libc::EISDIR);
    assert_eq!(errno(fs::remove_dir(p("log"))), libc::ENOTDIR);
    assert_eq!(errno(fs::rename(p("d1"), p("d1/inside"))), libc::EINVAL);
    assert_eq!(
        errno(fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(p("log")).map(|_| ())),
        libc::EEXIST
    );
    let st = nix_statfs(&a.mountpoint);
    assert!(st > 0, "statfs reports the server's filesystem");
}

fn nix_statfs(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_blocks
}

/// A file open only for reading shows the file's own size and times, not
/// its container's (whose mtime is when it was fetched), even when the
/// kernel asks venus again while it is open. One open for writing shows
/// its container's.
#[test]
fn a_file_open_for_reading_keeps_its_own_times() {
    use std::os::unix::fs::MetadataExt;
    let dir = TestDir::new("open-read-times");
    let afsd = Afsd::start(dir.path());
    let then = std::time::UNIX_EPOCH + Duration::from_secs(1_400_000_000);
    let f = fs::File::create(afsd.export.join("old")).unwrap();
    f.set_len(3000).unwrap();
    f.set_modified(then).unwrap();
    drop(f);
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let reader = fs::File::open(a.path("old")).unwrap();
    for _ in 0..3 {
        let (mtime, size) = forced_stat(&a.path("old"));
        assert_eq!((mtime, size), (1_400_000_000, 3000), "attributes asked for while open for reading");
        let m = reader.metadata().unwrap();
        assert_eq!((m.mtime(), m.size()), (1_400_000_000, 3000), "fstat of the open file");
    }
    drop(reader);
    assert_eq!(forced_stat(&a.path("old")), (1_400_000_000, 3000), "after the close");

    // Open for writing, the container is the truth.
    let mut writer = fs::OpenOptions::new().append(true).open(a.path("old")).unwrap();
    writer.write_all(&[1; 1000]).unwrap();
    assert_eq!(forced_stat(&a.path("old")).1, 4000, "the size being written");
    assert_eq!(writer.metadata().unwrap().len(), 4000);
    drop(writer);
    assert_eq!(forced_stat(&a.path("old")).1, 4000, "after the store");
    assert_eq!(fs::metadata(afsd.export.join("old")).unwrap().len(), 4000);
}

/// mtime (seconds) and size, asked of the file system itself
/// (`AT_STATX_FORCE_SYNC`), not of the kernel's cache.
fn forced_stat(p: &std::path::Path) -> (i64, u64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and out-pointer.
    let r =
        unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_STATX_FORCE_SYNC, libc::STATX_BASIC_STATS, &mut st) };
    assert_eq!(r, 0, "statx {}: {}", p.display(), std::io::Error::last_os_error());
    (st.stx_mtime.tv_sec, st.stx_size)
}

/// A setattr on a file that is open with unstored writes (cp -p sets times
/// on the open file; r+ writes then truncates) must not lose those writes.
#[test]
fn attribute_changes_on_an_open_file_keep_its_writes() {
    let dir = TestDir::new("setattr-open");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let mut f = fs::File::create(a.path("copied")).unwrap();
    f.write_all(&[b'x'; 120]).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000)).unwrap();
    fs::set_permissions(a.path("copied"), fs::Permissions::from_mode(0o600)).unwrap();
    drop(f);
    assert_eq!(fs::read(afsd.export.join("copied")).unwrap(), vec![b'x'; 120]);
    assert_eq!(fs::metadata(afsd.export.join("copied")).unwrap().permissions().mode() & 0o777, 0o600);

    fs::write(a.path("rplus"), "x".repeat(100)).unwrap();
    let mut f = fs::OpenOptions::new().read(true).write(true).open(a.path("rplus")).unwrap();
    f.write_all(b"short").unwrap();
    f.set_len(5).unwrap();
    drop(f);
    assert_eq!(fs::read_to_string(afsd.export.join("rplus")).unwrap(), "short");
    assert_eq!(fs::read_to_string(a.path("rplus")).unwrap(), "short");

    // O_TRUNC with nothing written still empties the file everywhere.
    fs::write(a.path("emptied"), "content").unwrap();
    drop(fs::OpenOptions::new().write(true).truncate(true).open(a.path("emptied")).unwrap());
    assert_eq!(fs::read(afsd.export.join("emptied")).unwrap(), b"");
}

fn mounted(p: &std::path::Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    let p = p.to_str().unwrap();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(p))
}

/// SIGTERM at any moment of start-up (before, during and right after the
/// mount) ends venus cleanly: it exits and leaves no dead mount behind.
#[test]
fn sigterm_during_startup_leaves_no_mount_behind() {
    let dir = TestDir::new("sigterm-startup");
    let afsd = Afsd::start(dir.path());
    let mountpoint = dir.path().join("m");
    fs::create_dir_all(&mountpoint).unwrap();
    for delay_ms in [0u64, 2, 5, 10, 20, 40, 80, 150] {
        let mut child = std::process::Command::new(crate::support::bin("venus"))
            .arg("mount")
            .arg(&mountpoint)
            .args(["--server", &afsd.addr, "--key"])
            .arg(afsd.key_path())
            .arg("--cache")
            .arg(dir.path().join("cache"))
            .stdout(std::process::Stdio::null())
            .env("RUST_LOG", "error")
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.is_some(), "venus still running 20 s after SIGTERM at {delay_ms} ms");
        assert!(!mounted(&mountpoint), "a mount was left behind by SIGTERM at {delay_ms} ms");
        // The mountpoint is an ordinary, working directory again.
        assert!(fs::read_dir(&mountpoint).is_ok(), "dead mount after SIGTERM at {delay_ms} ms");
    }
}

/// Sets or clears the immutable flag (`chattr +i`) of a file.
fn set_immutable(path: &std::path::Path, on: bool) {
    use std::os::fd::AsRawFd;
    const FS_IMMUTABLE_FL: libc::c_int = 0x10;
    let f = fs::File::open(path).unwrap();
    let mut flags: libc::c_int = 0;
    // SAFETY: both ioctls read or write one int (the kernel's width for
    // these flags) through a valid pointer.
    unsafe {
        assert_eq!(libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags), 0, "get flags of {path:?}");
        flags = if on { flags | FS_IMMUTABLE_FL } else { flags & !FS_IMMUTABLE_FL };
        assert_eq!(libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags), 0, "set flags of {path:?}");
    }
}

#[test]
fn a_truncating_open_that_fails_loses_nothing_and_is_not_left_open() {
    let dir = TestDir::new("failed-trunc-open");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    fs::write(a.path("f"), "kept").unwrap();
    let reader = fs::File::open(a.path("f")).unwrap();
    let entry = || -> serde_json::Value {
        let ls: serde_json::Value = serde_json::from_str(&a.ok(&["cache", "ls", "--json"])).unwrap();
        ls["objects"].as_array().unwrap().iter().find(|o| o["path"] == "/f").cloned().expect("/f is cached")
    };
    assert_eq!(entry()["open"], true, "{}", entry());
    let fid = entry()["fid"].as_u64().unwrap().to_string();
    let container = fs::read_dir(a.cache.join("containers"))
        .unwrap()
        .flat_map(|shard| fs::read_dir(shard.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str() == Some(fid.as_str()))
        .expect("the container of /f");

    // The container cannot be emptied, so the truncating open fails.
    set_immutable(&container, true);
    let opened = fs::OpenOptions::new().write(true).truncate(true).open(a.path("f"));
    set_immutable(&container, false);
    assert!(opened.is_err(), "an immutable container was emptied");

    // Once the reader closes, nothing holds the file open.
    drop(reader);
    assert!(
        crate::support::eventually(Duration::from_secs(10), || entry()["open"] == false),
        "the failed open is still counted: {}",
        entry()
    );
    assert_eq!(fs::read_to_string(a.path("f")).unwrap(), "kept");
}
