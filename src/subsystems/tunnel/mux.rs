//! The multiplexer under the tunnel: yamux over the TLS connection, with
//! explicit caps, and a driver task that owns the yamux connection (yamux
//! makes progress only while it is polled) and hands out streams.
//!
//! Both halves use it: the agent opens the control stream and accepts data
//! streams; the relay accepts the control stream and opens data streams.

use futures::future::poll_fn;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A multiplexed stream, as a tokio reader and writer. Dropping it
/// without shutting it down resets it; shutting down writing sends FIN.
pub type Stream = Compat<yamux::Stream>;

/// Most streams open at once on one connection (both directions): beyond
/// it yamux refuses the stream (the relay resets the visitor).
pub const MAX_STREAMS: usize = 1024;

/// Receive credit per stream starts at yamux's 256 KiB, guaranteed to each
/// of the [`MAX_STREAMS`], and is tuned up toward the bandwidth-delay
/// product out of a shared growth budget ([`WINDOW_GROWTH`]); all streams
/// of a connection together are capped here, which bounds what one peer
/// can make the other buffer (the per-connection memory cap).
pub const CONNECTION_WINDOW: usize = MAX_STREAMS * 256 * 1024 + WINDOW_GROWTH;

/// What streams may grow their windows by, together, beyond the 256 KiB
/// each is guaranteed. Without it a stream is held to 256 KiB in flight,
/// which caps a single stream well below what the link carries.
pub const WINDOW_GROWTH: usize = 32 * 1024 * 1024;

/// Data frames are cut at this size, so a bulk stream takes turns with the
/// others: a small write of another stream waits at most one such frame
/// (64 KiB: some 0.1 ms at 5 Gbit/s; yamux's default of 16 KiB costs a
/// bulk stream a third of its throughput in per-frame work).
pub const SPLIT_SEND: usize = 64 * 1024;

/// yamux writes a frame's 12-byte header and its body separately; a write
/// buffer of two frames makes them one TLS write (one record run, one
/// system call) instead of two. yamux flushes after every frame.
const WRITE_BUF: usize = 2 * SPLIT_SEND + 64;

fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS)
        .set_max_connection_receive_window(Some(CONNECTION_WINDOW))
        .set_split_send_size(SPLIT_SEND)
        .set_read_after_close(true);
    c
}

/// Which end of the connection this is (yamux numbers streams by it).
#[derive(Debug, Clone, Copy)]
pub enum Side {
    /// The agent: it dialed.
    Agent,
    /// The relay: it accepted.
    Relay,
}

/// Opens streams on a running connection; cheap to clone.
#[derive(Clone)]
pub struct Opener {
    tx: mpsc::Sender<oneshot::Sender<yamux::Result<yamux::Stream>>>,
}

impl Opener {
    /// A new outbound stream (yamux sends its SYN with the first write).
    pub async fn open(&self) -> Result<Stream, yamux::ConnectionError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .await
            .map_err(|_| yamux::ConnectionError::Closed)?;
        rx.await
            .map_err(|_| yamux::ConnectionError::Closed)?
            .map(FuturesAsyncReadCompatExt::compat)
    }
}

/// Starts yamux over `io`. Returns the opener, the inbound streams, and the
/// driver: the future that runs the connection until it ends (with the
/// reason); the caller spawns it (through its `Shutdown`), and dropping it
/// closes every stream at once.
pub fn start<T>(
    io: T,
    side: Side,
) -> (
    Opener,
    mpsc::UnboundedReceiver<Stream>,
    impl std::future::Future<Output = Result<(), yamux::ConnectionError>> + Send,
)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mode = match side {
        Side::Agent => yamux::Mode::Client,
        Side::Relay => yamux::Mode::Server,
    };
    let io = tokio::io::BufWriter::with_capacity(WRITE_BUF, io);
    let mut conn = yamux::Connection::new(io.compat(), config(), mode);
    let (open_tx, mut open_rx) = mpsc::channel::<oneshot::Sender<_>>(64);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let driver = async move {
        let mut waiting: Option<oneshot::Sender<_>> = None;
        poll_fn(move |cx| loop {
            // Outbound opens, one at a time, in the order asked.
            if waiting.is_none() {
                if let Poll::Ready(Some(tx)) = open_rx.poll_recv(cx) {
                    waiting = Some(tx);
                }
            }
            if waiting.is_some() {
                if let Poll::Ready(r) = conn.poll_new_outbound(cx) {
                    // On an error the connection is gone; polling inbound
                    // next says why.
                    let _ = waiting.take().expect("checked").send(r);
                    continue;
                }
            }
            // Inbound streams, and the connection's own progress.
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(s))) => {
                    // A stream nobody takes any more is dropped: reset.
                    let _ = in_tx.send(s.compat());
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        })
        .await
    };
    (Opener { tx: open_tx }, in_rx, driver)
}

/// Carries bytes both ways between a stream and a TCP connection until
/// both directions are finished (each FIN passed on as a half-close), one
/// side fails or is reset, or `stop` resolves (the tunnel connection or the
/// pipe ended). In the last cases the TCP connection is reset, never just
/// closed, so its peer knows the exchange did not complete; the stream is
/// dropped unclosed, which resets it.
pub async fn splice<S: Yamux>(
    stream: &mut S,
    tcp: &mut tokio::net::TcpStream,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    // yamux reads a reset stream (or one of a lost connection) as an end
    // of data; its state tells: closed both ways while we still write.
    let reset = |s: &S, writing: bool| writing && s.is_closed();
    let outcome = tokio::select! {
        r = copy::both_ways(tcp, stream, reset) => r.map_err(|e| e.to_string()),
        _ = stop => Err("the tunnel connection or the pipe ended".into()),
    };
    if outcome.is_err() {
        reset_tcp(tcp);
    }
    outcome
}

/// A yamux stream, as [`splice`] needs it: bytes, and whether it is closed
/// both ways (how a reset reads).
pub trait Yamux: AsyncRead + AsyncWrite + Unpin {
    /// Whether the stream is closed both ways.
    fn is_closed(&self) -> bool;
}

impl Yamux for Stream {
    fn is_closed(&self) -> bool {
        self.get_ref().is_closed()
    }
}

/// A data stream opened by the relay, whose first bytes from the agent are
/// its [`Opened`](super::protocol::Opened) answer. Reading yields what follows an
/// `ok`, or fails with the refusal (or after `OPEN_TIMEOUT` without an
/// answer); writing goes straight through. So the relay can send the
/// visitor's first bytes right behind the open frame, without waiting a
/// round trip for the answer: the visitor's first byte reaches the device
/// with its stream's open.
pub struct Answered {
    inner: Stream,
    head: Vec<u8>,
    /// Until the answer is read.
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Answered {
    /// Wraps `inner`, failing the read if no answer comes `within`.
    pub fn new(inner: Stream, within: std::time::Duration) -> Answered {
        Answered {
            inner,
            head: Vec::new(),
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl Yamux for Answered {
    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

impl AsyncRead for Answered {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use super::protocol::{decode, split_frame, Opened};
        use std::io::{Error, ErrorKind};
        let this = self.get_mut();
        while let Some(deadline) = &mut this.deadline {
            match split_frame(&this.head) {
                Err(e) => return Poll::Ready(Err(Error::new(ErrorKind::InvalidData, e))),
                Ok(Some((payload, used))) => match decode::<Opened>(payload) {
                    Ok(Opened::Ok) => {
                        this.head.drain(..used);
                        this.deadline = None;
                    }
                    Ok(Opened::Refused { reason }) => {
                        return Poll::Ready(Err(Error::new(ErrorKind::ConnectionRefused, reason)))
                    }
                    Err(e) => return Poll::Ready(Err(Error::new(ErrorKind::InvalidData, e))),
                },
                Ok(None) => {
                    if std::future::Future::poll(deadline.as_mut(), cx).is_ready() {
                        return Poll::Ready(Err(Error::new(
                            ErrorKind::TimedOut,
                            "the device did not answer the open",
                        )));
                    }
                    let mut tmp = [0u8; 512];
                    let mut rb = tokio::io::ReadBuf::new(&mut tmp);
                    std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    if rb.filled().is_empty() {
                        return Poll::Ready(Err(Error::new(
                            ErrorKind::ConnectionReset,
                            "the stream ended before the device answered",
                        )));
                    }
                    this.head.extend_from_slice(rb.filled());
                }
            }
        }
        if !this.head.is_empty() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.drain(..n);
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Answered {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Makes the next close of `tcp` a reset (RST) instead of a FIN.
pub fn reset_tcp(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}

pub mod copy {
    //! A bidirectional copy whose buffers exist only while bytes move: an
    //! idle direction holds none (a thousand idle visitors cost their
    //! sockets and streams, not 2 x 16 KiB each), and a reset seen as an
    //! end of data can be told apart by the caller.

    use std::io;
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// Copy buffer of one direction while it is busy (a frame's worth).
    pub const BUF: usize = super::SPLIT_SEND;

    #[derive(Default)]
    struct Half {
        buf: Option<Box<[u8]>>,
        pos: usize,
        end: usize,
        eof: bool,
        done: bool,
    }

    impl Half {
        /// Moves bytes from `r` to `w` until `r` ends (then shuts `w`
        /// down: the half-close) or nothing is ready.
        fn poll<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
        where
            R: AsyncRead + Unpin,
            W: AsyncWrite + Unpin,
        {
            loop {
                if self.pos < self.end {
                    let buf = self.buf.as_ref().expect("data is in the buffer");
                    let n = ready!(Pin::new(&mut *w).poll_write(cx, &buf[self.pos..self.end]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.pos += n;
                    continue;
                }
                if self.eof {
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
                let buf = self
                    .buf
                    .get_or_insert_with(|| vec![0; BUF].into_boxed_slice());
                let mut rb = ReadBuf::new(buf);
                match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        (self.pos, self.end) = (0, n);
                        if n == 0 {
                            self.eof = true;
                            self.buf = None;
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Idle: give the buffer back, push out what was written.
                        self.buf = None;
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Copies `a` to `b` and `b` to `a` until both have ended. When `b`
    /// ends while `a` still writes to it, `reset_b(b, true)` says whether
    /// that end was a reset (an error then).
    pub async fn both_ways<A, B>(
        a: &mut A,
        b: &mut B,
        reset_b: impl Fn(&B, bool) -> bool,
    ) -> io::Result<()>
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut up, mut down) = (Half::default(), Half::default());
        std::future::poll_fn(|cx| {
            // `b`'s end of data is checked the moment it is read, before
            // the FIN is passed on, so a reset never looks like a FIN.
            while !down.done {
                let was_eof = down.eof;
                let r = down.poll(cx, b, a);
                if !was_eof && down.eof && reset_b(b, !up.done) {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "reset by the other end of the tunnel",
                    )));
                }
                match r {
                    Poll::Ready(Ok(())) if down.eof && !down.done => continue,
                    Poll::Ready(Ok(())) => break,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            while !up.done {
                match up.poll(cx, a, b) {
                    Poll::Ready(Ok(())) if up.eof && !up.done => continue,
                    Poll::Ready(Ok(())) => break,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if up.done && down.done {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }
}
