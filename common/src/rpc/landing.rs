//! Landing chunk payloads straight in their destination file.
//!
//! A fetch writes every chunk to venus's container file at its offset.
//! Reading a chunk into a buffer and writing it out copies each byte twice;
//! instead, the connection's reader moves the payload from the socket into a
//! pipe with `splice(2)` (the pipe takes references to the socket's pages,
//! no copy) and from the pipe into the file (one copy, into the page cache).
//! A caller names the destination before it sends the request (a [`Sink`]
//! under the call's sequence number), and the reply then says where the
//! bytes went instead of carrying them.

use super::socket::ReadHalf;
use crate::frame::FrameError;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

/// Where the payload of one call's reply goes.
#[derive(Clone, Debug)]
pub struct Sink {
    pub file: Arc<File>,
    pub offset: u64,
}

/// Sinks by call sequence number. They belong to the client, not to a
/// connection, so a reply to a call resent on a new connection lands too.
pub type Sinks = Arc<Mutex<HashMap<u64, Sink>>>;

/// One connection's pipe between its socket and the files payloads land in.
pub struct Lander {
    read: File,
    write: OwnedFd,
    /// Bytes the pipe holds at most (a splice into it moves no more).
    capacity: usize,
    /// Cleared when the destination's filesystem cannot splice: payloads
    /// then pass through a buffer.
    splice_to_file: bool,
    /// The socket's receive low-water mark as last set (1 is the default).
    low_water: usize,
}

/// What landing a payload did. The stream is in step after either: the
/// whole payload was taken off the socket.
pub enum Landed {
    Written,
    /// Writing to the destination failed (a full disk); the payload was
    /// read and dropped.
    WriteFailed(std::io::Error),
}

/// Bytes a landing waits for before it wakes to move them (less at the end
/// of a payload). Linux grows the receive buffer to hold twice the mark,
/// and while it does so caps the advertised window at the mark until its
/// autotuning grows the buffer further: a cap of 512 KiB for the first
/// round trips of a connection's first fetch, not a lasting bound.
const LANDING_BATCH: usize = 512 << 10;

/// Sets the socket's receive low-water mark: it reports itself readable
/// only once `bytes` are queued, or the connection ends.
fn set_low_water(sock: RawFd, bytes: usize) -> std::io::Result<()> {
    let v = bytes as libc::c_int;
    // SAFETY: setsockopt reads one c_int through a valid pointer.
    let r = unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Moves up to `len` bytes from the socket into the pipe, without waiting.
fn socket_to_pipe(sock: RawFd, pipe: RawFd, len: usize) -> std::io::Result<usize> {
    // SAFETY: both descriptors are open for the call; null offsets mean "the
    // current position" for the socket and the pipe.
    let n = unsafe {
        libc::splice(
            sock,
            std::ptr::null_mut(),
            pipe,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Lander {
    pub fn new() -> std::io::Result<Lander> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nobody else.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A chunk at a time; without room for that, the default (64 KiB).
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, crate::frame::CHUNK_SIZE as libc::c_int) };
        // SAFETY: as above.
        let capacity = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
        let capacity = if capacity > 0 { capacity as usize } else { 64 << 10 };
        Ok(Lander { read, write, capacity, splice_to_file: true, low_water: 1 })
    }

    /// Takes a payload of `len` bytes off `sock` and writes it to `sink`.
    /// An error is the connection's (it cannot be kept in step); a failed
    /// write is the call's, and is returned as [`Landed::WriteFailed`].
    pub async fn land(&mut self, sock: &ReadHalf, len: usize, sink: &Sink) -> Result<Landed, FrameError> {
        let (mut left, mut at) = (len, sink.offset);
        let mut failed = None;
        while left > 0 {
            // Only into an empty pipe: a splice's EAGAIN then means the
            // socket has nothing, never that the pipe is full, so waiting
            // for the socket is right.
            let want = left.min(self.capacity);
            let pipe = self.write.as_raw_fd();
            let low_water = &mut self.low_water;
            // Waking once per few bytes that trickle in would cost a thread
            // switch each time, so before it waits the socket is told not to
            // report itself readable until a batch is there.
            let wait = |fd| {
                let batch = want.min(LANDING_BATCH);
                if batch != *low_water {
                    set_low_water(fd, batch)?;
                    *low_water = batch;
                }
                Ok(())
            };
            let moved = match sock.read_with(|fd| socket_to_pipe(fd, pipe, want), wait).await {
                Ok(0) => return Err(FrameError::Truncated),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            left -= moved;
            if failed.is_none() {
                // Page-cache writes can wait on writeback.
                if let Err(e) = super::blocking(|| self.pipe_to_file(moved, &sink.file, &mut at)) {
                    failed = Some(e);
                }
            }
            if failed.is_some() {
                self.empty_pipe()?;
            }
        }
        if self.low_water > 1 {
            // The next frame's head may be a few bytes long.
            set_low_water(sock.as_raw_fd(), 1)?;
            self.low_water = 1;
        }
        Ok(match failed {
            None => Landed::Written,
            Some(e) => Landed::WriteFailed(e),
        })
    }

    /// Moves `len` bytes (all the pipe holds) into `file` at `*at`. On an
    /// error some may still be in the pipe.
    fn pipe_to_file(&mut self, mut len: usize, file: &File, at: &mut u64) -> std::io::Result<()> {
        while len > 0 && self.splice_to_file {
            let mut off = *at as libc::loff_t;
            // SAFETY: both descriptors are open; `off` is a valid loff_t the
            // kernel advances (the file's own position is left alone).
            let n = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    file.as_raw_fd(),
                    &mut off,
                    len,
                    libc::SPLICE_F_MOVE,
                )
            };
            match n {
                n if n > 0 => {
                    len -= n as usize;
                    *at += n as u64;
                }
                0 => return Err(std::io::Error::other("the pipe ran dry while landing a chunk")),
                _ => {
                    let e = std::io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        // The destination's filesystem does not splice.
                        Some(libc::EINVAL) => self.splice_to_file = false,
                        _ => return Err(e),
                    }
                }
            }
        }
        let mut buf = vec![0u8; len.min(self.capacity)];
        while len > 0 {
            let n = len.min(buf.len());
            self.read.read_exact(&mut buf[..n])?;
            file.write_all_at(&buf[..n], *at)?;
            len -= n;
            *at += n as u64;
        }
        Ok(())
    }

    /// Drops whatever the pipe holds.
    fn empty_pipe(&mut self) -> std::io::Result<()> {
        let mut held: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through a valid pointer.
        if unsafe { libc::ioctl(self.read.as_raw_fd(), libc::FIONREAD, &mut held) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = [0u8; 16 << 10];
        let mut left = held.max(0) as usize;
        while left > 0 {
            let n = left.min(buf.len());
            self.read.read_exact(&mut buf[..n])?;
            left -= n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test(flavor = "current_thread")]
    async fn a_payload_that_trickles_in_lands_whole_and_the_next_head_is_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (rd, _wr) = super::super::socket::split(a.unwrap()).unwrap();
        let mut rd = rd.register().unwrap();
        let mut tx = b.unwrap().0;
        // Larger than a landing batch, sent in pieces smaller than one with
        // pauses between, ending in a piece that leaves less than a batch:
        // the low-water mark must never wait for bytes that are not coming.
        let len = (LANDING_BATCH * 2) + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let sender = tokio::spawn(async move {
            for piece in sent.chunks(100_000) {
                tx.write_all(piece).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            tx.write_all(b"next").await.unwrap();
            tx
        });
        let path = std::env::temp_dir().join(format!("landing-trickle-{}", std::process::id()));
        let file = Arc::new(File::options().create(true).truncate(true).read(true).write(true).open(&path).unwrap());
        let mut lander = Lander::new().unwrap();
        let landed = lander.land(&rd, len, &Sink { file: file.clone(), offset: 7 }).await.unwrap();
        assert!(matches!(landed, Landed::Written));
        let mut head = [0u8; 4];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), rd.read_exact(&mut head)).await;
        assert!(read.expect("a few bytes after the payload wake the reader").is_ok());
        assert_eq!(&head, b"next");
        let got = std::fs::read(&path).unwrap();
        assert!(got[7..] == data[..], "the payload landed at its offset, whole");
        drop(sender.await.unwrap());
        std::fs::remove_file(&path).unwrap();
    }
}
