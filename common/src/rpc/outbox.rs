//! The sending half of a connection, shared by client and server.
//!
//! Two queues feed one writer task: small frames (requests, replies, pushes)
//! and bulk frames (chunks of file data). The writer always drains the small
//! queue first, so a stat never waits behind a gigabyte: at most behind the
//! one chunk already on the wire.

use crate::frame::Outgoing;
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
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
    pub fn spawn<W: AsyncWrite + Unpin + Send + 'static>(w: W) -> Outbox {
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
/// socket (the buffer passes writes larger than itself through).
async fn write<W: AsyncWrite + Unpin>(w: &mut BufWriter<W>, frame: &Outgoing) -> std::io::Result<()> {
    w.write_all(frame.head()).await?;
    w.write_all(frame.payload()).await
}
