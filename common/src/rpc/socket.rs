//! A connection's socket, split so that each half is watched only by the
//! thread that uses it.
//!
//! The halves are two descriptors of one socket. The read half is registered
//! for readability alone, on the runtime of whoever reads (a client's reader
//! thread has a runtime of its own); the write half for writability alone,
//! on the runtime of the connection's writer. Tokio's own split shares one
//! registration, which wakes that runtime's driver for both directions: for
//! a client's reader thread every batch of arriving bytes then woke a worker
//! of the main runtime, which in turn woke the reader, two thread switches
//! where one does (a 1 GiB fetch made thousands of them).

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// Splits a connected stream. The write half is registered on the current
/// runtime; the read half is registered by [`ReadSocket::register`] on the
/// runtime that will read it.
pub fn split(stream: tokio::net::TcpStream) -> io::Result<(ReadSocket, WriteHalf)> {
    // Non-blocking stays set: it belongs to the socket, shared by both.
    let stream = stream.into_std()?;
    let read = stream.try_clone()?;
    let write = WriteHalf { fd: watch(stream, Interest::WRITABLE)? };
    Ok((ReadSocket(read), write))
}

/// Registers `stream` on the current runtime for `interest` alone.
fn watch(stream: std::net::TcpStream, interest: Interest) -> io::Result<AsyncFd<std::net::TcpStream>> {
    // SAFETY: a std stream owns its descriptor until it is dropped, and
    // `as_raw_fd` always returns that one.
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

/// The read half before it is registered.
pub struct ReadSocket(std::net::TcpStream);

impl ReadSocket {
    /// Registers the half on the current runtime, whose driver then wakes
    /// the reader when bytes arrive.
    pub fn register(self) -> io::Result<ReadHalf> {
        Ok(ReadHalf { fd: watch(self.0, Interest::READABLE)? })
    }
}

pub struct ReadHalf {
    fd: AsyncFd<std::net::TcpStream>,
}

impl ReadHalf {
    /// Runs `op` (a non-blocking read of some kind on the socket) once the
    /// socket is readable, waiting again whenever it would block.
    /// `on_wait` runs before each wait.
    pub async fn read_with<R>(
        &self,
        mut op: impl FnMut(RawFd) -> io::Result<R>,
        mut on_wait: impl FnMut(RawFd) -> io::Result<()>,
    ) -> io::Result<R> {
        let fd = self.fd.as_raw_fd();
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|_| op(fd)) {
                Ok(result) => return result,
                Err(_would_block) => on_wait(fd)?,
            }
        }
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let fd = self.fd.as_raw_fd();
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // Received straight into the unfilled part, which is not zeroed
            // first: a payload read in pieces would otherwise have all of
            // its rest cleared for every piece.
            // SAFETY: only the kernel writes there, and only the `n` bytes
            // marked initialised below.
            let unfilled = unsafe { buf.unfilled_mut() };
            let len = unfilled.len();
            let received = guard.try_io(|_| {
                // SAFETY: a valid pointer to `len` writable bytes, on a
                // descriptor this half keeps open.
                match unsafe { libc::recv(fd, unfilled.as_mut_ptr().cast(), len, 0) } {
                    n if n < 0 => Err(io::Error::last_os_error()),
                    n => Ok(n as usize),
                }
            });
            match received {
                Ok(Ok(n)) => {
                    if n > 0 && n < len {
                        // Fewer bytes than asked for: the socket is drained,
                        // and the next arrival raises a fresh edge. Waiting
                        // for it saves a read that would only say EAGAIN.
                        guard.clear_ready();
                    }
                    // SAFETY: recv initialised these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

pub struct WriteHalf {
    fd: AsyncFd<std::net::TcpStream>,
}

impl WriteHalf {
    /// Writes what the socket takes now, without waiting (`WouldBlock`
    /// when it takes nothing). The readiness the runtime remembers is left
    /// as it is: a later wait that finds the socket still full simply
    /// waits again.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.fd.get_ref().write(buf)
    }

    /// Runs `op` (a non-blocking write of some kind on the socket) once the
    /// socket has room, waiting again whenever it would block.
    pub async fn write_with<R>(&self, mut op: impl FnMut(RawFd) -> io::Result<R>) -> io::Result<R> {
        let fd = self.fd.as_raw_fd();
        loop {
            let mut guard = self.fd.writable().await?;
            if let Ok(result) = guard.try_io(|_| op(fd)) {
                return result;
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            if let Ok(result) = guard.try_io(|s| s.get_ref().write(buf)) {
                return Poll::Ready(result);
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends the sending direction: the peer reads the end of the stream.
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match self.fd.get_ref().shutdown(Shutdown::Write) {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

impl Drop for WriteHalf {
    /// Ends the sending direction even when the writer never shut it down
    /// (it stopped on a failed write): the read half's descriptor keeps the
    /// socket open, and the peer must still see the end of the stream.
    fn drop(&mut self) {
        let _ = self.fd.get_ref().shutdown(Shutdown::Write);
    }
}

impl AsRawFd for ReadHalf {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for WriteHalf {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
