//! Reading a fetched file from disk ahead of the chunks being sent.
//!
//! A whole-file fetch reads the file front to back, so the server knows
//! which bytes come next long before they are asked for. The kernel's own
//! readahead waits for the reader to come near before it reads on, and
//! keeps only a window or so in flight; a virtual disk here delivers
//! 800 MB/s that way and over 2 GB/s with 32 MiB asked for in advance. So a
//! fetch asks for [`AHEAD`] bytes past the chunk being requested, a
//! [`STEP`] at a time.
//!
//! How it asks matters as much. `posix_fadvise(WILLNEED)` fills the page
//! cache with 4 KiB pages, one allocation, LRU insertion and cgroup charge
//! each: 0.25 s of CPU per GiB, a quarter of what a cold fetch has on two
//! cores, on the thread that submits it. A fault in a mapping marked
//! `MADV_HUGEPAGE` reads in 2 MiB folios instead (where the filesystem has
//! large folios, as ext4 and xfs do on recent kernels), for a few
//! hundredths of a second per GiB, and `sendfile` then has 512 times fewer
//! folios to walk. So the range is faulted in through a short-lived
//! mapping (`MADV_POPULATE_READ`, which waits for the reads), 2 MiB at a
//! time; where that cannot be done, `WILLNEED` it is.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// How far past the requested chunk the disk is kept reading.
pub const AHEAD: u64 = 32 << 20;

/// Read-ahead is asked for a step at a time: one blocking task per step
/// of the fetch, not one per chunk.
pub const STEP: u64 = 8 << 20;

/// One `WILLNEED` call reads no more than the larger of the device's
/// largest request and the file's readahead window, and silently drops the
/// rest of its range: 8 MiB on a disk with an 8 MiB window, 256 KiB on one
/// with the default 128 KiB window (doubled by `POSIX_FADV_SEQUENTIAL`, which the
/// fetch sets). So a range is asked for in pieces no larger than that.
pub const PIECE: u64 = 256 << 10;

/// The range to ask for when a fetch is asked for `len` bytes at `offset`:
/// when the request reaches into a new step, the step [`AHEAD`] beyond it.
pub fn range_for(offset: u64, len: u64) -> Option<(u64, u64)> {
    let (from, to) = (offset / STEP, (offset + len) / STEP);
    (to > from).then(|| (to * STEP + AHEAD - STEP, STEP))
}

/// Reads ahead running at once, at most. Each holds a blocking-pool thread
/// while the disk reads its step; past this many (a crowd of cold fetches)
/// a step is skipped and the kernel's own readahead serves it, rather than
/// queueing reads that would come too late and filling the pool that
/// `block_in_place` also draws on.
const MAX_RUNNING: usize = 16;

static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Starts reading `len` bytes of `file` at `offset` into the page cache.
/// Both ways wait (for the reads, or for room in the disk's queue), so it
/// runs off the async workers; nothing waits for it.
pub fn start(file: Arc<File>, offset: u64, len: u64) {
    if RUNNING.fetch_add(1, Ordering::Relaxed) >= MAX_RUNNING {
        RUNNING.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    tokio::task::spawn_blocking(move || {
        if let Some(from) = fault_in(&file, offset, len) {
            advise(&file, from, offset.saturating_add(len).saturating_sub(from));
        }
        RUNNING.fetch_sub(1, Ordering::Relaxed);
    });
}

/// The unit of mapping: 2 MiB, a PMD-sized folio on x86-64.
const HUGE: u64 = 2 << 20;

/// Faults the range in through a mapping, [`HUGE`] at a time so the
/// mapping (which counts in the server's resident size while it lasts)
/// stays small. Each fault reads up to 4 MiB, aligned to 2 MiB, so a little
/// past the range may be read too. Returns where it had to stop, if it did
/// (an old kernel, a kernel without THP, a filesystem that cannot be mapped,
/// no memory for a mapping), for the rest to be asked for another way; a
/// file that shrank meanwhile just ends the reading.
fn fault_in(file: &File, offset: u64, len: u64) -> Option<u64> {
    let Ok(size) = file.metadata().map(|m| m.len()) else { return Some(offset) };
    let end = offset.saturating_add(len).min(size);
    for at in (offset / HUGE * HUGE..end).step_by(HUGE as usize) {
        let read = Mapping::new(file, at, HUGE.min(size - at))
            .ok_or_else(std::io::Error::last_os_error)
            .and_then(|map| map.advise(libc::MADV_HUGEPAGE).and_then(|()| map.advise(libc::MADV_POPULATE_READ)));
        match read {
            Ok(()) => {}
            // Past the end of a file truncated since (or a read error,
            // which sendfile will meet and report): nothing more to do.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => return None,
            Err(_) => return Some(at.max(offset)),
        }
    }
    None
}

/// A read-only shared mapping of part of a file, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File, offset: u64, len: u64) -> Option<Mapping> {
        let len = len as usize;
        // SAFETY: a new mapping the kernel places; `offset` is a multiple of
        // HUGE, so page aligned. Nothing reads through it (see `advise`).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        (addr != libc::MAP_FAILED).then_some(Mapping { addr, len })
    }

    /// Only advice: the bytes are never touched through the mapping, so a
    /// concurrent truncation is an error code (EFAULT), never a SIGBUS.
    fn advise(&self, advice: libc::c_int) -> std::io::Result<()> {
        // SAFETY: the range is exactly this mapping.
        match unsafe { libc::madvise(self.addr, self.len, advice) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped, once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// The fallback: `WILLNEED`, in pieces (see [`PIECE`]).
fn advise(file: &File, offset: u64, len: u64) {
    for (at, len) in pieces(offset, len) {
        // SAFETY: an advisory call on an open descriptor.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), at as libc::off_t, len as libc::off_t, libc::POSIX_FADV_WILLNEED)
        };
    }
}

/// `len` bytes from `offset` as consecutive ranges of at most [`PIECE`].
fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset.saturating_add(len);
    (offset..end).step_by(PIECE as usize).map(move |at| (at, PIECE.min(end - at)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn each_step_crossed_asks_for_the_step_ahead_of_it() {
        // The fetch itself asks for what follows its first chunk up to
        // AHEAD; chunks then keep it ahead.
        assert_eq!(range_for(MIB, MIB), None);
        assert_eq!(range_for(7 * MIB, MIB), Some((8 * MIB + AHEAD - STEP, STEP)));
        assert_eq!(range_for(8 * MIB, MIB), None);
        assert_eq!(range_for(15 * MIB, MIB), Some((16 * MIB + AHEAD - STEP, STEP)));
        // A short last chunk that ends inside a step asks for nothing.
        assert_eq!(range_for(16 * MIB, 100), None);
    }

    #[test]
    fn a_range_is_asked_for_in_pieces_that_cover_it_exactly() {
        let asked: Vec<_> = pieces(MIB, AHEAD - MIB).collect();
        assert!(asked.iter().all(|&(_, len)| len <= PIECE && len > 0));
        assert_eq!(asked.first().map(|p| p.0), Some(MIB));
        for w in asked.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "gap or overlap in {asked:?}");
        }
        let last = asked.last().unwrap();
        assert_eq!(last.0 + last.1, AHEAD, "ends where the range does");
        assert_eq!(pieces(5, 0).count(), 0, "an empty range asks for nothing");
        assert_eq!(pieces(0, PIECE + 1).collect::<Vec<_>>(), vec![(0, PIECE), (PIECE, 1)]);
    }

    /// Which of the file's pages are in the page cache.
    fn resident(file: &File) -> Vec<bool> {
        let len = file.metadata().unwrap().len() as usize;
        let map = Mapping::new(file, 0, len as u64).unwrap();
        let mut pages = vec![0u8; len.div_ceil(page_size())];
        // SAFETY: one byte per page of the mapping, in a vector that long.
        assert_eq!(unsafe { libc::mincore(map.addr, map.len, pages.as_mut_ptr()) }, 0);
        pages.iter().map(|p| p & 1 == 1).collect()
    }

    fn page_size() -> usize {
        // SAFETY: sysconf reads a constant.
        unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
    }

    /// Drops the file's (clean) pages from the page cache, and checks they
    /// went: a filesystem that keeps them (tmpfs) cannot show a read.
    fn evict(file: &File) {
        // SAFETY: an advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert!(resident(file).iter().all(|&r| !r), "the test file must be on a disk that evicts");
    }

    #[test]
    fn a_range_is_read_into_the_page_cache_and_a_range_past_the_end_stops_there() {
        use std::io::Write;
        // Under target/, on a real disk: /tmp may be a tmpfs.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("afsd-readahead-test-{}", uuid::Uuid::new_v4()));
        let size = 6 * MIB + 123;
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; size as usize]).unwrap();
        f.sync_all().unwrap();
        let file = File::open(&path).unwrap();
        let page = |at: u64| at as usize / page_size();

        evict(&file);
        assert_eq!(fault_in(&file, MIB + 5, 3 * MIB), None);
        let pages = resident(&file);
        assert!(pages[page(MIB + 5)..=page(4 * MIB + 4)].iter().all(|&r| r), "the asked-for range is resident");

        // Asked for far past the end: it reads to the end and stops there.
        evict(&file);
        assert_eq!(fault_in(&file, 4 * MIB + 1, 1 << 30), None);
        assert!(resident(&file)[page(4 * MIB + 1)..].iter().all(|&r| r), "up to the last page");
        assert_eq!(fault_in(&file, 64 * MIB, MIB), None, "wholly past the end: nothing to do");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_mapped_is_left_to_the_fallback_from_where_it_was_asked() {
        // A sysfs attribute: 4096 bytes long, and no mmap.
        let file = File::open("/sys/kernel/uevent_seqnum").unwrap();
        assert_eq!(file.metadata().unwrap().len(), 4096);
        assert_eq!(fault_in(&file, 100, 1000), Some(100));
    }

    #[test]
    fn consecutive_chunks_cover_everything_ahead_once() {
        let mut asked = Vec::new();
        for i in 1..100 {
            if let Some((off, len)) = range_for(i * MIB, MIB) {
                asked.push((off, len));
            }
        }
        for w in asked.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "gap or overlap in {asked:?}");
        }
        assert_eq!(asked[0].0, AHEAD, "the first step follows what the fetch asked for");
    }
}
