//! The sending half of a connection, shared by client and server.
//!
//! Two queues feed one writer task: small frames (requests, replies, pushes)
//! and bulk frames (chunks of file data). The writer always drains the small
//! queue first, so a stat never waits behind a gigabyte: at most behind the
//! one chunk already on the wire.
//!
//! A small frame sent while the socket is idle (nothing queued, nothing
//! half-written, the writer not at work) skips the queue: the sender writes
//! it to the socket itself. Handing it to the writer task woke another
//! thread for every request and every reply, on both ends; on two cores
//! that wake-up was a good part of a small request's latency.

use super::socket::WriteHalf;
use crate::frame::Outgoing;
use crate::payload::{FileSlice, Payload};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};

/// Frames larger than this travel in the bulk queue.
const BULK_THRESHOLD: usize = 64 << 10;
/// The writer sends what it has gathered once it holds this much.
const COALESCE: usize = 128 << 10;

pub type Frame = Arc<Outgoing>;

#[derive(Clone)]
pub struct Outbox {
    urgent: mpsc::Sender<Frame>,
    bulk: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
}

/// What the writer task and the senders share.
struct Shared {
    /// Held by whoever puts bytes on the socket: the writer for a whole
    /// batch, a sender for one direct write.
    wire: tokio::sync::Mutex<Wire>,
    /// Small frames queued and not yet written out. A sender writes
    /// directly only when there are none, so no frame overtakes one queued
    /// before it. Counted before the frame is queued; uncounted by the
    /// writer under `wire` once the frame is on the socket.
    queued: AtomicUsize,
    /// Wakes the writer to send what a direct write left behind.
    kick: Notify,
    /// A write failed or the writer ended: nothing more goes out. Set
    /// under `wire`.
    stopped: AtomicBool,
}

/// The socket, and the bytes accepted for it and not yet written.
struct Wire {
    sock: WriteHalf,
    buf: Vec<u8>,
    /// How much of `buf` is already on the socket.
    sent: usize,
}

impl Wire {
    fn pending(&self) -> bool {
        self.sent < self.buf.len()
    }

    /// Writes what the socket takes without waiting; true once all is out.
    fn try_flush(&mut self) -> std::io::Result<bool> {
        while self.pending() {
            match self.sock.try_write(&self.buf[self.sent..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.buf.clear();
        self.sent = 0;
        Ok(true)
    }

    /// Writes everything accepted, waiting for room as needed.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.pending() {
            let (sock, rest) = (&mut self.sock, &self.buf[self.sent..]);
            sock.write_all(rest).await?;
        }
        self.buf.clear();
        self.sent = 0;
        Ok(())
    }

    /// Sends a frame: its head and small payload through the buffer, a
    /// large payload straight from memory, a file range from the page
    /// cache.
    async fn write(&mut self, frame: &Outgoing) -> std::io::Result<()> {
        self.buf.extend_from_slice(frame.head());
        match frame.payload() {
            Payload::Bytes(b) if b.len() < COALESCE => self.buf.extend_from_slice(b),
            Payload::Bytes(b) => {
                self.flush().await?;
                self.sock.write_all(b).await?;
            }
            Payload::File(slice) => {
                self.flush().await?;
                send_file(&mut self.sock, slice).await?;
            }
        }
        if self.buf.len() >= COALESCE {
            self.flush().await?;
        }
        Ok(())
    }
}

/// The writer task has stopped: the connection is gone.
#[derive(Debug)]
pub struct Closed;

/// Uncounts a small frame whose send was abandoned before it was queued.
struct QueuedGuard<'a>(&'a AtomicUsize);

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Outbox {
    /// Starts the writer task on `w`. It ends when every `Outbox` clone is
    /// dropped or a write fails.
    pub fn spawn(w: WriteHalf) -> Outbox {
        let (urgent, urgent_rx) = mpsc::channel::<Frame>(1024);
        // Two bulk frames queued keep the link busy without holding much memory.
        let (bulk, bulk_rx) = mpsc::channel::<Frame>(2);
        let shared = Arc::new(Shared {
            wire: tokio::sync::Mutex::new(Wire { sock: w, buf: Vec::new(), sent: 0 }),
            queued: AtomicUsize::new(0),
            kick: Notify::new(),
            stopped: AtomicBool::new(false),
        });
        tokio::spawn(run_writer(shared.clone(), urgent_rx, bulk_rx));
        Outbox { urgent, bulk, shared }
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
        if frame.len() > BULK_THRESHOLD {
            return self.bulk.send(frame).await.map_err(|_| Closed);
        }
        if matches!(frame.payload(), Payload::Bytes(_)) {
            match self.try_direct(&frame) {
                Direct::Sent => return Ok(()),
                Direct::Closed => return Err(Closed),
                Direct::Busy => {}
            }
        }
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        let guard = QueuedGuard(&self.shared.queued);
        self.urgent.send(frame).await.map_err(|_| Closed)?;
        // Queued: the writer uncounts it once it is out.
        std::mem::forget(guard);
        Ok(())
    }

    /// Writes a small frame to the socket on this thread if the socket is
    /// idle. Never waits: bytes the socket does not take now are left to
    /// the writer, so a send abandoned midway (a timeout) cannot cut a frame.
    fn try_direct(&self, frame: &Outgoing) -> Direct {
        let Ok(mut wire) = self.shared.wire.try_lock() else {
            return Direct::Busy;
        };
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Direct::Closed;
        }
        if wire.pending() || self.shared.queued.load(Ordering::SeqCst) != 0 {
            return Direct::Busy;
        }
        wire.buf.extend_from_slice(frame.head());
        if let Payload::Bytes(b) = frame.payload() {
            wire.buf.extend_from_slice(b);
        }
        match wire.try_flush() {
            Ok(true) => Direct::Sent,
            Ok(false) => {
                drop(wire);
                self.shared.kick.notify_one();
                Direct::Sent
            }
            Err(e) => {
                tracing::debug!("a direct write failed: {e}");
                self.shared.stopped.store(true, Ordering::SeqCst);
                drop(wire);
                self.shared.kick.notify_one();
                Direct::Closed
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.urgent.is_closed() || self.shared.stopped.load(Ordering::SeqCst)
    }
}

enum Direct {
    Sent,
    Busy,
    Closed,
}

/// The writer task: sends queued frames, small ones first, gathering the
/// small ones already waiting into one write, and finishes what direct
/// writes left behind.
async fn run_writer(shared: Arc<Shared>, mut urgent_rx: mpsc::Receiver<Frame>, mut bulk_rx: mpsc::Receiver<Frame>) {
    let (mut urgent_open, mut bulk_open) = (true, true);
    while urgent_open || bulk_open {
        let first = tokio::select! {
            biased;
            f = urgent_rx.recv(), if urgent_open => match f {
                Some(f) => Some((f, true)),
                None => {
                    urgent_open = false;
                    continue;
                }
            },
            f = bulk_rx.recv(), if bulk_open => match f {
                Some(f) => Some((f, false)),
                None => {
                    bulk_open = false;
                    continue;
                }
            },
            _ = shared.kick.notified() => None,
        };
        let mut wire = shared.wire.lock().await;
        if shared.stopped.load(Ordering::SeqCst) {
            break;
        }
        let mut small = 0;
        let mut result = Ok(());
        if let Some((f, is_small)) = first {
            small += usize::from(is_small);
            result = wire.write(&f).await;
        }
        while result.is_ok() {
            let Ok(f) = urgent_rx.try_recv() else { break };
            small += 1;
            result = wire.write(&f).await;
        }
        if result.is_ok() {
            result = wire.flush().await;
        }
        shared.queued.fetch_sub(small, Ordering::SeqCst);
        if let Err(e) = result {
            tracing::debug!("a write failed: {e}");
            shared.stopped.store(true, Ordering::SeqCst);
            break;
        }
    }
    // Ends the sending direction (the peer reads the end of the stream), and
    // no sender writes after this.
    let mut wire = shared.wire.lock().await;
    shared.stopped.store(true, Ordering::SeqCst);
    let _ = wire.sock.shutdown().await;
    // Queued senders get `Closed` from here on.
    urgent_rx.close();
    bulk_rx.close();
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
    use crate::frame::Message;
    use crate::proto::{Request, StageWriteReq};
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

    /// A message that says who sent it and its place in that sender's order.
    fn numbered(sender: u64, n: u64) -> Frame {
        Arc::new(crate::frame::encode_message(Message::BreakAck { id: sender << 32 | n }).unwrap())
    }

    /// A bulk frame: a staged write of `len` bytes, each `handle as u8`.
    fn bulk(handle: u64, len: usize) -> Frame {
        let body = Request::StageWrite(StageWriteReq { handle, offset: 0, data: vec![handle as u8; len].into() });
        let xid = crate::proto::Xid { client: uuid::Uuid::nil(), seq: handle };
        Arc::new(crate::frame::encode_message(Message::Call { xid, ack: 0, body }).unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_sent_at_once_arrive_whole_and_each_in_its_senders_order() {
        // Many senders at once, so that some frames go straight to the
        // socket and others through the queue, with bulk frames (written
        // by the writer alone) between them.
        let (tx, mut rx) = pair().await;
        let outbox = Outbox::spawn(tx);
        let (senders, each, bulks) = (6u64, 400u64, 8u64);
        let mut tasks = Vec::new();
        for s in 0..senders {
            let outbox = outbox.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0..each {
                    outbox.send(numbered(s, n)).await.unwrap();
                    if n % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        let big = outbox.clone();
        tasks.push(tokio::spawn(async move {
            for h in 1..=bulks {
                big.send(bulk(h, 300 << 10)).await.unwrap();
            }
        }));
        for t in tasks {
            t.await.unwrap();
        }
        drop(outbox);
        let mut next = vec![0u64; senders as usize];
        let mut bulk_seen = 0;
        while let Some(msg) = crate::frame::read_message_frame(&mut rx).await.unwrap() {
            match msg {
                Message::BreakAck { id } => {
                    let (s, n) = ((id >> 32) as usize, id & 0xffff_ffff);
                    assert_eq!(n, next[s], "sender {s}'s frames out of order");
                    next[s] += 1;
                }
                Message::Call { body: Request::StageWrite(w), .. } => {
                    assert_eq!(w.data.len(), 300 << 10);
                    assert!(w.data.iter().all(|&b| b == w.handle as u8), "bulk frame {} mixed with others", w.handle);
                    bulk_seen += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(next.iter().all(|&n| n == each), "frames lost: {next:?}");
        assert_eq!(bulk_seen, bulks);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_the_socket_cannot_take_at_once_still_arrives_whole() {
        // The peer reads nothing until the socket's buffers are full, so
        // direct writes stop part-way and the writer must finish them.
        let (tx, mut rx) = pair().await;
        let outbox = Outbox::spawn(tx);
        let sender = tokio::spawn(async move {
            for h in 0..200u64 {
                // Small enough for a direct write, large enough to fill the
                // socket's buffers in a few dozen.
                outbox.send(bulk(h, 60 << 10)).await.unwrap();
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut seen = 0u64;
        while let Some(msg) = crate::frame::read_message_frame(&mut rx).await.unwrap() {
            let Message::Call { body: Request::StageWrite(w), .. } = msg else { panic!("unexpected message") };
            assert_eq!(w.handle, seen, "frames out of order");
            assert!(w.data.len() == 60 << 10 && w.data.iter().all(|&b| b == w.handle as u8));
            seen += 1;
        }
        sender.await.unwrap();
        assert_eq!(seen, 200);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_peer_makes_sends_fail_instead_of_hang() {
        let (tx, rx) = pair().await;
        let outbox = Outbox::spawn(tx);
        drop(rx);
        let mut failed = false;
        for n in 0..10_000 {
            let sent = tokio::time::timeout(std::time::Duration::from_secs(5), outbox.send(numbered(0, n)))
                .await
                .expect("a send hung on a closed connection");
            if sent.is_err() {
                failed = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(failed, "sends to a closed peer kept succeeding");
        assert!(outbox.is_closed());
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
