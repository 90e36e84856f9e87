//! Random operations on a mount and on a plain directory side by side,
//! compared after every step. Seeded and repeatable: a failure names its
//! seed and step; `AFS_RANDOM_SEED=n` replays one seed.

use crate::support::{snapshot, Afsd, Entry, TestDir, VenusMount};
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// One operation, applied to a tree root; the errno on failure.
type Op = Box<dyn Fn(&Path) -> Result<(), i32>>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    /// Up to `max` random bytes.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.below(v.len())])
        }
    }
}

/// Relative paths of files and of directories (the root is "").
fn paths(root: &Path) -> (Vec<String>, Vec<String>) {
    let (mut files, mut dirs) = (vec![], vec![String::new()]);
    for (p, e) in snapshot(root) {
        match e {
            Entry::File { .. } => files.push(p),
            Entry::Dir { .. } => dirs.push(p),
            Entry::Symlink(_) => {}
        }
    }
    (files, dirs)
}

/// An entry in a few words, for failure messages.
fn brief(e: Option<&Entry>) -> String {
    match e {
        None => "absent".into(),
        Some(Entry::File { mode, data }) => format!("file {mode:o} of {} bytes", data.len()),
        Some(Entry::Dir { mode }) => format!("dir {mode:o}"),
        Some(Entry::Symlink(t)) => format!("symlink to {t}"),
    }
}

fn errno<T>(r: std::io::Result<T>) -> Result<(), i32> {
    r.map(|_| ()).map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn run_seed(seed: u64, steps: usize) {
    let dir = TestDir::new(&format!("random-{seed}"));
    let afsd = Afsd::start(dir.path());
    let m = VenusMount::start(dir.path(), "mnt", &afsd);
    let plain = dir.path().join("plain");
    fs::create_dir_all(&plain).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let names = ["a", "b", "c", "data.bin", "notes.txt", "sub"];
    let (mut applied, mut refused, mut reads) = (0, 0, 0);
    // The last operations, for the failure message: a failure seen only
    // under load can then be read without replaying it.
    let mut recent: std::collections::VecDeque<String> = Default::default();
    for step in 0..steps {
        let (files, dirs) = paths(&plain);
        let op = rng.below(10);
        let target = |rng: &mut Rng| {
            let d = rng.pick(&dirs).unwrap().clone();
            let n = names[rng.below(names.len())];
            if d.is_empty() {
                n.to_string()
            } else {
                format!("{d}/{n}")
            }
        };
        let desc;
        let apply: Op = match op {
            0 => {
                let (p, data) = (target(&mut rng), rng.bytes(40_000));
                desc = format!("write whole {p} ({} bytes)", data.len());
                Box::new(move |r: &Path| errno(fs::write(r.join(&p), &data)))
            }
            1 if !files.is_empty() => {
                let p = rng.pick(&files).unwrap().clone();
                let (off, data) = (rng.below(50_000) as u64, rng.bytes(6000));
                desc = format!("write {} bytes at {off} of {p}", data.len());
                Box::new(move |r: &Path| {
                    errno((|| {
                        let mut f = fs::OpenOptions::new().write(true).open(r.join(&p))?;
                        f.seek(SeekFrom::Start(off))?;
                        f.write_all(&data)
                    })())
                })
            }
            2 if !files.is_empty() => {
                let (p, len) = (rng.pick(&files).unwrap().clone(), rng.below(60_000) as u64);
                desc = format!("truncate {p} to {len}");
                Box::new(move |r: &Path| {
                    errno(fs::OpenOptions::new().write(true).open(r.join(&p)).and_then(|f| f.set_len(len)))
                })
            }
            3 => {
                let all: Vec<String> = files.iter().chain(dirs.iter().skip(1)).cloned().collect();
                let Some(from) = rng.pick(&all).cloned() else { continue };
                let to = target(&mut rng);
                desc = format!("rename {from} -> {to}");
                Box::new(move |r: &Path| errno(fs::rename(r.join(&from), r.join(&to))))
            }
            4 if !files.is_empty() => {
                let p = rng.pick(&files).unwrap().clone();
                desc = format!("unlink {p}");
                Box::new(move |r: &Path| errno(fs::remove_file(r.join(&p))))
            }
            5 => {
                let p = target(&mut rng);
                desc = format!("mkdir {p}");
                Box::new(move |r: &Path| errno(fs::create_dir(r.join(&p))))
            }
            6 if dirs.len() > 1 => {
                let p = dirs[1 + rng.below(dirs.len() - 1)].clone();
                desc = format!("rmdir {p}");
                Box::new(move |r: &Path| errno(fs::remove_dir(r.join(&p))))
            }
            7 if !files.is_empty() => {
                let (p, data) = (rng.pick(&files).unwrap().clone(), rng.bytes(3000));
                desc = format!("append {} bytes to {p}", data.len());
                Box::new(move |r: &Path| {
                    errno(fs::OpenOptions::new().append(true).open(r.join(&p)).and_then(|mut f| f.write_all(&data)))
                })
            }
            8 if !files.is_empty() => {
                let p = rng.pick(&files).unwrap().clone();
                let mode = [0o600, 0o644, 0o755, 0o640][rng.below(4)];
                desc = format!("chmod {p} {mode:o}");
                Box::new(move |r: &Path| errno(fs::set_permissions(r.join(&p), fs::Permissions::from_mode(mode))))
            }
            _ => {
                // Reopen and read a file: the two must agree byte for byte.
                let Some(p) = rng.pick(&files).cloned() else { continue };
                desc = format!("read {p}");
                let expect = fs::read(plain.join(&p)).unwrap();
                let got = fs::read(m.mountpoint.join(&p)).unwrap();
                assert!(got == expect, "seed {seed} step {step}: {desc}: contents differ");
                reads += 1;
                continue;
            }
        };
        if recent.len() == 25 {
            recent.pop_front();
        }
        recent.push_back(format!("{step}: {desc}"));
        let want = apply(&plain);
        let got = apply(&m.mountpoint);
        assert_eq!(got, want, "seed {seed} step {step}: {desc}: mount and plain directory disagree on the result");
        if got.is_ok() {
            applied += 1;
        } else {
            refused += 1;
        }
        let (a, b) = (snapshot(&m.mountpoint), snapshot(&plain));
        if a != b {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).collect();
            keys.sort();
            keys.dedup();
            let diff: Vec<String> =
                keys.iter().map(|k| format!("{k}: mount {}, plain {}", brief(a.get(*k)), brief(b.get(*k)))).collect();
            let recent: Vec<&String> = recent.iter().collect();
            panic!("seed {seed} step {step}: after {desc}: trees differ at {diff:?}\nlast steps: {recent:#?}");
        }
    }
    eprintln!("seed {seed}: {applied} operations applied, {refused} refused alike, {reads} reads compared");
    assert!(applied > steps / 3, "seed {seed}: too few operations took effect ({applied})");
    // Everything reached the server too.
    drop(m);
    let served = snapshot(&afsd.export);
    assert!(served == snapshot(&plain), "seed {seed}: the export differs from the plain directory at the end");
}

#[test]
fn random_operations_match_a_plain_directory() {
    let seeds: Vec<u64> = match std::env::var("AFS_RANDOM_SEED") {
        Ok(s) => vec![s.parse().expect("AFS_RANDOM_SEED is a number")],
        Err(_) => vec![1, 2, 3],
    };
    for seed in seeds {
        run_seed(seed, 150);
    }
}
