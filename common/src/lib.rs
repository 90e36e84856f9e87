//! Everything afsd and venus share: identifiers, version vectors, attributes,
//! errors, the protocol (defined once in [`proto`]), framing, authentication
//! and the RPC layer.

pub mod attr;
pub mod auth;
pub mod error;
pub mod fid;
pub mod frame;
pub mod payload;
pub mod proto;
pub mod rpc;
pub mod sled_watchdog;
pub mod version_vector;

/// Bulk data moves in 1 MiB buffers. glibc would serve each from a fresh
/// mmap and unmap it on free (page faults on every chunk); keeping such
/// buffers on the heap and not trimming it eagerly makes transfers several
/// times cheaper. Memory stays bounded by the transfer windows: glibc also
/// gives every thread that allocates an arena of its own (up to eight per
/// core), each keeping what was freed into it, and the blocking-pool threads
/// that read and write chunks come and go, so after a few 1 GiB stores venus
/// held 113 MiB and afsd 175 MiB. One arena per core (at least two) kept
/// venus at 26 MiB and afsd under 50 MiB over the same writes, at no cost
/// measurable here: threads that run at once rarely share one. Call once
/// at the start of a binary.
pub fn tune_allocator() {
    let arenas = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    // SAFETY: mallopt only adjusts allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_ARENA_MAX, arenas as libc::c_int);
    }
}

/// Logs to stderr at the levels `RUST_LOG` names, as targets and levels
/// only ("warn", "venus=debug,info"): `Targets` needs no regex engine,
/// which spared the build two of its heaviest crates. Unset means info; a
/// malformed value also means info, and says so. Call once at the start
/// of a binary.
pub fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let info = || Targets::new().with_default(LevelFilter::INFO);
    let (filter, malformed) = match std::env::var("RUST_LOG") {
        Ok(s) if !s.trim().is_empty() => match s.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (info(), Some((s, e))),
        },
        _ => (info(), None),
    };
    // Colours only for a person at a terminal, not in log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    tracing_subscriber::registry().with(layer).with(filter).init();
    if let Some((value, e)) = malformed {
        tracing::warn!("RUST_LOG={value:?} is not a list of targets and levels ({e}); logging at info");
    }
}

/// Raises the soft limit on open descriptors to the hard limit. Each
/// connection holds two (its socket's halves, see `rpc::socket`) and each
/// open transfer one more, so a server with many clients would reach a
/// default soft limit of 1024 long before any real bound. Call once at the
/// start of a binary; on failure the limit stays as it was.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read or write one struct through a
    // valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// `FS_TOPDIR_FL` from linux/fs.h (not in the libc crate).
const FS_TOPDIR_FL: libc::c_int = 0x0002_0000;

/// Marks `dir` as the top of a directory hierarchy (`chattr +T`), so that
/// ext4 places each directory made in it in a block group of its own
/// rather than beside `dir`. Without a journal, ext4 makes every inode
/// allocation skip the inodes its group freed in the last minutes (an
/// inode-table lookup each), so directories that churn files are better
/// kept apart. Best effort: other filesystems place directories their own
/// way. Must be set before the subdirectories are made.
pub fn mark_top_dir(dir: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let Ok(d) = std::fs::File::open(dir) else { return };
    let mut flags: libc::c_int = 0;
    // SAFETY: both ioctls read or write one int through a valid pointer.
    unsafe {
        if libc::ioctl(d.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) == 0 && flags & FS_TOPDIR_FL == 0 {
            flags |= FS_TOPDIR_FL;
            libc::ioctl(d.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags);
        }
    }
}

pub use attr::{Attr, DirEntry, FileKind, FsStats, SetAttr, Timestamp};
pub use error::FsError;
pub use fid::Fid;
pub use version_vector::{VersionVector, VvOrder};
