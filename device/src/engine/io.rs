//! Kernel-facing I/O of the engine: the TUN device (multi-queue, virtio-net header offloads), the
//! UDP socket (batched send/receive with GSO/GRO through quinn-udp), and the network-namespace
//! pinning that makes a later rebind land in the namespace the engine was created in.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket},
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
};

use quinn_udp::{Transmit, UdpSockRef, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::{DeviceBuilder, SyncDevice};

/// Socket buffer size asked for (SO_*BUFFORCE as root, else capped by net.core.*mem_max). Large
/// because a receive worker that loses its CPU for a few ms must not drop a burst of GRO trains.
const SOCKET_BUFFER: usize = 32 << 20;

/// Opens the TUN device `ifname` with `queues` queues. The device is left down and without
/// addresses: whoever owns the interface (the agent via rtnetlink, or the operator) configures it.
pub(crate) fn open_tun(ifname: &str, mtu: u16, queues: usize) -> io::Result<Vec<SyncDevice>> {
    let first = DeviceBuilder::new()
        .name(ifname)
        .mtu(mtu)
        .offload(true)
        .multi_queue(queues > 1)
        .enable(false)
        .build_sync()?;
    let mut all = Vec::with_capacity(queues);
    for _ in 1..queues {
        all.push(first.try_clone()?);
    }
    all.insert(0, first);
    Ok(all)
}

/// One bound UDP socket with its quinn-udp state.
pub(crate) struct UdpSock {
    pub socket: UdpSocket,
    pub state: UdpSocketState,
}

/// The UDP port the tunnel speaks through: `count` sockets bound to the same port with
/// SO_REUSEPORT (the kernel hashes each peer's 4-tuple to one socket, so one receive worker
/// sees all of a peer's packets in order). Dual-stack IPv6 when the namespace has IPv6, else
/// IPv4. Note: SO_REUSEPORT lets another root process join the port group on purpose.
pub(crate) struct UdpEndpoint {
    pub sockets: Vec<UdpSock>,
    pub port: u16,
    dual_stack: bool,
}

impl UdpEndpoint {
    /// Binds `count` sockets on `port` (0 picks one) with `fwmark` (0 = none).
    pub fn bind(port: u16, fwmark: u32, count: usize) -> io::Result<Self> {
        let count = count.max(1);
        let reuse = count > 1;
        let (first, dual_stack) = match bind_socket(Domain::IPV6, port, reuse) {
            Ok(s) => (s, true),
            Err(e6) => match bind_socket(Domain::IPV4, port, reuse) {
                Ok(s) => (s, false),
                Err(_) => return Err(e6),
            },
        };
        let domain = if dual_stack {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let first: UdpSocket = first.into();
        let port = first.local_addr()?.port();
        let mut raw = vec![first];
        for _ in 1..count {
            raw.push(bind_socket(domain, port, true)?.into());
        }
        let mut sockets = Vec::with_capacity(count);
        for socket in raw {
            if fwmark != 0 {
                socket2::SockRef::from(&socket).set_mark(fwmark)?;
            }
            let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
            sockets.push(UdpSock { socket, state });
        }
        Ok(Self {
            sockets,
            port,
            dual_stack,
        })
    }

    pub fn set_fwmark(&self, mark: u32) -> io::Result<()> {
        for s in &self.sockets {
            socket2::SockRef::from(&s.socket).set_mark(mark)?;
        }
        Ok(())
    }

    /// Wakes every worker polling these sockets (used when they are replaced).
    pub fn shutdown(&self) {
        for s in &self.sockets {
            // SAFETY: shutdown on a socket we own; only wakes pollers and ends reads.
            unsafe {
                libc::shutdown(s.socket.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
    }

    /// The socket worker `idx` uses.
    #[inline]
    pub fn sock(&self, idx: usize) -> &UdpSock {
        &self.sockets[idx % self.sockets.len()]
    }

    /// The address to hand to the kernel for `dst` on these sockets.
    #[inline]
    pub fn wire_addr(&self, dst: SocketAddr) -> SocketAddr {
        match (self.dual_stack, dst) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            _ => dst,
        }
    }

    /// Sends one datagram or a GSO train of equal-sized segments (the last may be shorter) on
    /// socket `idx`. Waits briefly for buffer space instead of dropping when the buffer is full.
    pub fn send(
        &self,
        idx: usize,
        dst: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let sock = self.sock(idx);
        let transmit = Transmit {
            destination: self.wire_addr(dst),
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        };
        let mut waited = 0;
        loop {
            match sock
                .state
                .try_send(UdpSockRef::from(&sock.socket), &transmit)
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && waited < 20 => {
                    waited += 1;
                    wait_writable(&sock.socket, 5);
                }
                other => return other,
            }
        }
    }

    /// The largest number of segments one GSO send may carry.
    pub fn max_gso_segments(&self) -> usize {
        self.sockets[0].state.max_gso_segments().max(1)
    }
}

/// Maps a v4-mapped IPv6 source back to IPv4 so endpoints look the same whatever socket saw them.
#[inline]
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn bind_socket(domain: Domain, port: u16, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    let addr: SocketAddr = if domain == Domain::IPV6 {
        socket.set_only_v6(false)?;
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)
    } else {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port)
    };
    socket.bind(&addr.into())?;
    for (opt, forced) in [
        (libc::SO_RCVBUF, libc::SO_RCVBUFFORCE),
        (libc::SO_SNDBUF, libc::SO_SNDBUFFORCE),
    ] {
        let size = SOCKET_BUFFER as libc::c_int;
        if setsockopt_int(&socket, forced, size).is_err() {
            let _ = setsockopt_int(&socket, opt, size);
        }
    }
    Ok(socket)
}

fn setsockopt_int(socket: &Socket, opt: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: plain setsockopt on a socket we own with a correctly sized int argument.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn wait_writable(socket: &UdpSocket, timeout_ms: i32) {
    let mut pfd = libc::pollfd {
        fd: socket.as_fd().as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe {
        libc::poll(&mut pfd, 1, timeout_ms);
    }
}

/// A handle on the network namespace the engine was created in, so that work done later from
/// another thread (a rebind requested by the agent's runtime) happens in the right namespace.
#[derive(Clone)]
pub(crate) struct NetNs(Arc<File>);

impl NetNs {
    /// The namespace of the calling thread.
    pub fn current() -> io::Result<Self> {
        File::open("/proc/thread-self/ns/net").map(|f| Self(Arc::new(f)))
    }

    /// Runs `f` on a helper thread that has joined this namespace.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let ns = self.0.clone();
        std::thread::Builder::new()
            .name("wm-netns".into())
            .spawn(move || {
                // SAFETY: setns on a namespace fd we hold open; affects only this helper thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                f()
            })?
            .join()
            .map_err(|_| io::Error::other("netns helper thread panicked"))?
    }
}

/// An eventfd that, once signalled, stays readable: every worker polling it wakes up.
pub(crate) struct Waker(File);

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        Ok(Self(unsafe {
            <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to an eventfd we own.
        unsafe {
            libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    pub fn fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}
