//! The sending half of a connection, shared by client and server.
//!
//! Two queues feed one writer task: small frames (requests, replies, pushes)
//! and bulk frames (chunks of file data). The writer always drains the small
//! queue first, so a stat never waits behind a gigabyte: at most behind the
//! one chunk already on the wire.

use super::socket::WriteHalf;
use crate::frame::Outgoing;
use crate::payload::{FileSlice, Payload};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

/// Frames larger than this travel in the bulk queue.
const BULK_THRESHOLD: usize = 64 << 10;

pub type Frame = Arc<Outgoing>;

#[derive(Clone)]
pub struct Outbox {
    urgent: mpsc::Sender<Frame>,
    bulk: mpsc::Sender<Frame>,
}

/// The writer task has stopped: the connection is gone.
#[derive(Debug)]
pub struct Closed;

impl Outbox {
    /// Starts the writer task on `w`. It ends when every `Outbox` clone is
    /// dropped or a write fails.
    pub fn spawn(w: WriteHalf) -> Outbox {
        let mut w = BufWriter::with_capacity(128 << 10, w);
        let (urgent, mut urgent_rx) = mpsc::channel::<Frame>(1024);
        // Two bulk frames queued keep the link busy without holding much memory.
        let (bulk, mut bulk_rx) = mpsc::channel::<Frame>(2);
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    biased;
                    Some(f) = urgent_rx.recv() => f,
                    Some(f) = bulk_rx.recv() => f,
                    else => break,
                };
                if write(&mut w, &frame).await.is_err() {
                    break;
                }
                // Coalesce whatever small frames are already waiting.
                let mut failed = false;
                while let Ok(f) = urgent_rx.try_recv() {
                    if write(&mut w, &f).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || w.flush().await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
        });
        Outbox { urgent, bulk }
    }

    /// Encodes and queues a message.
    pub async fn send_message(&self, msg: crate::frame::Message) -> Result<(), Closed> {
        match crate::frame::encode_message(msg) {
            Ok(f) => self.send(Arc::new(f)).await,
            Err(e) => {
                tracing::error!("cannot encode a message: {e}");
                Ok(())
            }
        }
    }

    pub async fn send(&self, frame: Frame) -> Result<(), Closed> {
        let queue = if frame.len() > BULK_THRESHOLD { &self.bulk } else { &self.urgent };
        queue.send(frame).await.map_err(|_| Closed)
    }

    pub fn is_closed(&self) -> bool {
        self.urgent.is_closed()
    }
}

/// The head goes through the buffer; a large payload goes straight to the
/// socket (the buffer passes writes larger than itself through), and a file
/// range goes from the page cache to the socket.
async fn write(w: &mut BufWriter<WriteHalf>, frame: &Outgoing) -> std::io::Result<()> {
    w.write_all(frame.head()).await?;
    match frame.payload() {
        Payload::Bytes(b) => w.write_all(b).await,
        Payload::File(slice) => {
            w.flush().await?;
            send_file(w.get_mut(), slice).await
        }
    }
}

/// Sends a file range with `sendfile(2)` on the non-blocking socket,
/// waiting for room whenever the socket's buffer is full.
async fn send_file(sock: &mut WriteHalf, slice: &FileSlice) -> std::io::Result<()> {
    let in_fd = slice.file.as_raw_fd();
    let mut offset = slice.offset as libc::off_t;
    let end = offset + slice.len as libc::off_t;
    while offset < end {
        let sent = sock
            .write_with(|out_fd| {
                let want = (end - offset) as usize;
                let cached = all_cached(in_fd, offset as u64, want);
                let mut send = || {
                    // SAFETY: both descriptors stay open for the call (the
                    // socket is borrowed, the file held by the slice), and
                    // `offset` is a valid off_t the kernel advances.
                    let n = unsafe { libc::sendfile(out_fd, in_fd, &mut offset, want) };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                };
                // Pages not yet cached are read from disk, which blocks:
                // then this worker's other tasks move elsewhere first. That
                // hand-off costs a thread switch, so cached pages (the usual
                // case, with the kernel's readahead running ahead of a
                // sequential fetch) are sent at once.
                if cached {
                    send()
                } else {
                    super::blocking(send)
                }
            })
            .await;
        match sent {
            Ok(0) => {
                // The frame announced more bytes than the file now holds (an
                // edit behind the server's back truncated it): the stream
                // cannot be kept in step, so the connection ends here.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file shrank while a chunk of it was being sent",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // The file cannot be spliced (its filesystem says EINVAL) or
                // a read failed: the frame's head is out, so the rest goes
                // the plain way, and only if that fails too does the
                // connection end.
                tracing::debug!("sendfile failed ({e}); reading the rest of the chunk instead");
                return send_by_reading(sock, &slice.file, offset as u64, (end - offset) as usize).await;
            }
        }
    }
    Ok(())
}

/// Whether sending `len` bytes of `fd` from `offset` can go ahead without
/// reading the disk: every page of the range is in the page cache
/// (`cachestat(2)`, Linux 6.5), and its last page has been read in (a
/// one-byte `preadv2` with `RWF_NOWAIT`: pages that readahead has only
/// started count as cached before their bytes are there). A hint, not a
/// promise: a page can still be evicted, or be in flight behind the last
/// one, and the send then waits for that read on this worker. Where either
/// call is missing the answer is no, and the caller takes the path that may
/// block.
fn all_cached(fd: std::os::fd::RawFd, offset: u64, len: usize) -> bool {
    if len == 0 {
        return true;
    }
    let last = offset + len as u64 - 1;
    let mut byte = 0u8;
    let iov = libc::iovec { iov_base: (&mut byte as *mut u8).cast(), iov_len: 1 };
    // SAFETY: one iovec naming one writable byte, on an open descriptor.
    let read_in = unsafe { libc::preadv2(fd, &iov, 1, last as libc::off_t, libc::RWF_NOWAIT) } == 1;
    read_in && cached_pages(fd, offset, len)
}

/// `cachestat(2)`'s number in the table the architectures below share since
/// Linux 5.1; elsewhere (alpha, mips, x32) it is not asked.
const SYS_CACHESTAT: Option<libc::c_long> = if cfg!(any(
    all(target_arch = "x86_64", target_pointer_width = "64"),
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "powerpc64",
    target_arch = "s390x",
    target_arch = "loongarch64"
)) {
    Some(451)
} else {
    None
};

/// Whether every page of the range is in the page cache (`cachestat(2)`).
fn cached_pages(fd: std::os::fd::RawFd, offset: u64, len: usize) -> bool {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let Some(nr) = SYS_CACHESTAT else { return false };
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as u64,
        _ => return false,
    };
    let range = Range { off: offset, len: len as u64 };
    let mut stat = Stat::default();
    // SAFETY: both pointers are valid for the call and point at structs laid
    // out as the kernel's `cachestat_range` and `cachestat`; flags must be 0.
    let r = unsafe { libc::syscall(nr, fd, &range as *const Range, &mut stat as *mut Stat, 0) };
    let pages = (offset + len as u64 - 1) / page - offset / page + 1;
    r == 0 && stat.nr_cache >= pages
}

/// Sends `len` bytes of `file` from `offset` through a buffer.
async fn send_by_reading(
    sock: &mut WriteHalf,
    file: &std::fs::File,
    mut offset: u64,
    mut len: usize,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(256 << 10)];
    while len > 0 {
        let want = len.min(buf.len());
        let n = super::blocking(|| file.read_at(&mut buf[..want], offset))?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while a chunk of it was being sent",
            ));
        }
        sock.write_all(&buf[..n]).await?;
        offset += n as u64;
        len -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A file of `len` patterned bytes in a fresh temporary directory.
    fn patterned_file(name: &str, len: usize) -> (std::path::PathBuf, Vec<u8>) {
        let dir = std::env::temp_dir().join(format!("outbox-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let path = dir.join("f");
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    /// A connected pair: the sending end's write half, and the other end.
    async fn pair() -> (WriteHalf, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        // The read half is dropped at once: dropping the write half then
        // closes the socket, and the other end reads its end.
        let (_, tx) = super::super::socket::split(a.unwrap()).unwrap();
        (tx, b.unwrap().0)
    }

    /// Sends `slice` on one end of a socket pair while the other end reads
    /// all it gets; returns the send's result and the bytes received.
    async fn send_and_receive(slice: FileSlice) -> (std::io::Result<()>, Vec<u8>) {
        let (mut tx, mut rx) = pair().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        let sent = send_file(&mut tx, &slice).await;
        drop(tx);
        (sent, reader.await.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_range_arrives_whole_through_a_full_socket_buffer() {
        // Larger than any socket buffer, from an offset, so the sender must
        // wait for room and resume where sendfile stopped.
        let (path, data) = patterned_file("whole", 9 << 20);
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let (offset, len) = (12345usize, (8 << 20) + 7);
        let (sent, got) = send_and_receive(FileSlice { file, offset: offset as u64, len }).await;
        sent.unwrap();
        assert!(got == data[offset..offset + len], "received {} bytes, not the range", got.len());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// The fallback when sendfile fails part-way: the rest through a buffer.
    #[tokio::test(flavor = "current_thread")]
    async fn the_plain_path_sends_the_same_range() {
        let (path, data) = patterned_file("plain", 3 << 20);
        let file = std::fs::File::open(&path).unwrap();
        let (mut tx, mut rx) = pair().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            rx.read_to_end(&mut got).await.unwrap();
            got
        });
        let (offset, len) = (777usize, (2 << 20) + 3);
        send_by_reading(&mut tx, &file, offset as u64, len).await.unwrap();
        drop(tx);
        assert!(reader.await.unwrap() == data[offset..offset + len]);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_file_shorter_than_its_announced_range_is_an_error_not_a_hang() {
        let (path, data) = patterned_file("short", 100_000);
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let (sent, got) = send_and_receive(FileSlice { file, offset: 0, len: 200_000 }).await;
        let err = sent.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(got, data, "what the file held was sent before the error");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
