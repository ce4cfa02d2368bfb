//! The index and MTU of an interface by name, in the calling thread's network namespace (two
//! ioctls on a throwaway datagram socket; no netlink connection needed).

use std::{io, os::fd::AsRawFd};

/// What [`lookup`] finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Link {
    pub ifindex: u32,
    pub mtu: u32,
}

/// The interface `ifname`; `NotFound` when it does not exist in this namespace.
pub(crate) fn lookup(ifname: &str) -> io::Result<Link> {
    let mut req = ifreq(ifname)?;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: `req` is a valid, NUL-terminated ifreq that outlives the call; SIOCGIFINDEX writes
    // only its union.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) } < 0 {
        return Err(not_found_or(ifname, io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the ifindex member of the union.
    let ifindex = unsafe { req.ifr_ifru.ifru_ifindex };
    // SAFETY: as above, for SIOCGIFMTU and the mtu member.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } < 0 {
        return Err(not_found_or(ifname, io::Error::last_os_error()));
    }
    // SAFETY: the kernel filled the mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(Link {
        ifindex: u32::try_from(ifindex).unwrap_or(0),
        mtu: u32::try_from(mtu).unwrap_or(0),
    })
}

fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {ifname:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn not_found_or(ifname: &str, err: io::Error) -> io::Error {
    if err.raw_os_error() == Some(libc::ENODEV) {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {ifname} in this network namespace"),
        )
    } else {
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_has_index_and_mtu_and_a_missing_name_is_not_found() {
        let lo = lookup("lo").expect("lo exists in every namespace");
        assert!(lo.ifindex > 0);
        assert!(lo.mtu >= 1280, "{lo:?}");
        let err = lookup("wm-no-such-if").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        assert!(err.to_string().contains("wm-no-such-if"), "{err}");
        assert!(lookup("").is_err());
        assert!(lookup("a-name-longer-than-15").is_err());
    }
}
