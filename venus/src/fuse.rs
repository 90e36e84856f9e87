//! Adapts fuser's `Filesystem` trait to the cache manager in `fs.rs`: this
//! file only converts arguments and replies; the logic lives there.

use crate::fs::{Found, Venus};
use common::{Attr, Fid, FileKind, SetAttr, Timestamp};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub struct FuseAdapter {
    pub venus: Arc<Venus>,
    /// The kernel accepted FUSE passthrough.
    pub passthrough: Arc<AtomicBool>,
    /// Told once the kernel's INIT is answered: the mount is usable.
    pub initialised: std::sync::mpsc::SyncSender<()>,
}

fn fid(ino: INodeNo) -> Fid {
    Fid(ino.0)
}

pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.fid.0),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime.into(),
        mtime: a.mtime.into(),
        ctime: a.ctime.into(),
        crtime: a.ctime.into(),
        kind: match a.kind {
            FileKind::File => FileType::RegularFile,
            FileKind::Dir => FileType::Directory,
            FileKind::Symlink => FileType::Symlink,
        },
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> Timestamp {
    match t {
        TimeOrNow::SpecificTime(t) => t.into(),
        TimeOrNow::Now => Timestamp::now(),
    }
}

/// A negative dentry: an entry reply naming inode 0.
fn negative() -> FileAttr {
    let mut a = file_attr(&Attr {
        fid: Fid(0),
        kind: FileKind::File,
        size: 0,
        mode: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        atime: Timestamp::default(),
        mtime: Timestamp::default(),
        ctime: Timestamp::default(),
        version: Default::default(),
    });
    a.ino = INodeNo(0);
    a
}

impl FuseAdapter {
    fn reply_entry(&self, reply: ReplyEntry, r: crate::errors::Result<Attr>) {
        match r {
            Ok(a) => reply.entry(&crate::fs::SHORT_TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(e.into()),
        }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(2).is_ok();
        self.passthrough.store(ok, Ordering::SeqCst);
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(InitFlags::FUSE_CACHE_SYMLINKS);
        tracing::info!(passthrough = ok, "FUSE session initialised");
        let _ = self.initialised.try_send(());
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        self.venus.forget(fid(ino));
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.venus.lookup(fid(parent), name) {
            Ok(Found::Entry(a, ttl)) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
            Ok(Found::Negative(ttl)) if !ttl.is_zero() => {
                reply.entry_with_ttls(&Duration::ZERO, &ttl, &negative(), Generation(0))
            }
            Ok(Found::Negative(_)) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(e.into()),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.venus.getattr(fid(ino)) {
            Ok((a, ttl)) => reply.attr(&ttl, &file_attr(&a)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set =
            SetAttr { mode: mode.map(|m| m & 0o7777), uid, gid, size, atime: atime.map(time), mtime: mtime.map(time) };
        match self.venus.setattr(fid(ino), set, fh.map(|h| h.0)) {
            Ok((a, ttl)) => reply.attr(&ttl, &file_attr(&a)),
            Err(e) => reply.error(e.into()),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.venus.readlink(fid(ino)) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e.into()),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.reply_entry(reply, self.venus.mkdir(fid(parent), name, mode & !umask));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.venus.unlink(fid(parent), name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.venus.unlink(fid(parent), name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.reply_entry(reply, self.venus.symlink(fid(parent), link_name, target));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.venus.rename(fid(parent), name, fid(newparent), newname, flags.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.reply_entry(reply, self.venus.link(fid(ino), fid(newparent), newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Closing a read-only handle stores nothing, so the kernel need not
        // ask: a compile opens and closes hundreds of sources and headers.
        let fopen = match crate::fs::opens_for_writing(flags.0) {
            true => FopenFlags::empty(),
            false => FopenFlags::FOPEN_NOFLUSH,
        };
        match self.venus.open(fid(ino), flags.0) {
            Ok((fh, shared)) => {
                if self.passthrough.load(Ordering::SeqCst) {
                    let mut backing = shared.backing.lock().unwrap();
                    if backing.is_none() {
                        match reply.open_backing(shared.file.as_ref()) {
                            Ok(id) => *backing = Some(id),
                            Err(e) => tracing::debug!("passthrough unavailable, serving reads myself: {e}"),
                        }
                    }
                    if let Some(id) = backing.as_ref() {
                        reply.opened_passthrough(FileHandle(fh), fopen, id);
                        return;
                    }
                }
                reply.opened(FileHandle(fh), fopen);
            }
            Err(e) => reply.error(e.into()),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.venus.read(fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e.into()),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.venus.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e.into()),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        match self.venus.flush(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.venus.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.venus.fsync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.into()),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.venus.listing(fid(ino)) {
            Ok(e) => e,
            Err(e) => return reply.error(e.into()),
        };
        let dots = [(ino.0, FileType::Directory, ".".to_string()), (ino.0, FileType::Directory, "..".to_string())];
        let all = dots.into_iter().chain(entries.into_iter().map(|(name, (f, k))| {
            let t = match k {
                FileKind::File => FileType::RegularFile,
                FileKind::Dir => FileType::Directory,
                FileKind::Symlink => FileType::Symlink,
            };
            (f.0, t, name)
        }));
        for (i, (ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace changes are on the server before their reply arrives.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.venus.statfs() {
            Ok(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.bsize),
            Err(e) => reply.error(e.into()),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.venus.create(fid(parent), name, mode & !umask, flags) {
            Ok((attr, fh, shared)) => {
                let fa = file_attr(&attr);
                if self.passthrough.load(Ordering::SeqCst) {
                    let mut backing = shared.backing.lock().unwrap();
                    if backing.is_none() {
                        if let Ok(id) = reply.open_backing(shared.file.as_ref()) {
                            *backing = Some(id);
                        }
                    }
                    if let Some(id) = backing.as_ref() {
                        reply.created_passthrough(
                            &Duration::ZERO,
                            &fa,
                            Generation(0),
                            FileHandle(fh),
                            FopenFlags::empty(),
                            id,
                        );
                        return;
                    }
                }
                reply.created(&Duration::ZERO, &fa, Generation(0), FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e.into()),
        }
    }
}
