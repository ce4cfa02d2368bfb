//! The process's live API server connections by local address ([`Connections`]), filled by the
//! connector every kube client of the process goes through ([`TrackingConnector`]), so that the
//! connections whose source address left the node can be closed at once
//! ([`Connections::close_from`], called by [`super::AddressWatch`]).
//!
//! Why: a connection whose local address is gone carries nothing more and reports no error; the
//! kernel only drops it when keepalive or `TCP_USER_TIMEOUT` gives up (~22 s measured after an
//! underlay readdress, docs/faults.md). Until then the agent's watches see no change, its own
//! Node's new address included. `shutdown(2)` makes the watch fail now, and kube-runtime's
//! watcher reconnects (with its resourceVersion) from the node's current address.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    sync::{Arc, LazyLock, Mutex, MutexGuard, Weak},
    task::{Context, Poll},
};

use hyper::Uri;
use hyper_util::{
    client::legacy::connect::{Connected, Connection, HttpConnector},
    rt::TokioIo,
};
use tokio::net::TcpStream;

/// Live connections by local address: weak handles, pruned as connections are dropped. Cheap to
/// clone (one shared list).
#[derive(Debug, Default, Clone)]
pub struct Connections(Arc<Mutex<Vec<Weak<Entry>>>>);

/// One connection as the registry sees it.
#[derive(Debug)]
struct Entry {
    local: SocketAddr,
    /// The socket while its [`Tracked`] stream lives; `None` from its drop on, so a closed (and
    /// perhaps reused) descriptor is never shut down. Held locked across `shutdown(2)`.
    fd: Mutex<Option<RawFd>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one still holds consistent data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Connections {
    /// The registry of every client [`super::client`] builds in this process.
    pub fn shared() -> &'static Connections {
        static SHARED: LazyLock<Connections> = LazyLock::new(Connections::default);
        &SHARED
    }

    /// Registers `stream` under its local address.
    pub fn track(&self, stream: TcpStream) -> io::Result<Tracked> {
        let local = stream.local_addr()?;
        let entry = Arc::new(Entry {
            local,
            fd: Mutex::new(Some(stream.as_raw_fd())),
        });
        let mut live = lock(&self.0);
        live.retain(|e| e.strong_count() > 0);
        live.push(Arc::downgrade(&entry));
        Ok(Tracked {
            io: TokioIo::new(stream),
            entry,
        })
    }

    /// Shuts down (both directions) every live connection whose local address is `ip`; their
    /// readers see end of file and their writers an error at once. Returns how many.
    pub fn close_from(&self, ip: IpAddr) -> usize {
        let ip = ip.to_canonical();
        let matching: Vec<Arc<Entry>> = lock(&self.0)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|e| e.local.ip().to_canonical() == ip)
            .collect();
        let mut closed = 0;
        for entry in matching {
            let fd = lock(&entry.fd);
            if let Some(fd) = *fd {
                // SAFETY: `fd` is the socket of a live `Tracked` stream: its drop takes the
                // descriptor out under this lock before the stream closes it.
                if unsafe { libc::shutdown(fd, libc::SHUT_RDWR) } == 0 {
                    closed += 1;
                }
            }
        }
        closed
    }

    /// How many connections are live.
    pub fn live(&self) -> usize {
        let mut live = lock(&self.0);
        live.retain(|e| e.strong_count() > 0);
        live.len()
    }
}

/// A TCP stream registered in [`Connections`] until dropped; hyper reads and writes it.
#[derive(Debug)]
pub struct Tracked {
    io: TokioIo<TcpStream>,
    entry: Arc<Entry>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Before the stream (a field, dropped after this) closes the descriptor.
        lock(&self.entry.fd).take();
    }
}

impl Connection for Tracked {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// hyper's [`HttpConnector`] whose connections are registered in [`Connections`].
#[derive(Debug, Clone)]
pub struct TrackingConnector {
    http: HttpConnector,
    connections: Connections,
}

impl TrackingConnector {
    /// Connects with `http`, registering in `connections`.
    pub fn new(http: HttpConnector, connections: Connections) -> Self {
        Self { http, connections }
    }
}

impl tower::Service<Uri> for TrackingConnector {
    type Response = Tracked;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Tracked, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let connections = self.connections.clone();
        Box::pin(async move {
            let io = connecting.await?;
            Ok(connections.track(io.into_inner())?)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpSocket},
    };

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A connection from `from` to `listener`, and the listener's end of it.
    async fn pair(listener: &TcpListener, from: Ipv4Addr) -> (TcpStream, TcpStream) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from.into(), 0)).unwrap();
        let (client, accepted) = tokio::join!(
            socket.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn closing_an_address_shuts_down_its_connections_and_no_other() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let removed = Ipv4Addr::new(127, 0, 0, 2);
        let connections = Connections::default();
        let (client, mut server_of_removed) = pair(&listener, removed).await;
        let mut gone = connections.track(client).unwrap();
        let (client, mut server_of_kept) = pair(&listener, Ipv4Addr::LOCALHOST).await;
        let mut kept = connections.track(client).unwrap();
        assert_eq!(connections.live(), 2);

        assert_eq!(connections.close_from(removed.into()), 1);

        // The removed address's connection reads end of file at once (no keepalive wait), and
        // its peer sees it closed.
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(TIMEOUT, gone.io.inner_mut().read(&mut buf))
            .await
            .expect("the shut-down connection's read returns at once");
        assert_eq!(read.unwrap(), 0, "end of file after shutdown");
        let read = tokio::time::timeout(TIMEOUT, server_of_removed.read(&mut buf))
            .await
            .expect("the peer sees the shutdown");
        assert_eq!(read.unwrap(), 0);
        // The other one still carries data both ways.
        server_of_kept.write_all(b"still here").await.unwrap();
        let n = tokio::time::timeout(TIMEOUT, kept.io.inner_mut().read(&mut buf))
            .await
            .expect("the kept connection delivers")
            .unwrap();
        assert_eq!(&buf[..n], b"still here");
        kept.io.inner_mut().write_all(b"ok").await.unwrap();
        let n = server_of_kept.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ok");
        // Closing an address no connection has touches nothing.
        assert_eq!(
            connections.close_from(Ipv4Addr::new(127, 0, 0, 3).into()),
            0
        );
    }

    #[tokio::test]
    async fn dropped_connections_leave_the_registry_and_are_never_shut_down() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let connections = Connections::default();
        let (client, _server) = pair(&listener, Ipv4Addr::LOCALHOST).await;
        let tracked = connections.track(client).unwrap();
        let entry = Arc::clone(&tracked.entry);
        drop(tracked);
        // A handle that outlives its stream (as the registry's may while it shuts others down)
        // no longer names the closed, perhaps reused, descriptor.
        assert_eq!(*lock(&entry.fd), None);
        assert_eq!(connections.close_from(Ipv4Addr::LOCALHOST.into()), 0);
        drop(entry);
        assert_eq!(connections.live(), 0);
    }

    #[tokio::test]
    async fn the_connector_registers_what_it_connects() {
        use tower::ServiceExt as _;

        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Connections::default();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = TrackingConnector::new(http, connections.clone());
        let uri: Uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let (connected, accepted) = tokio::join!(connector.oneshot(uri), listener.accept());
        let (mut server, _) = accepted.unwrap();
        let tracked = connected.unwrap();
        assert_eq!(connections.live(), 1);
        assert_eq!(connections.close_from(Ipv4Addr::LOCALHOST.into()), 1);
        let mut buf = [0u8; 4];
        let read = tokio::time::timeout(TIMEOUT, server.read(&mut buf))
            .await
            .expect("the server sees the connection closed");
        assert_eq!(read.unwrap(), 0);
        drop(tracked);
        assert_eq!(connections.live(), 0);
    }
}
