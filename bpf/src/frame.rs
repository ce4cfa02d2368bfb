//! Minimal Ethernet frames (IPv4 TCP, IPv6 UDP) for [`crate::Loader::test_run`]: enough header for the programs'
//! parser (no checksums; the programs do not verify them).

use std::net::{SocketAddrV4, SocketAddrV6};

/// TCP flag bits of [`tcp4`].
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// An Ethernet + IPv4 + TCP frame from `src` to `dst` with `flags` and `payload` bytes of zeros.
pub fn tcp4(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20 + payload];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]); // destination MAC
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]); // source MAC
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20u16 + 20 + payload as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    tcp[12] = 5 << 4; // data offset
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f
}

/// An Ethernet + IPv6 + UDP frame from `src` to `dst` with `payload` bytes of zeros.
pub fn udp6(src: SocketAddrV6, dst: SocketAddrV6, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 40 + 8 + payload];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let ip = &mut f[14..54];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(8u16 + payload as u16).to_be_bytes());
    ip[6] = 17; // UDP
    ip[7] = 64; // hop limit
    ip[8..24].copy_from_slice(&src.ip().octets());
    ip[24..40].copy_from_slice(&dst.ip().octets());
    let udp = &mut f[54..62];
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(8u16 + payload as u16).to_be_bytes());
    f
}
