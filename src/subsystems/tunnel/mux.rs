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

/// Receive credit per stream starts at yamux's 256 KiB and is tuned up to
/// the bandwidth-delay product; all streams of a connection together are
/// capped here, which bounds what one peer can make the other buffer.
/// yamux requires at least 256 KiB per allowed stream.
pub const CONNECTION_WINDOW: usize = MAX_STREAMS * 256 * 1024;

/// Data frames are cut at this size, so a bulk stream takes turns with the
/// others (yamux's own default; small writes of another stream wait at
/// most one such frame).
pub const SPLIT_SEND: usize = 16 * 1024;

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
/// side fails, or `stop` is cancelled (the tunnel connection ended). In
/// the last two cases the TCP connection is reset, never just closed, so
/// its peer knows the exchange did not complete.
pub async fn splice(
    stream: &mut Stream,
    tcp: &mut tokio::net::TcpStream,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let outcome = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(stream, tcp, COPY_BUF, COPY_BUF) => r.map(|_| ()).map_err(|e| e.to_string()),
        _ = stop => Err("the tunnel connection or the pipe ended".into()),
    };
    if outcome.is_err() {
        reset(tcp);
    }
    outcome
}

/// The copy buffer of each direction of [`splice`].
const COPY_BUF: usize = 16 * 1024;

/// Makes the next close of `tcp` a reset (RST) instead of a FIN.
pub fn reset(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(std::time::Duration::ZERO));
}
