//! Disconnected operation, reintegration and conflicts, over real mounts.

use crate::support::{assert_same_tree, eventually, snapshot, Afsd, TestDir, VenusMount};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// A tree both mounts see.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("proj/src")).unwrap();
    fs::create_dir_all(root.join("proj/old")).unwrap();
    fs::write(root.join("proj/README"), "readme v1\n").unwrap();
    fs::write(root.join("proj/src/main.c"), "int main() { return 0; }\n").unwrap();
    fs::write(root.join("proj/src/util.c"), "void util() {}\n").unwrap();
    fs::write(root.join("proj/old/legacy.c"), "/* legacy */\n").unwrap();
    fs::write(root.join("proj/notes"), "notes\n").unwrap();
}

/// The offline session every disconnection scenario runs on A's mount.
fn offline_edits(root: &Path) {
    fs::write(root.join("proj/README"), "readme v2, written offline\n").unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(root.join("proj/src/main.c")).unwrap();
    f.write_all(b"/* appended offline */\n").unwrap();
    drop(f);
    fs::write(root.join("proj/src/new.c"), "int added_offline;\n").unwrap();
    fs::create_dir(root.join("proj/include")).unwrap();
    fs::write(root.join("proj/include/api.h"), "#pragma once\n").unwrap();
    fs::rename(root.join("proj/src/util.c"), root.join("proj/include/util.c")).unwrap();
    fs::remove_file(root.join("proj/old/legacy.c")).unwrap();
    fs::remove_dir(root.join("proj/old")).unwrap();
    fs::rename(root.join("proj/notes"), root.join("proj/NOTES.txt")).unwrap();
    fs::set_permissions(root.join("proj/NOTES.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("src/main.c", root.join("proj/entry")).unwrap();
    // A file created and deleted offline leaves nothing.
    fs::write(root.join("proj/scratch"), "temporary").unwrap();
    fs::remove_file(root.join("proj/scratch")).unwrap();
}

#[test]
fn offline_by_command_then_reconnect_matches_everywhere() {
    let dir = TestDir::new("offline-command");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    make_tree(&a.mountpoint);
    assert_same_tree(&a.mountpoint, &b.mountpoint, "before");

    a.ok(&["disconnect"]);
    let rpcs_before = crate::support::total_rpcs(&afsd.stats());
    offline_edits(&a.mountpoint);
    let s = a.status();
    assert_eq!(s["state"], "disconnected");
    assert!(s["cml_records"].as_u64().unwrap() >= 8, "{s}");
    assert_eq!(crate::support::total_rpcs(&afsd.stats()), rpcs_before, "nothing reached the server while offline");
    assert!(afsd.export.join("proj/old/legacy.c").exists());

    a.ok(&["reconnect"]);
    let s = a.status();
    assert_eq!(s["state"], "connected");
    assert_eq!(s["cml_records"], 0);
    assert_eq!(s["conflicts"], 0);
    assert_same_tree(&a.mountpoint, &afsd.export, "A vs server");
    assert_same_tree(&b.mountpoint, &afsd.export, "B vs server");
}

#[test]
fn a_killed_server_is_noticed_and_reintegration_is_automatic() {
    let dir = TestDir::new("offline-kill");
    let mut afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    make_tree(&a.mountpoint);
    afsd.kill();
    // The first change after the loss may wait for the request to time out;
    // it must not hang, and venus must say it is offline within seconds.
    let t = Instant::now();
    offline_edits(&a.mountpoint);
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "offline edits took {took:?}");
    let s = a.wait_state("disconnected", Duration::from_secs(10));
    assert!(s["cml_records"].as_u64().unwrap() > 0, "{s}");
    eprintln!("offline edits with the server just killed took {took:?}; cause: {}", s["cause"]);
    afsd.restart();
    a.wait_state("connected", Duration::from_secs(30));
    assert!(eventually(Duration::from_secs(10), || a.status()["cml_records"] == 0));
    assert_same_tree(&a.mountpoint, &afsd.export, "A vs server after automatic reintegration");
    let b = VenusMount::start(dir.path(), "b", &afsd);
    assert_same_tree(&b.mountpoint, &afsd.export, "B vs server");
}

/// afsd in its own network namespace, reached over a veth pair whose link
/// the test sets down and up again: a real cut, not a closed socket.
struct Netns {
    name: String,
    host_if: String,
}

impl Netns {
    fn new(tag: u32) -> Netns {
        let name = format!("afs{tag}");
        let host_if = format!("afsh{tag}");
        let peer = format!("afsp{tag}");
        let net = format!("10.{}.{}", 200 + (tag % 50), (tag / 50) % 250);
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        for args in [
            vec!["netns", "add", &name],
            vec!["link", "add", &host_if, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", &name],
        ] {
            run("ip", &args);
        }
        run("ip", &["addr", "add", &format!("{net}.1/24"), "dev", &host_if]);
        run("ip", &["link", "set", &host_if, "up"]);
        run("ip", &["netns", "exec", &name, "ip", "addr", "add", &format!("{net}.2/24"), "dev", &peer]);
        run("ip", &["netns", "exec", &name, "ip", "link", "set", &peer, "up"]);
        run("ip", &["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Netns { name, host_if }
    }

    fn server_ip(&self) -> String {
        let out =
            Command::new("ip").args(["netns", "exec", &self.name, "ip", "-4", "-o", "addr", "show"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let addr = text
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .filter(|a| !a.starts_with("127."))
            .map(str::to_string);
        let addr = addr.or_else(|| {
            text.lines()
                .filter(|l| !l.contains(" lo "))
                .find_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(str::to_string))
        });
        addr.expect("address in the namespace").split('/').next().unwrap().to_string()
    }

    fn link(&self, up: bool) {
        run("ip", &["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?} failed");
}

#[test]
fn a_cut_network_link_is_survived() {
    let dir = TestDir::new("offline-link");
    let ns = Netns::new(std::process::id() % 2000);
    let ip = ns.server_ip();
    // afsd runs inside the namespace: wrap the binary with `ip netns exec`.
    let export = dir.path().join("export");
    let state = dir.path().join("state");
    fs::create_dir_all(&export).unwrap();
    let mut server = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(crate::support::bin("afsd"))
        .args(["serve", "--export"])
        .arg(&export)
        .arg("--state")
        .arg(&state)
        .args(["--listen", &format!("{ip}:7000")])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(eventually(Duration::from_secs(20), || state.join("afsd.addr").exists()), "afsd started in the namespace");
    let a = VenusMount::start_with(dir.path(), "a", &format!("{ip}:7000"), &state.join("afs.key"), "4G");
    make_tree(&a.mountpoint);
    assert!(export.join("proj/src/main.c").exists());

    ns.link(false);
    let t = Instant::now();
    offline_edits(&a.mountpoint);
    let s = a.wait_state("disconnected", Duration::from_secs(10));
    eprintln!("link cut: offline edits took {:?}; cause: {}", t.elapsed(), s["cause"]);
    assert!(!export.join("proj/include").exists(), "nothing crossed a cut link");

    ns.link(true);
    a.wait_state("connected", Duration::from_secs(30));
    assert!(eventually(Duration::from_secs(10), || a.status()["cml_records"] == 0));
    assert_same_tree(&a.mountpoint, &export, "A vs server after the link came back");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn venus_killed_while_offline_loses_nothing() {
    let dir = TestDir::new("offline-venus-kill");
    let afsd = Afsd::start(dir.path());
    let mut a = VenusMount::start(dir.path(), "a", &afsd);
    make_tree(&a.mountpoint);
    a.ok(&["disconnect"]);
    offline_edits(&a.mountpoint);
    let expected = snapshot(&a.mountpoint);
    let logged = a.status()["cml_records"].as_u64().unwrap();
    assert!(logged > 0);
    a.kill();
    a.restart();
    let s = a.status();
    assert_eq!(s["state"], "disconnected", "stays offline as the user asked: {s}");
    assert_eq!(s["cml_records"].as_u64().unwrap(), logged, "the log survived SIGKILL");
    a.ok(&["reconnect"]);
    assert!(snapshot(&afsd.export) == expected, "the server has every offline change");
    assert_same_tree(&a.mountpoint, &afsd.export, "A vs server");
}

#[test]
fn a_file_written_a_hundred_times_offline_is_stored_once() {
    let dir = TestDir::new("offline-100");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    fs::write(a.path("counter"), "0").unwrap();
    a.ok(&["disconnect"]);
    for i in 1..=100 {
        fs::write(a.path("counter"), format!("{i}")).unwrap();
    }
    assert_eq!(a.status()["cml_records"], 1, "the log keeps one store");
    let stores_before = afsd.stats()["reintegrated"]["store"].as_u64().unwrap();
    a.ok(&["reconnect"]);
    let stats = afsd.stats();
    assert_eq!(stats["reintegrated"]["store"].as_u64().unwrap() - stores_before, 1, "{stats}");
    assert_eq!(fs::read_to_string(afsd.export.join("counter")).unwrap(), "100");
}

/// Both mounts change one name while offline; B reintegrates second and gets
/// the conflict; B resolves it one way. Returns the content each side ends
/// with, as (server, a, b) for `name` and for the "beside" copy if any.
struct Scenario<'a> {
    afsd: &'a Afsd,
    a: &'a VenusMount,
    b: &'a VenusMount,
}

impl Scenario<'_> {
    fn run(
        &self,
        name: &str,
        setup: Option<&str>,
        on_a: &dyn Fn(&Path),
        on_b: &dyn Fn(&Path),
        kind: &str,
        resolve: &[&str],
    ) {
        if let Some(content) = setup {
            fs::write(self.a.path(name), content).unwrap();
            assert_eq!(fs::read_to_string(self.b.path(name)).unwrap(), content);
        }
        self.a.ok(&["disconnect"]);
        self.b.ok(&["disconnect"]);
        on_a(&self.a.path(name));
        on_b(&self.b.path(name));
        self.a.ok(&["reconnect"]);
        self.b.ok(&["reconnect"]);
        let list: serde_json::Value = serde_json::from_str(&self.b.ok(&["conflicts", "list", "--json"])).unwrap();
        let c = list["conflicts"].as_array().unwrap().iter().find(|c| c["path"] == format!("/{name}")).cloned();
        let c = c.unwrap_or_else(|| panic!("no conflict for {name}: {list}"));
        assert_eq!(c["kind"], kind, "{c}");
        let show = self.b.ok(&["conflicts", "show", self.b.path(name).to_str().unwrap()]);
        assert!(show.contains(kind), "{show}");
        let target = self.b.path(name);
        let mut args = vec!["conflicts", "resolve", target.to_str().unwrap()];
        args.extend_from_slice(resolve);
        self.b.ok(&args);
        let list: serde_json::Value = serde_json::from_str(&self.b.ok(&["conflicts", "list", "--json"])).unwrap();
        assert!(list["conflicts"].as_array().unwrap().iter().all(|c| c["path"] != format!("/{name}")), "resolved");
    }

    /// Content of `name` on the server, A and B (None when absent); the
    /// three must agree.
    fn content(&self, name: &str) -> Option<String> {
        let server = fs::read_to_string(self.afsd.export.join(name)).ok();
        for (who, m) in [("A", self.a), ("B", self.b)] {
            let got = fs::read_to_string(m.path(name)).ok();
            assert_eq!(got, server, "{who} disagrees with the server about {name}");
        }
        server
    }

    /// The "beside" copy B's resolution made, if any.
    fn beside(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}.local-");
        let found = fs::read_dir(&self.afsd.export)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.starts_with(&prefix))?;
        self.content(&found)
    }
}

#[test]
fn conflicts_keep_both_versions_and_resolve_every_way() {
    let dir = TestDir::new("conflicts");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    let s = Scenario { afsd: &afsd, a: &a, b: &b };
    let merged = dir.path().join("merged.txt");
    fs::write(&merged, "merged by hand\n").unwrap();
    let merged_arg = merged.to_str().unwrap();
    let resolutions: [(&str, Vec<&str>); 4] = [
        ("local", vec!["--keep", "local"]),
        ("server", vec!["--keep", "server"]),
        ("both", vec!["--keep", "both"]),
        ("use", vec!["--use", merged_arg]),
    ];
    let write = |text: &'static str| move |p: &Path| fs::write(p, text).unwrap();
    let remove = |p: &Path| fs::remove_file(p).unwrap();

    for (how, args) in &resolutions {
        // update/update
        let name = format!("uu-{how}");
        s.run(&name, Some("base\n"), &write("from A\n"), &write("from B\n"), "update/update", args);
        let (now, beside) = (s.content(&name), s.beside(&name));
        match *how {
            "local" => assert_eq!((now.as_deref(), beside), (Some("from B\n"), None)),
            "server" => assert_eq!((now.as_deref(), beside), (Some("from A\n"), None)),
            "both" => assert_eq!((now.as_deref(), beside.as_deref()), (Some("from A\n"), Some("from B\n"))),
            _ => assert_eq!((now.as_deref(), beside), (Some("merged by hand\n"), None)),
        }

        // update/remove: A removes, B edits.
        let name = format!("ur-{how}");
        s.run(&name, Some("base\n"), &remove, &write("edited by B\n"), "update/remove", args);
        let (now, beside) = (s.content(&name), s.beside(&name));
        match *how {
            "local" => assert_eq!((now.as_deref(), beside), (Some("edited by B\n"), None)),
            "server" => assert_eq!((now, beside), (None, None)),
            "both" => assert_eq!((now, beside.as_deref()), (None, Some("edited by B\n"))),
            _ => assert_eq!((now.as_deref(), beside), (Some("merged by hand\n"), None)),
        }

        // create/create: both create the name.
        let name = format!("cc-{how}");
        s.run(&name, None, &write("created by A\n"), &write("created by B\n"), "create/create", args);
        let (now, beside) = (s.content(&name), s.beside(&name));
        match *how {
            "local" => assert_eq!((now.as_deref(), beside), (Some("created by B\n"), None)),
            "server" => assert_eq!((now.as_deref(), beside), (Some("created by A\n"), None)),
            "both" => assert_eq!((now.as_deref(), beside.as_deref()), (Some("created by A\n"), Some("created by B\n"))),
            _ => assert_eq!((now.as_deref(), beside), (Some("merged by hand\n"), None)),
        }
    }

    // remove/update: A edits, B removes; the server's edit survives.
    let name = "ru";
    s.run(name, Some("base\n"), &write("kept edit\n"), &remove, "remove/update", &["--keep", "server"]);
    assert_eq!(s.content(name).as_deref(), Some("kept edit\n"));
}

#[test]
fn a_connected_store_on_an_old_version_is_a_conflict() {
    let dir = TestDir::new("connected-conflict");
    let afsd = Afsd::start(dir.path());
    let a = VenusMount::start(dir.path(), "a", &afsd);
    let b = VenusMount::start(dir.path(), "b", &afsd);
    fs::write(a.path("shared"), "v1\n").unwrap();
    // B opens and holds the file, A changes it, then B writes its old copy.
    let mut held = fs::OpenOptions::new().read(true).write(true).open(b.path("shared")).unwrap();
    fs::write(a.path("shared"), "A's v2\n").unwrap();
    held.write_all(b"B on v1\n").unwrap();
    let closed = held.sync_all();
    assert!(closed.is_err(), "a store based on an old version is refused, not applied");
    drop(held);
    assert_eq!(fs::read_to_string(afsd.export.join("shared")).unwrap(), "A's v2\n");
    let list: serde_json::Value = serde_json::from_str(&b.ok(&["conflicts", "list", "--json"])).unwrap();
    let c = &list["conflicts"][0];
    assert_eq!(c["kind"], "update/update");
    let local = fs::read_to_string(c["local_copy"].as_str().unwrap()).unwrap();
    assert!(local.starts_with("B on v1"), "B's content is kept: {local:?}");
}

/// The server dies, venus logs changes, venus itself is killed, both come
/// back: the restarted venus reintegrates at startup, nothing lost.
#[test]
fn a_log_left_by_a_crash_is_reintegrated_at_startup() {
    let dir = TestDir::new("offline-startup");
    let mut afsd = Afsd::start(dir.path());
    let mut a = VenusMount::start(dir.path(), "a", &afsd);
    make_tree(&a.mountpoint);
    afsd.kill();
    offline_edits(&a.mountpoint);
    a.wait_state("disconnected", Duration::from_secs(10));
    let expected = snapshot(&a.mountpoint);
    a.kill();
    afsd.restart();
    a.restart();
    assert!(eventually(Duration::from_secs(30), || a.status()["cml_records"] == 0), "{}", a.status());
    assert_eq!(a.status()["state"], "connected");
    let got = snapshot(&afsd.export);
    let diff: Vec<_> = got.keys().chain(expected.keys()).filter(|k| got.get(*k) != expected.get(*k)).collect();
    assert!(diff.is_empty(), "the server lacks changes made before the crash: {diff:?}");
}
