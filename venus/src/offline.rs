//! Changes made while disconnected: applied to the cache at once and
//! appended to the modification log (flushed to disk before the operation
//! returns), to be replayed on the server at reintegration.
//!
//! Objects created offline get local fids (`Fid::local`); reintegration
//! replaces them with the server's.

use crate::cache::{ContainerStamp, Node};
use crate::cml::CmlOp;
use crate::errors::{errno, Result};
use crate::fs::Venus;
use common::{Attr, Fid, FileKind, FsError, SetAttr, Timestamp, VersionVector};
use std::collections::BTreeMap;
use std::fs::File;

impl Venus {
    pub(crate) fn new_local_fid(&self) -> Result<Fid> {
        Ok(Fid::local(self.cache.meta_next("next_local")?))
    }

    /// Appends a change to the log under the current names of its objects
    /// (see `Cml::append_mapped`).
    pub(crate) fn log_append(&self, op: CmlOp, seq: Option<u64>) -> Result<()> {
        self.cml.append_mapped(op, seq, &|f| self.resolve(f))
    }

    /// Logs a change; a `seq` from a failed connected attempt is already
    /// held and is released when the record is done.
    fn log(&self, op: CmlOp, seq: Option<u64>) -> Result<()> {
        self.log_append(op, seq)?;
        // The change must survive a crash of venus or of the machine.
        self.cache.flush()
    }

    pub(crate) fn local_node(&self, fid: Fid, dir: Fid, name: &str, kind: FileKind, mode: u32, size: u64) -> Node {
        let now = Timestamp::now();
        let attr = Attr {
            fid,
            kind,
            size,
            mode,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            atime: now,
            mtime: now,
            ctime: now,
            version: VersionVector::new(),
        };
        let mut n = Node::new(attr, Some((dir, name.to_string())));
        n.valid = true;
        n.expires = i64::MAX;
        // Never evicted before it reaches the server.
        n.dirty = true;
        n
    }

    /// Applies a logged change to a cached listing. The directory is dirty
    /// until the change reaches the server: its listing is the only record
    /// of the change in the namespace, so it is neither refetched nor
    /// dropped by news from the server nor evicted meanwhile.
    fn offline_dir_change(&self, dir: Fid, add: Option<(&str, Fid, FileKind)>, remove: Option<&str>) {
        self.after_dir_change(dir, None, add, remove);
        self.cache.update(dir, |n| n.dirty = true);
    }

    /// The entry `name` in `dir`, from the cached listing.
    fn offline_entry(&self, dir: Fid, name: &str) -> Result<Option<(Fid, FileKind)>> {
        let entries = self.listing(dir)?;
        Ok(entries.get(name).map(|(f, k)| (self.resolve(*f), *k)))
    }

    pub(crate) fn offline_create(
        &self,
        dir: Fid,
        name: &str,
        mode: u32,
        exclusive: bool,
        seq: Option<u64>,
    ) -> Result<Fid> {
        match self.offline_entry(dir, name)? {
            Some(_) if exclusive => return Err(FsError::Exists.into()),
            Some((f, FileKind::File)) => return Ok(f),
            Some(_) => return Err(FsError::IsDir.into()),
            None => {}
        }
        let fid = self.new_local_fid()?;
        let mut node = self.local_node(fid, dir, name, FileKind::File, mode, 0);
        let f = File::create(self.cache.container_path(fid))?;
        node.cached = true;
        node.clean = Some(ContainerStamp::of(&f.metadata()?));
        self.cache.insert(fid, node);
        self.cache.set_size(fid, 0);
        self.offline_dir_change(dir, Some((name, fid, FileKind::File)), None);
        self.log(CmlOp::Create { dir, name: name.to_string(), fid, mode }, seq)?;
        Ok(fid)
    }

    pub(crate) fn offline_mkdir(&self, dir: Fid, name: &str, mode: u32, seq: Option<u64>) -> Result<Attr> {
        if self.offline_entry(dir, name)?.is_some() {
            return Err(FsError::Exists.into());
        }
        let fid = self.new_local_fid()?;
        let mut node = self.local_node(fid, dir, name, FileKind::Dir, mode, 4096);
        node.entries = Some(BTreeMap::new());
        let attr = node.attr.clone();
        self.cache.insert(fid, node);
        self.offline_dir_change(dir, Some((name, fid, FileKind::Dir)), None);
        self.log(CmlOp::Mkdir { dir, name: name.to_string(), fid, mode }, seq)?;
        Ok(attr)
    }

    pub(crate) fn offline_symlink(&self, dir: Fid, name: &str, target: &str, seq: Option<u64>) -> Result<Attr> {
        if self.offline_entry(dir, name)?.is_some() {
            return Err(FsError::Exists.into());
        }
        let fid = self.new_local_fid()?;
        let mut node = self.local_node(fid, dir, name, FileKind::Symlink, 0o777, target.len() as u64);
        node.target = Some(target.to_string());
        let attr = node.attr.clone();
        self.cache.insert(fid, node);
        self.offline_dir_change(dir, Some((name, fid, FileKind::Symlink)), None);
        self.log(CmlOp::Symlink { dir, name: name.to_string(), fid, target: target.to_string() }, seq)?;
        Ok(attr)
    }

    pub(crate) fn offline_link(&self, fid: Fid, dir: Fid, name: &str, seq: Option<u64>) -> Result<Attr> {
        if self.offline_entry(dir, name)?.is_some() {
            return Err(FsError::Exists.into());
        }
        let kind = self.cache.view(fid, |n| n.attr.kind).ok_or_else(|| self.not_cached(fid, "file"))?;
        if kind == FileKind::Dir {
            return Err(FsError::NotPermitted.into());
        }
        self.cache.update(fid, |n| n.attr.nlink += 1);
        self.offline_dir_change(dir, Some((name, fid, kind)), None);
        self.log(CmlOp::Link { fid, dir, name: name.to_string() }, seq)?;
        self.cache.view(fid, |n| n.attr.clone()).ok_or_else(|| errno(libc::EIO, "node vanished after an offline link"))
    }

    pub(crate) fn offline_unlink(&self, dir: Fid, name: &str, is_dir: bool, seq: Option<u64>) -> Result<()> {
        let (fid, kind) = self.offline_entry(dir, name)?.ok_or(FsError::NotFound)?;
        match (is_dir, kind == FileKind::Dir) {
            (true, false) => return Err(FsError::NotDir.into()),
            (false, true) => return Err(FsError::IsDir.into()),
            (true, true) => {
                let entries = self.cache.view(fid, |n| n.entries.clone()).flatten();
                match entries {
                    Some(e) if e.is_empty() => {}
                    Some(_) => return Err(FsError::NotEmpty.into()),
                    None => return Err(self.not_cached(fid, "directory listing")),
                }
            }
            _ => {}
        }
        // Removing one of several names destroys no content: no version to
        // check (and the file's own changes may be logged before it).
        let base = match self.cache.view(fid, |n| (n.attr.nlink, n.attr.version.clone())) {
            Some((1, version)) if !fid.is_local() => Some(version),
            _ => None,
        };
        self.offline_dir_change(dir, None, Some(name));
        self.forget_object(fid)?;
        let op = if is_dir {
            CmlOp::Rmdir { dir, name: name.to_string(), fid }
        } else {
            CmlOp::Remove { dir, name: name.to_string(), fid, base }
        };
        self.log(op, seq)
    }

    pub(crate) fn offline_rename(
        &self,
        dir: Fid,
        name: &str,
        to_dir: Fid,
        to_name: &str,
        no_replace: bool,
        seq: Option<u64>,
    ) -> Result<()> {
        let (fid, kind) = self.offline_entry(dir, name)?.ok_or(FsError::NotFound)?;
        let target = self.offline_entry(to_dir, to_name)?;
        if let Some((t, tkind)) = target {
            if t == fid {
                return Ok(());
            }
            if no_replace {
                return Err(FsError::Exists.into());
            }
            match (kind == FileKind::Dir, tkind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir.into()),
                (false, true) => return Err(FsError::IsDir.into()),
                (true, true) => match self.cache.view(t, |n| n.entries.as_ref().map(|e| e.is_empty())).flatten() {
                    Some(true) => {}
                    Some(false) => return Err(FsError::NotEmpty.into()),
                    None => return Err(self.not_cached(t, "directory listing")),
                },
                _ => {}
            }
        }
        if kind == FileKind::Dir && self.cache.is_within(to_dir, fid) {
            return Err(errno(libc::EINVAL, "cannot move a directory into itself"));
        }
        self.offline_dir_change(dir, None, Some(name));
        self.offline_dir_change(to_dir, Some((to_name, fid, kind)), None);
        self.cache.update(fid, |n| n.parent = Some((to_dir, to_name.to_string())));
        let replaced = target.map(|(t, _)| t);
        let replaced_base =
            replaced.filter(|t| !t.is_local()).and_then(|t| self.cache.view(t, |n| n.attr.version.clone()));
        if let Some(t) = replaced {
            self.forget_object(t)?;
        }
        let op = CmlOp::Rename {
            from_dir: dir,
            from: name.to_string(),
            to_dir,
            to: to_name.to_string(),
            fid,
            replaced,
            replaced_base,
        };
        self.log(op, seq)
    }

    pub(crate) fn offline_setattr(&self, fid: Fid, set: &SetAttr, seq: Option<u64>) -> Result<()> {
        let (kind, cached, version) = self
            .cache
            .view(fid, |n| (n.attr.kind, n.cached || n.dirty, n.attr.version.clone()))
            .ok_or_else(|| self.not_cached(fid, "object"))?;
        if set.size.is_some() {
            if kind == FileKind::Dir {
                return Err(FsError::IsDir.into());
            }
            if !cached {
                return Err(self.not_cached(fid, "file"));
            }
        }
        self.cache.update(fid, |n| {
            let a = &mut n.attr;
            if let Some(m) = set.mode {
                a.mode = m & 0o7777;
            }
            if let Some(u) = set.uid {
                a.uid = u;
            }
            if let Some(g) = set.gid {
                a.gid = g;
            }
            if let Some(s) = set.size {
                a.size = s;
                n.dirty = true;
            }
            if let Some(t) = set.atime {
                a.atime = t;
            }
            if let Some(t) = set.mtime {
                a.mtime = t;
            }
            a.ctime = Timestamp::now();
        });
        // A directory's version moves with every entry made or removed in
        // it (by this client's own log too): its attributes are not content
        // to protect, so they are set without a version check.
        let base = match (kind, fid.is_local()) {
            (FileKind::Dir, _) => None,
            (_, true) => Some(VersionVector::new()),
            (_, false) => Some(version),
        };
        self.log(CmlOp::SetAttr { fid, set: set.clone(), base }, seq)
    }
}
