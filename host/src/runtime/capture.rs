//! Captures a guest's stdout or stderr into memory, keeping the first
//! `limit` bytes and counting the rest.
//!
//! Unlike wasmtime-wasi's `MemoryOutputPipe`, a full buffer never fails a
//! write: a chatty guest keeps running, its output is truncated, and the
//! host's memory stays bounded.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Largest single write permit given to the guest.
const WRITE_PERMIT: usize = 64 << 10;

#[derive(Clone)]
pub(super) struct BoundedCapture {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    limit: usize,
    total: u64,
}

impl BoundedCapture {
    pub(super) fn new(limit: usize) -> Self {
        let captured = Captured {
            limit,
            ..Captured::default()
        };
        BoundedCapture {
            inner: Arc::new(Mutex::new(captured)),
        }
    }

    fn append(&self, bytes: &[u8]) {
        let mut captured = self.inner.lock().unwrap();
        let room = captured.limit.saturating_sub(captured.kept.len());
        captured
            .kept
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        captured.total += bytes.len() as u64;
    }

    /// The kept text (lossily decoded) and the total bytes the guest wrote.
    pub(super) fn finish(&self) -> (String, u64) {
        let captured = self.inner.lock().unwrap();
        (
            String::from_utf8_lossy(&captured.kept).into_owned(),
            captured.total,
        )
    }
}

impl IsTerminal for BoundedCapture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for BoundedCapture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for BoundedCapture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for BoundedCapture {
    async fn ready(&mut self) {}
}

impl AsyncWrite for BoundedCapture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_bytes_and_counts_all() {
        let capture = BoundedCapture::new(5);
        capture.append(b"abc");
        capture.append(b"defgh");
        capture.append(b"ij");
        assert_eq!(capture.finish(), ("abcde".to_string(), 10));
    }
}
