//! Stages of a streaming pipeline: an async body read ahead on the runtime into a
//! bounded channel, read back as a blocking `Read` by a decoder on its own thread.

use std::io::{self, Read};
use tokio::io::AsyncReadExt;

/// Chunks between pipeline stages; 8 in flight per stage bounds memory to a few MiB
/// however large the NAR (or however well a bomb compresses).
pub(super) const CHUNK: usize = 256 * 1024;
pub(super) const IN_FLIGHT: usize = 8;

pub(super) type Chunk = io::Result<Vec<u8>>;

/// The receiving end of a pipeline stage, as a `Read`.
pub struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Chunk>) -> Self {
        ChannelReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Downloads ahead of the decompressor: reads `body` on the runtime into a bounded
/// channel, so the network, decompression and hashing+unpacking overlap.
pub fn read_ahead<R: tokio::io::AsyncRead + Unpin + Send + 'static>(body: R) -> ChannelReader {
    read_ahead_fed(body, |_| {})
}

/// `read_ahead`, telling `on_fed` whether the reading outpaces the consumer (the
/// buffer stays mostly full: the consumer, not the source, sets the pace) or not.
pub fn read_ahead_fed<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    mut body: R,
    on_fed: impl Fn(bool) + Send + 'static,
) -> ChannelReader {
    let (tx, rx) = tokio::sync::mpsc::channel(IN_FLIGHT);
    tokio::spawn(async move {
        let mut fed = false;
        loop {
            let mut buf = vec![0u8; CHUNK];
            match body.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(Ok(buf)).await.is_err() {
                        return;
                    }
                    let queued = IN_FLIGHT - tx.capacity();
                    // (with hysteresis: three quarters full to turn, a quarter to
                    // turn back)
                    let now_fed = if fed {
                        queued > IN_FLIGHT / 4
                    } else {
                        queued >= IN_FLIGHT * 3 / 4
                    };
                    if now_fed != fed {
                        fed = now_fed;
                        on_fed(fed);
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    ChannelReader::new(rx)
}
