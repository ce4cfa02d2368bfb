//! Proof that the underlay carries no plaintext pod traffic: a packet capture (AF_PACKET,
//! `ETH_P_ALL`, promiscuous) on the underlay bridge, and a classifier that sorts every frame into
//! WireGuard between node addresses, control-plane traffic to the API server, or a violation
//! (plaintext pod packets, any other node-to-node packet), and looks for a payload marker in
//! every byte captured. IPv6 frames are pod traffic when an address is in an IPv6 pod CIDR (a
//! violation, as for IPv4), link-local otherwise when they are ICMPv6 (neighbour discovery),
//! multicast or from a link-local source (MLD), and violations else. Used by `meshctl demo traffic` and the scenario tests.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io, mem,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

/// Frames kept at most; a capture that fills up reports it.
const MAX_FRAMES: usize = 500_000;

const ETH_P_ALL: u16 = 0x0003;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;

/// A running capture on one interface of the current network namespace.
pub struct Capture {
    ifname: String,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<(Vec<Vec<u8>>, bool)>>,
}

fn os_err(what: &str, ifname: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what} on {ifname}: {e}"))
}

impl Capture {
    /// Starts capturing every frame (both directions) on `ifname`, in promiscuous mode so that a
    /// bridge also hands up the frames it forwards between its ports.
    pub fn start(ifname: &str) -> io::Result<Self> {
        let name = CString::new(ifname).map_err(io::Error::other)?;
        // Protocol 0: the socket receives nothing until bind() names the protocol and the
        // interface. Opened with ETH_P_ALL it would queue frames of every interface (loopback
        // included) until the bind, and the classifier would report them (seen in the VM, where
        // the window is long).
        // SAFETY: plain socket/ioctl-style calls with valid arguments; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(os_err("socket(AF_PACKET)", ifname));
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: name is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(os_err("if_nametoindex", ifname));
        }
        // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a valid sockaddr_ll of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(os_err("bind(AF_PACKET)", ifname));
        }
        // SAFETY: packet_mreq is plain old data.
        let mut mreq: libc::packet_mreq = unsafe { mem::zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        // SAFETY: mreq is a valid packet_mreq of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&raw const mreq).cast(),
                mem::size_of::<libc::packet_mreq>() as u32,
            )
        };
        if rc != 0 {
            return Err(os_err("PACKET_ADD_MEMBERSHIP promisc", ifname));
        }
        // A receive timeout lets the thread notice the stop flag.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: tv is a valid timeval of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(os_err("SO_RCVTIMEO", ifname));
        }

        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread_ifname = ifname.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("capture-{ifname}"))
            .spawn(move || {
                let mut frames = Vec::new();
                let mut truncated = false;
                let mut buf = vec![0u8; 65_536];
                while !thread_stop.load(Ordering::Relaxed) {
                    // SAFETY: buf is valid for writes of buf.len() bytes.
                    let n = unsafe {
                        libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                    };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        match e.kind() {
                            io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted => continue,
                            _ => return Err(os_err("recv", &thread_ifname)),
                        }
                    }
                    if frames.len() < MAX_FRAMES {
                        frames.push(buf[..n as usize].to_vec());
                    } else {
                        truncated = true;
                    }
                }
                Ok((frames, truncated))
            })?;
        Ok(Self {
            ifname: ifname.to_string(),
            stop,
            thread,
        })
    }

    /// Stops the capture and returns the frames (and whether the frame limit cut it short).
    pub fn stop(self) -> io::Result<(Vec<Vec<u8>>, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| io::Error::other(format!("capture thread on {} panicked", self.ifname)))?
    }
}

/// What the classifier needs to know about the cluster.
#[derive(Debug, Clone)]
pub struct Underlay {
    /// Node addresses on the underlay.
    pub node_ips: Vec<Ipv4Addr>,
    /// The API server's address (control-plane traffic to and from it is expected).
    pub control_plane_ip: Ipv4Addr,
    /// The nodes' pod CIDRs (any outer header with an address in one is plaintext pod traffic).
    pub pod_cidrs: Vec<Ipv4Net>,
    /// The nodes' IPv6 pod CIDRs (dual stack).
    pub pod_cidrs6: Vec<Ipv6Net>,
    /// The WireGuard UDP port of tunnel slot a; slot b (the other world of a key rotation, the
    /// current one after an odd number of rotations) listens on the next port.
    pub wireguard_port: u16,
}

/// The verdict over a capture.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureReport {
    pub frames: usize,
    /// The capture hit its frame limit.
    pub truncated: bool,
    /// WireGuard messages between node addresses, by type name.
    pub wireguard: BTreeMap<&'static str, usize>,
    /// IPv4 packets to or from the API server.
    pub control_plane: usize,
    /// ARP and IPv6 frames (neighbour discovery), not node-to-node payload.
    pub link_local: usize,
    /// Frames that contain the payload marker.
    pub marker_hits: usize,
    /// Everything that should not be there, one line each (first 20).
    pub violations: Vec<String>,
    /// Total violations.
    pub violation_count: usize,
}

impl CaptureReport {
    /// WireGuard transport-data messages seen.
    pub fn wireguard_data(&self) -> usize {
        self.wireguard.get("data").copied().unwrap_or(0)
    }

    /// Encrypted only: no violation, marker absent, and WireGuard data was seen at all.
    pub fn clean(&self) -> bool {
        self.violation_count == 0
            && self.marker_hits == 0
            && self.wireguard_data() > 0
            && !self.truncated
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "{} frames: {} WireGuard messages between nodes ({}), {} control-plane, {} ARP/IPv6 ND, \
             {} plaintext or unexpected, payload marker found {} times",
            self.frames,
            self.wireguard.values().sum::<usize>(),
            self.wireguard
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.control_plane,
            self.link_local,
            self.violation_count,
            self.marker_hits
        )
    }
}

/// The WireGuard message type of a UDP payload, if it looks like one (type byte 1-4, three zero
/// reserved bytes, and the length of that message type; data messages are at least 32 bytes).
fn wireguard_type(payload: &[u8]) -> Option<&'static str> {
    if payload.len() < 4 || payload[1..4] != [0, 0, 0] {
        return None;
    }
    match (payload[0], payload.len()) {
        (1, 148) => Some("handshake-initiation"),
        (2, 92) => Some("handshake-response"),
        (3, 64) => Some("cookie-reply"),
        // Any length: with UDP GSO a captured frame can hold several messages back to back.
        (4, n) if n >= 32 => Some("data"),
        _ => None,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Classifies captured Ethernet frames (see the module docs).
pub fn classify(
    frames: &[Vec<u8>],
    truncated: bool,
    underlay: &Underlay,
    marker: &[u8],
) -> CaptureReport {
    let mut report = CaptureReport {
        frames: frames.len(),
        truncated,
        ..CaptureReport::default()
    };
    let violation = |report: &mut CaptureReport, line: String| {
        report.violation_count += 1;
        if report.violations.len() < 20 {
            report.violations.push(line);
        }
    };
    for frame in frames {
        if contains(frame, marker) {
            report.marker_hits += 1;
        }
        if frame.len() < 14 {
            continue;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let ip = &frame[14..];
        match ethertype {
            ETHERTYPE_ARP => {
                report.link_local += 1;
                continue;
            }
            ETHERTYPE_IPV6 => {
                match classify_ipv6(ip, underlay) {
                    Ok(()) => report.link_local += 1,
                    Err(line) => violation(&mut report, line),
                }
                continue;
            }
            ETHERTYPE_IPV4 if ip.len() >= 20 => {}
            other => {
                violation(&mut report, format!("ethertype {other:#06x}"));
                continue;
            }
        }
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        let proto = ip[9];
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        if src == underlay.control_plane_ip || dst == underlay.control_plane_ip {
            report.control_plane += 1;
            continue;
        }
        let in_pods = |a: &Ipv4Addr| underlay.pod_cidrs.iter().any(|c| c.contains(a));
        if in_pods(&src) || in_pods(&dst) {
            violation(
                &mut report,
                format!("plaintext pod packet {src} -> {dst} (protocol {proto})"),
            );
            continue;
        }
        let between_nodes = underlay.node_ips.contains(&src) && underlay.node_ips.contains(&dst);
        if between_nodes && proto == IPPROTO_UDP && ip.len() >= header_len + 8 {
            let udp = &ip[header_len..];
            let sport = u16::from_be_bytes([udp[0], udp[1]]);
            let dport = u16::from_be_bytes([udp[2], udp[3]]);
            let ports = underlay.wireguard_port..=underlay.wireguard_port.saturating_add(1);
            let on_port = ports.contains(&sport) || ports.contains(&dport);
            if let (true, Some(kind)) = (on_port, wireguard_type(&udp[8..])) {
                *report.wireguard.entry(kind).or_default() += 1;
                continue;
            }
            violation(
                &mut report,
                format!("non-WireGuard UDP {src}:{sport} -> {dst}:{dport}"),
            );
            continue;
        }
        violation(
            &mut report,
            format!("unexpected packet {src} -> {dst} (protocol {proto})"),
        );
    }
    report
}

/// An IPv6 frame's verdict: `Ok` for on-link control traffic (neighbour discovery, MLD), the
/// violation line otherwise (a pod address, or anything else between nodes).
fn classify_ipv6(ip: &[u8], underlay: &Underlay) -> Result<(), String> {
    if ip.len() < 40 {
        return Err("truncated IPv6 packet".to_string());
    }
    let next = ip[6];
    let addr = |at: usize| {
        let mut o = [0u8; 16];
        o.copy_from_slice(&ip[at..at + 16]);
        Ipv6Addr::from(o)
    };
    let (src, dst) = (addr(8), addr(24));
    let in_pods = |a: &Ipv6Addr| underlay.pod_cidrs6.iter().any(|c| c.contains(a));
    if in_pods(&src) || in_pods(&dst) {
        return Err(format!(
            "plaintext pod packet {src} -> {dst} (next header {next})"
        ));
    }
    let link_local = |a: &Ipv6Addr| a.is_unspecified() || (a.segments()[0] & 0xffc0) == 0xfe80;
    if next == IPPROTO_ICMPV6 || dst.is_multicast() || link_local(&src) {
        return Ok(());
    }
    Err(format!(
        "unexpected IPv6 packet {src} -> {dst} (next header {next})"
    ))
}

/// Captures on `ifname` while `traffic` runs (plus `settle` afterwards, for echoes in flight)
/// and classifies the result.
pub fn during<T>(
    ifname: &str,
    underlay: &Underlay,
    marker: &[u8],
    settle: Duration,
    traffic: impl FnOnce() -> T,
) -> io::Result<(T, CaptureReport)> {
    let capture = Capture::start(ifname)?;
    let out = traffic();
    std::thread::sleep(settle);
    let (frames, truncated) = capture.stop()?;
    Ok((out, classify(&frames, truncated, underlay, marker)))
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    fn underlay() -> Underlay {
        Underlay {
            node_ips: vec![Ipv4Addr::new(10, 213, 1, 11), Ipv4Addr::new(10, 213, 1, 12)],
            control_plane_ip: Ipv4Addr::new(10, 213, 1, 1),
            pod_cidrs: vec![
                Ipv4Net::from_str("10.244.1.0/24").unwrap(),
                Ipv4Net::from_str("10.244.2.0/24").unwrap(),
            ],
            pod_cidrs6: vec![Ipv6Net::from_str("fd00:10:244:1::/64").unwrap()],
            wireguard_port: 51871,
        }
    }

    fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&[0, 0, 0, 0]);
        u.extend_from_slice(payload);
        u
    }

    fn wg_data(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 4;
        p
    }

    #[test]
    fn wireguard_between_nodes_and_control_plane_are_clean() {
        let frames = vec![
            frame(
                [10, 213, 1, 11],
                [10, 213, 1, 12],
                17,
                &udp(51871, 51871, &wg_data(32 + 96)),
            ),
            frame(
                [10, 213, 1, 12],
                [10, 213, 1, 11],
                17,
                &udp(51871, 51871, &{
                    let mut p = vec![0u8; 148];
                    p[0] = 1;
                    p
                }),
            ),
            frame([10, 213, 1, 11], [10, 213, 1, 1], 6, &[0u8; 20]),
            // Slot b's port (after a key rotation).
            frame(
                [10, 213, 1, 12],
                [10, 213, 1, 11],
                17,
                &udp(51872, 51872, &wg_data(32 + 64)),
            ),
        ];
        let report = classify(&frames, false, &underlay(), b"MARKER");
        assert!(report.clean(), "{report:?}");
        assert_eq!(report.wireguard_data(), 2);
        assert_eq!(report.wireguard["handshake-initiation"], 1);
        assert_eq!(report.control_plane, 1);
    }

    #[test]
    fn plaintext_pod_traffic_marker_and_other_udp_are_violations() {
        let mut plain = udp(4000, 5000, b"xxMARKERxx");
        plain.truncate(plain.len());
        let frames = vec![
            frame([10, 244, 1, 11], [10, 244, 2, 11], 17, &plain),
            frame([10, 213, 1, 11], [10, 213, 1, 12], 17, &udp(53, 53, b"dns")),
            frame(
                [10, 213, 1, 11],
                [10, 213, 1, 12],
                17,
                &udp(51871, 51871, b"\x04\x00\x00\x00short"),
            ),
            frame([10, 213, 1, 11], [10, 213, 1, 12], 6, &[0u8; 20]),
        ];
        let report = classify(&frames, false, &underlay(), b"MARKER");
        assert!(!report.clean());
        assert_eq!(report.marker_hits, 1);
        assert_eq!(report.violation_count, 4, "{:?}", report.violations);
        assert!(report.violations[0].contains("plaintext pod packet"));
    }

    fn frame6(src: &str, dst: &str, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
        ip.extend_from_slice(&[next, 64]);
        ip.extend_from_slice(&Ipv6Addr::from_str(src).unwrap().octets());
        ip.extend_from_slice(&Ipv6Addr::from_str(dst).unwrap().octets());
        f.extend_from_slice(&ip);
        f.extend_from_slice(l4);
        f
    }

    /// Before dual stack every IPv6 frame counted as neighbour discovery, so plaintext IPv6 pod
    /// traffic on the underlay went unnoticed (issue 13, finding 3).
    #[test]
    fn plaintext_ipv6_pod_packets_are_violations_and_neighbour_discovery_is_not() {
        let frames = vec![
            frame6(
                "fd00:10:244:1::b",
                "fd00:10:244:2::b",
                17,
                &udp(4000, 80, b"x"),
            ),
            frame6("fd00:213:1::b", "fd00:213:1::c", 6, &[0u8; 20]),
            frame6("fd00:213:1::b", "ff02::1:ff00:c", 58, &[135, 0, 0, 0]),
            frame6("fe80::1", "ff02::16", 0, &[58, 0, 0, 0]),
        ];
        let report = classify(&frames, false, &underlay(), b"MARKER");
        assert_eq!(report.violation_count, 2, "{:?}", report.violations);
        assert!(report.violations[0].contains("plaintext pod packet"));
        assert!(report.violations[1].contains("unexpected IPv6 packet"));
        assert_eq!(report.link_local, 2);
    }

    #[test]
    fn no_wireguard_data_is_not_clean() {
        let report = classify(&[], false, &underlay(), b"MARKER");
        assert!(!report.clean());
    }
}
