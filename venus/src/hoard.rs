//! Hoarding: a list of paths to keep cached for offline use, with
//! priorities, and the walk that fetches what is missing or stale.
//!
//! Entries name a path, a priority (1-1000) and a scope: the object alone,
//! its children, or all its descendants (including ones created later: the
//! walk lists directories afresh). Hoarded objects are evicted last, lowest
//! priority first; what cannot fit is reported by the walk.

use crate::errors::{errno, Result};
use crate::fs::{Found, Venus};
use common::{Fid, FileKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Object,
    Children,
    Descendants,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "object" | "self" => Some(Scope::Object),
            "children" => Some(Scope::Children),
            "descendants" | "all" => Some(Scope::Descendants),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Object => "object",
            Scope::Children => "children",
            Scope::Descendants => "descendants",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// A volume path ("/dir/file"), the same on every mount.
    pub path: String,
    pub priority: u32,
    pub scope: Scope,
}

pub const DEFAULT_PRIORITY: u32 = 10;

pub struct Hoard {
    tree: sled::Tree,
}

impl Hoard {
    pub fn open(db: &sled::Db) -> Result<Hoard> {
        Ok(Hoard { tree: db.open_tree("hoard")? })
    }

    pub fn add(&self, e: Entry) -> Result<()> {
        if !(1..=1000).contains(&e.priority) {
            return Err(errno(libc::EINVAL, "priorities run from 1 to 1000"));
        }
        self.tree.insert(e.path.as_bytes(), rmp_serde::to_vec_named(&e).expect("entries encode"))?;
        self.tree.flush()?;
        Ok(())
    }

    pub fn remove(&self, path: &str) -> Result<bool> {
        let had = self.tree.remove(path.as_bytes())?.is_some();
        self.tree.flush()?;
        Ok(had)
    }

    pub fn list(&self) -> Vec<Entry> {
        self.tree.iter().flatten().filter_map(|(_, v)| rmp_serde::from_slice(&v).ok()).collect()
    }
}

/// Parses a profile: `PATH PRIORITY SCOPE` per line (priority and scope
/// optional), `#` starts a comment.
pub fn parse_profile(text: &str) -> std::result::Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let path = words.next().expect("non-empty line has a word");
        if !path.starts_with('/') {
            return Err(format!("line {}: paths start at the volume root: {path:?}", n + 1));
        }
        let priority = match words.next() {
            Some(p) => p.parse().map_err(|_| format!("line {}: {p:?} is not a priority", n + 1))?,
            None => DEFAULT_PRIORITY,
        };
        let scope = match words.next() {
            Some(s) => Scope::parse(s).ok_or_else(|| format!("line {}: unknown scope {s:?}", n + 1))?,
            None => Scope::Object,
        };
        if let Some(extra) = words.next() {
            return Err(format!("line {}: unexpected {extra:?}", n + 1));
        }
        if !(1..=1000).contains(&priority) {
            return Err(format!("line {}: priorities run from 1 to 1000", n + 1));
        }
        out.push(Entry { path: path.to_string(), priority, scope });
    }
    Ok(out)
}

pub fn format_profile(entries: &[Entry]) -> String {
    let mut s = String::from("# venus hoard profile: PATH PRIORITY SCOPE (object|children|descendants)\n");
    for e in entries {
        s.push_str(&format!("{} {} {}\n", e.path, e.priority, e.scope.name()));
    }
    s
}

/// The outcome of a walk.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    pub objects: usize,
    pub bytes: u64,
    pub fetched: usize,
    pub fetched_bytes: u64,
    pub current: usize,
    /// (path, why)
    pub failed: Vec<(String, String)>,
    /// Paths that would not fit in the cache, lowest priorities.
    pub did_not_fit: Vec<String>,
}

/// One object the hoard covers.
struct Wanted {
    fid: Fid,
    path: String,
    kind: FileKind,
    size: u64,
    priority: u32,
}

impl Venus {
    /// Walks the hoard list: fetches every hoarded object that is missing or
    /// stale, highest priority first, as far as the cache allows. Blocking
    /// (run it off the async runtime). `progress` hears (done, total, bytes).
    pub fn hoard_walk(&self, progress: &mut dyn FnMut(usize, usize, u64, u64)) -> Result<Summary> {
        if !self.link.is_connected() {
            return Err(errno(libc::ENOTCONN, "a hoard walk needs the server"));
        }
        let _walking = self.walk_lock.lock().unwrap();
        let mut summary = Summary::default();
        let mut wanted: HashMap<Fid, Wanted> = HashMap::new();
        for e in self.hoard.list() {
            if let Err(err) = self.hoard_collect(&e, &mut wanted) {
                summary.failed.push((e.path.clone(), err.to_string()));
            }
        }
        let mut list: Vec<Wanted> = wanted.into_values().collect();
        list.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.path.cmp(&b.path)));
        summary.objects = list.len();
        summary.bytes = list.iter().map(|w| w.size).sum();
        // Priorities go on the nodes first, so eviction spares hoarded data.
        let priorities: HashMap<Fid, u32> = list.iter().map(|w| (w.fid, w.priority)).collect();
        self.cache.set_hoard_priorities(&priorities);
        let total_bytes = summary.bytes;
        let mut used = 0u64;
        for (i, w) in list.iter().enumerate() {
            progress(i, list.len(), used, total_bytes);
            if w.kind != FileKind::File {
                summary.current += 1;
                continue;
            }
            if used + w.size > self.cache.limit {
                summary.did_not_fit.push(w.path.clone());
                self.cache.update(w.fid, |n| n.hoard = 0);
                continue;
            }
            used += w.size;
            let was = self.cache.view(w.fid, |n| n.current() && (n.cached || n.dirty)).unwrap_or(false);
            if was {
                summary.current += 1;
                continue;
            }
            match self.rt.block_on(self.hoard_fetch(w.fid)) {
                Ok(()) => {
                    summary.fetched += 1;
                    summary.fetched_bytes += w.size;
                }
                Err(e) => summary.failed.push((w.path.clone(), e.to_string())),
            }
        }
        progress(list.len(), list.len(), used, total_bytes);
        *self.last_walk.lock().unwrap() = Some(summary.clone());
        tracing::info!(
            objects = summary.objects,
            fetched = summary.fetched,
            current = summary.current,
            failed = summary.failed.len(),
            did_not_fit = summary.did_not_fit.len(),
            "hoard walk done"
        );
        Ok(summary)
    }

    async fn hoard_fetch(&self, fid: Fid) -> Result<()> {
        self.ensure_content_pub(fid).await.map(|_| ())
    }

    /// Resolves an entry's path and gathers what its scope covers.
    fn hoard_collect(&self, e: &Entry, out: &mut HashMap<Fid, Wanted>) -> Result<()> {
        let mut fid = Fid::ROOT;
        let mut attr = self.getattr(fid)?.0;
        for name in e.path.split('/').filter(|s| !s.is_empty()) {
            match self.lookup(fid, std::ffi::OsStr::new(name))? {
                Found::Entry(a, _) => {
                    fid = a.fid;
                    attr = a;
                }
                Found::Negative(_) => return Err(errno(libc::ENOENT, format!("{} does not exist", e.path))),
            }
        }
        let mut add = |fid: Fid, path: String, kind: FileKind, size: u64| {
            let w = out.entry(fid).or_insert(Wanted { fid, path, kind, size, priority: 0 });
            w.priority = w.priority.max(e.priority);
        };
        add(fid, e.path.clone(), attr.kind, attr.size);
        if attr.kind != FileKind::Dir || e.scope == Scope::Object {
            return Ok(());
        }
        let mut stack = vec![(fid, e.path.trim_end_matches('/').to_string(), 0usize)];
        while let Some((dir, path, depth)) = stack.pop() {
            for (name, (child, kind)) in self.listing(dir)? {
                let child = self.resolve(child);
                let cpath = format!("{path}/{name}");
                // A lookup (not a bare getattr) also records where the child lives.
                let size = match self.lookup(dir, std::ffi::OsStr::new(&name)) {
                    Ok(Found::Entry(a, _)) if kind == FileKind::File => a.size,
                    _ => 0,
                };
                add(child, cpath.clone(), kind, size);
                if kind == FileKind::Symlink {
                    let _ = self.readlink(child);
                }
                if kind == FileKind::Dir && (e.scope == Scope::Descendants || depth == 0) && e.scope != Scope::Object {
                    if e.scope == Scope::Descendants {
                        stack.push((child, cpath, depth + 1));
                    } else {
                        // Children: the directory itself is listed (so it is
                        // browsable offline) but not descended into.
                        let _ = self.listing(child);
                    }
                }
            }
        }
        Ok(())
    }
}
