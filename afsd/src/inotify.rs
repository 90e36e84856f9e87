//! A recursive inotify watch of a directory tree, reporting the paths that
//! changed.
//!
//! Written for the export watcher rather than taken from a crate because of
//! the mask: general-purpose watchers also ask for every open and every
//! write(2), and the server itself opens and writes files for nearly every
//! call, so those events cost it more CPU than the rest of a small create.
//! Here a write is seen when its file is closed (`IN_CLOSE_WRITE`), and
//! opens not at all.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How long events gather between two reads (see `Tree::run`).
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

const MASK: u32 = libc::IN_ATTRIB
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// What the watch reports.
pub enum Change {
    /// Something at this path changed (or the directory itself, for events
    /// without a name).
    Path(PathBuf),
    /// The kernel's queue overflowed: changes were lost.
    Overflow,
}

/// Stops the watching thread when dropped.
pub struct Watch {
    stop: Arc<AtomicBool>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Watches `root` and every directory below it (except `skip`, a path
/// relative to `root`), calling `report` from a thread of its own.
pub fn watch(root: &Path, skip: Option<PathBuf>, report: impl Fn(Change) + Send + 'static) -> io::Result<Watch> {
    // SAFETY: plain syscall; the descriptor is owned from here on.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by inotify_init1 and is owned by no one else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut tree = Tree { fd, dirs: HashMap::new(), skip: skip.map(|s| root.join(s)) };
    tree.add_all(root)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new().name("export-watch".into()).spawn(move || tree.run(&stopped, report))?;
    Ok(Watch { stop })
}

struct Tree {
    fd: OwnedFd,
    /// Watch descriptor -> the directory's path.
    dirs: HashMap<i32, PathBuf>,
    skip: Option<PathBuf>,
}

impl Tree {
    /// Watches `dir` and every directory below it. A directory that goes
    /// away meanwhile is simply not watched. Watching a directory watched
    /// already returns its descriptor again, so this also corrects the paths
    /// of a directory tree that was moved. Fails only if `dir` itself cannot
    /// be watched.
    fn add_all(&mut self, dir: &Path) -> io::Result<()> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            if self.skip.as_deref() == Some(d.as_path()) {
                continue;
            }
            let Ok(c) = CString::new(d.as_os_str().as_bytes()) else { continue };
            // SAFETY: valid descriptor and NUL-terminated path.
            let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
            if wd < 0 {
                let e = io::Error::last_os_error();
                if d == dir {
                    return Err(e);
                }
                match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::EACCES) => continue,
                    // Out of watches (fs.inotify.max_user_watches): say so once per directory.
                    _ => {
                        tracing::warn!(dir = %d.display(), "cannot watch for outside edits: {e}");
                        continue;
                    }
                }
            }
            self.dirs.insert(wd, d.clone());
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        Ok(())
    }

    fn run(mut self, stop: &AtomicBool, report: impl Fn(Change)) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 500) } <= 0 {
                continue;
            }
            // SAFETY: reads into a buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                continue;
            }
            let mut at = 0usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            while at + header <= n as usize {
                // SAFETY: the kernel writes whole events; the header fits in
                // what was read, and read_unaligned copes with any alignment.
                let ev: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                let name_end = (at + header + ev.len as usize).min(n as usize);
                let name = &buf[at + header..name_end];
                let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
                at = name_end;
                self.event(ev.wd, ev.mask, name, &report);
            }
            // The server's own changes raise events too, several per
            // request: letting them gather for a moment wakes this thread
            // once per batch instead of once per change. (The kernel queues
            // 16384 events by default; the checks downstream wait longer.)
            std::thread::sleep(GATHER);
        }
    }

    fn event(&mut self, wd: i32, mask: u32, name: &[u8], report: &impl Fn(Change)) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            report(Change::Overflow);
            return;
        }
        if mask & libc::IN_IGNORED != 0 {
            self.dirs.remove(&wd);
            return;
        }
        let Some(dir) = self.dirs.get(&wd) else { return };
        let path = if name.is_empty() { dir.clone() } else { dir.join(OsStr::from_bytes(name)) };
        if mask & libc::IN_ISDIR != 0 && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
            // A new directory, or one moved here: watch it (again, with its
            // new path) and everything below it.
            let _ = self.add_all(&path);
        }
        report(Change::Path(path));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn changes(rx: &mpsc::Receiver<PathBuf>, wait: Duration) -> Vec<PathBuf> {
        let mut out = Vec::new();
        while let Ok(p) = rx.recv_timeout(wait) {
            out.push(p);
        }
        out
    }

    /// Edits anywhere in the tree are reported, in directories made and
    /// moved after the watch began too; opens and reads are not.
    #[test]
    fn reports_changes_below_new_and_moved_directories() {
        let root = std::env::temp_dir().join(format!("afsd-inotify-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join("skipped")).unwrap();
        std::fs::write(root.join("a/b/f"), "x").unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let _w = watch(&root, Some("skipped".into()), move |c| {
            if let Change::Path(p) = c {
                let _ = tx.lock().unwrap().send(p);
            }
        })
        .unwrap();
        let quiet = Duration::from_millis(300);
        std::fs::read(root.join("a/b/f")).unwrap();
        assert!(changes(&rx, quiet).is_empty(), "a read is not a change");
        std::fs::write(root.join("a/b/f"), "y").unwrap();
        assert!(changes(&rx, quiet).contains(&root.join("a/b/f")));
        std::fs::write(root.join("skipped/g"), "z").unwrap();
        assert!(changes(&rx, quiet).is_empty(), "the skipped directory is not watched");
        // A directory made after the watch began, with a file in it.
        std::fs::create_dir_all(root.join("a/new/deeper")).unwrap();
        changes(&rx, quiet);
        std::fs::write(root.join("a/new/deeper/h"), "1").unwrap();
        assert!(changes(&rx, quiet).contains(&root.join("a/new/deeper/h")));
        // A directory moved: its events carry the new path.
        std::fs::rename(root.join("a/b"), root.join("moved")).unwrap();
        changes(&rx, quiet);
        std::fs::write(root.join("moved/f"), "2").unwrap();
        assert!(changes(&rx, quiet).contains(&root.join("moved/f")));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
