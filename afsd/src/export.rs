//! The exported directory, reached only through file descriptors.
//!
//! Every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! relative to the export's root descriptor, and every final step is an `*at`
//! call on an already validated name. So no request, and no symlink an admin
//! or a client placed in the export, can make the server read or write
//! anything outside it: the kernel refuses the walk.

use common::error::validate_name;
use common::{FsError, Timestamp};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The result of `lstat`, reduced to what the server uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ino: u64,
    pub dev: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

impl Stat {
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFLNK
    }

    fn from_raw(st: &libc::stat) -> Stat {
        Stat {
            ino: st.st_ino,
            dev: st.st_dev,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            atime: Timestamp { secs: st.st_atime, nanos: st.st_atime_nsec as u32 },
            mtime: Timestamp { secs: st.st_mtime, nanos: st.st_mtime_nsec as u32 },
            ctime: Timestamp { secs: st.st_ctime, nanos: st.st_ctime_nsec as u32 },
        }
    }
}

fn cstr(s: &str) -> Result<CString, FsError> {
    CString::new(s).map_err(|_| FsError::InvalidName(format!("{s:?} contains NUL")))
}

fn check(ret: libc::c_int) -> Result<libc::c_int, FsError> {
    if ret < 0 {
        Err(std::io::Error::last_os_error().into())
    } else {
        Ok(ret)
    }
}

/// A relative path inside the export, built from validated names only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelPath(Vec<String>);

impl RelPath {
    pub fn root() -> RelPath {
        RelPath(Vec::new())
    }

    pub fn from_names(names: Vec<String>) -> Result<RelPath, FsError> {
        for n in &names {
            validate_name(n)?;
        }
        Ok(RelPath(names))
    }

    /// The parent and the last name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        let (last, rest) = self.0.split_last()?;
        Some((RelPath(rest.to_vec()), last))
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    fn as_c(&self) -> Result<CString, FsError> {
        if self.0.is_empty() {
            cstr(".")
        } else {
            cstr(&self.0.join("/"))
        }
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "/{}", self.0.join("/"))
    }
}

/// The export root, held open.
pub struct Export {
    root: OwnedFd,
    path: PathBuf,
}

/// An open directory inside the export: the base for `*at` calls.
pub struct Dir(OwnedFd);

impl Export {
    pub fn open(path: &Path) -> Result<Export, FsError> {
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| FsError::Invalid("NUL in export path".into()))?;
        // SAFETY: plain syscall on a valid C string; the fd is owned below.
        let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) })?;
        Ok(Export { root: unsafe { OwnedFd::from_raw_fd(fd) }, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// openat2 beneath the root, never following a symlink anywhere.
    fn open_beneath(&self, rel: &RelPath, flags: i32, mode: u32) -> Result<OwnedFd, FsError> {
        let c = rel.as_c()?;
        // SAFETY: open_how is plain data; zero is valid for every field.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.mode = if flags & libc::O_CREAT != 0 { mode as u64 } else { 0 };
        how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: `how` is a valid open_how and its size is passed with it.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EXDEV) => FsError::Access,
                Some(libc::ELOOP) => FsError::Loop,
                _ => e.into(),
            });
        }
        // SAFETY: a fresh descriptor from the kernel, owned from here on.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn dir(&self, rel: &RelPath) -> Result<Dir, FsError> {
        Ok(Dir(self.open_beneath(rel, libc::O_DIRECTORY | libc::O_RDONLY, 0)?))
    }

    pub fn open_file(&self, rel: &RelPath, flags: i32) -> Result<File, FsError> {
        Ok(File::from(self.open_beneath(rel, flags | libc::O_NOFOLLOW, 0)?))
    }

    pub fn lstat(&self, rel: &RelPath) -> Result<Stat, FsError> {
        match rel.split_last() {
            None => self.dir(rel)?.fstat(),
            Some((parent, name)) => self.dir(&parent)?.lstat(name),
        }
    }
}

impl Dir {
    /// The directory's descriptor as a `File`, to fsync it later.
    pub fn into_file(self) -> File {
        File::from(self.0)
    }

    pub fn fstat(&self) -> Result<Stat, FsError> {
        fstat(self.0.as_raw_fd())
    }

    pub fn lstat(&self, name: &str) -> Result<Stat, FsError> {
        let c = cstr(name)?;
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, C string and out-pointer.
        check(unsafe { libc::fstatat(self.0.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
        Ok(Stat::from_raw(&st))
    }

    pub fn open(&self, name: &str, flags: i32, mode: u32) -> Result<File, FsError> {
        let c = cstr(name)?;
        // SAFETY: valid fd and C string; the result is owned by File.
        let fd = check(unsafe {
            libc::openat(self.0.as_raw_fd(), c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode)
        })?;
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    pub fn mkdir(&self, name: &str, mode: u32) -> Result<(), FsError> {
        let c = cstr(name)?;
        check(unsafe { libc::mkdirat(self.0.as_raw_fd(), c.as_ptr(), mode) }).map(|_| ())
    }

    pub fn unlink(&self, name: &str) -> Result<(), FsError> {
        let c = cstr(name)?;
        check(unsafe { libc::unlinkat(self.0.as_raw_fd(), c.as_ptr(), 0) }).map(|_| ())
    }

    pub fn rmdir(&self, name: &str) -> Result<(), FsError> {
        let c = cstr(name)?;
        check(unsafe { libc::unlinkat(self.0.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) }).map(|_| ())
    }

    pub fn symlink(&self, target: &str, name: &str) -> Result<(), FsError> {
        let (t, c) = (cstr(target)?, cstr(name)?);
        check(unsafe { libc::symlinkat(t.as_ptr(), self.0.as_raw_fd(), c.as_ptr()) }).map(|_| ())
    }

    pub fn readlink(&self, name: &str) -> Result<String, FsError> {
        let c = cstr(name)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        let n = unsafe { libc::readlinkat(self.0.as_raw_fd(), c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        buf.truncate(n as usize);
        String::from_utf8(buf).map_err(|_| FsError::Invalid("symlink target is not UTF-8".into()))
    }

    /// A new file without a name in this directory (`O_TMPFILE`). Its inode
    /// is allocated near the directory, where a file created here would be.
    pub fn open_unnamed(&self, mode: u32) -> Result<File, FsError> {
        // SAFETY: valid fd and C string; the result is owned by File.
        let fd = check(unsafe {
            libc::openat(self.0.as_raw_fd(), c".".as_ptr(), libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC, mode)
        })?;
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Gives a file opened by [`Dir::open_unnamed`] (of the same filesystem)
    /// the name `self/name`.
    pub fn link_unnamed(&self, file: &File, name: &str) -> Result<(), FsError> {
        let c = cstr(name)?;
        // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; the /proc path does not.
        let proc = cstr(&format!("/proc/self/fd/{}", file.as_raw_fd()))?;
        check(unsafe {
            libc::linkat(libc::AT_FDCWD, proc.as_ptr(), self.0.as_raw_fd(), c.as_ptr(), libc::AT_SYMLINK_FOLLOW)
        })
        .map(|_| ())
    }

    /// A hard link from `from_dir/from` to `self/name`; never follows symlinks.
    pub fn link_from(&self, from_dir: &Dir, from: &str, name: &str) -> Result<(), FsError> {
        let (f, c) = (cstr(from)?, cstr(name)?);
        check(unsafe { libc::linkat(from_dir.0.as_raw_fd(), f.as_ptr(), self.0.as_raw_fd(), c.as_ptr(), 0) })
            .map(|_| ())
    }

    /// Renames `from_dir/from` to `self/to`, replacing `to` unless `no_replace`.
    pub fn rename_from(&self, from_dir: &Dir, from: &str, to: &str, no_replace: bool) -> Result<(), FsError> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        let flags = if no_replace { libc::RENAME_NOREPLACE } else { 0 };
        check(unsafe { libc::renameat2(from_dir.0.as_raw_fd(), f.as_ptr(), self.0.as_raw_fd(), t.as_ptr(), flags) })
            .map(|_| ())
    }

    /// Sets times without following a symlink.
    pub fn set_times(&self, name: &str, atime: Option<Timestamp>, mtime: Option<Timestamp>) -> Result<(), FsError> {
        let c = cstr(name)?;
        let ts = |t: Option<Timestamp>| match t {
            Some(t) => libc::timespec { tv_sec: t.secs, tv_nsec: t.nanos as i64 },
            None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        };
        let times = [ts(atime), ts(mtime)];
        check(unsafe { libc::utimensat(self.0.as_raw_fd(), c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
            .map(|_| ())
    }

    pub fn chown(&self, name: &str, uid: Option<u32>, gid: Option<u32>) -> Result<(), FsError> {
        let c = cstr(name)?;
        let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
        check(unsafe { libc::fchownat(self.0.as_raw_fd(), c.as_ptr(), u, g, libc::AT_SYMLINK_NOFOLLOW) }).map(|_| ())
    }

    /// Names in this directory (without `.` and `..`).
    pub fn list(&self) -> Result<Vec<String>, FsError> {
        let path = format!("/proc/self/fd/{}", self.0.as_raw_fd());
        let mut out = Vec::new();
        for e in std::fs::read_dir(&path)? {
            let e = e?;
            match e.file_name().into_string() {
                Ok(n) => out.push(n),
                Err(n) => tracing::warn!(name = ?n, "skipping a name that is not UTF-8"),
            }
        }
        Ok(out)
    }

    pub fn sync(&self) -> Result<(), FsError> {
        check(unsafe { libc::fsync(self.0.as_raw_fd()) }).map(|_| ())
    }
}

pub fn fstat(fd: i32) -> Result<Stat, FsError> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(Stat::from_raw(&st))
}

/// Opens a directory outside the export (the staging area) as a `Dir`.
pub fn open_dir_path(path: &Path) -> Result<Dir, FsError> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| FsError::Invalid("NUL in path".into()))?;
    let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC) })?;
    Ok(Dir(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_never_lead_outside_the_export() {
        let base = std::env::temp_dir().join(format!("afsd-export-test-{}", uuid::Uuid::new_v4()));
        let export = base.join("export");
        let outside = base.join("outside");
        std::fs::create_dir_all(&export).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(&outside, export.join("escape")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", export.join("link")).unwrap();
        let e = Export::open(&export).unwrap();
        let via_dir = RelPath::from_names(vec!["escape".into(), "secret".into()]).unwrap();
        assert!(e.open_file(&via_dir, libc::O_RDONLY).is_err());
        assert!(e.dir(&RelPath::from_names(vec!["escape".into()]).unwrap()).is_err());
        assert!(e.open_file(&RelPath::from_names(vec!["link".into()]).unwrap(), libc::O_RDONLY).is_err());
        // lstat of the link itself is fine: it is an object in the export.
        assert!(e.lstat(&RelPath::from_names(vec!["link".into()]).unwrap()).unwrap().is_symlink());
        assert!(RelPath::from_names(vec!["..".into()]).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
