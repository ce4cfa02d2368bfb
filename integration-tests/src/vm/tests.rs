//! Unit tests of the VM harness's pure parts (the boot itself is tested by tests/kernel_vm.rs).

use std::{ffi::OsString, process::Command};

use super::{
    VmCommand, exit_marker, guest_script, initramfs, kernel, libtest_passed, sh_quote, tail_lines,
};

/// (name, mode, rdev, data) of one archive member.
type Member = (String, u32, (u32, u32), Vec<u8>);

/// A minimal newc reader: every member, trailer excluded.
fn read_newc(mut b: &[u8]) -> Vec<Member> {
    let field = |h: &[u8], i: usize| {
        u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
    };
    let mut out = Vec::new();
    let mut consumed = 0usize;
    loop {
        assert_eq!(&b[..6], b"070701", "magic at offset {consumed}");
        let (mode, size, rmaj, rmin, namesize) = (
            field(b, 1),
            field(b, 6),
            field(b, 9),
            field(b, 10),
            field(b, 11),
        );
        let name = std::str::from_utf8(&b[110..110 + namesize as usize - 1])
            .unwrap()
            .to_owned();
        assert_eq!(b[110 + namesize as usize - 1], 0, "NUL after the name");
        let data_at = (110 + namesize as usize).next_multiple_of(4);
        let data = b[data_at..data_at + size as usize].to_vec();
        let next = (data_at + size as usize).next_multiple_of(4);
        consumed += next;
        b = &b[next..];
        if name == "TRAILER!!!" {
            assert!(b.is_empty(), "nothing after the trailer");
            return out;
        }
        out.push((name, mode, (rmaj, rmin), data));
    }
}

#[test]
fn newc_archive_has_every_member_aligned_with_its_type() {
    let entries = initramfs::entries(
        b"\x7fELF-busybox".to_vec(),
        vec![
            ("virtio.ko".to_owned(), vec![1, 2, 3], String::new()),
            ("dummy.ko".to_owned(), vec![4; 5], "numdummies=0".to_owned()),
        ],
    );
    let archive = initramfs::newc(&entries);
    assert_eq!(archive.len() % 4, 0);
    let members = read_newc(&archive);
    let get = |n: &str| {
        members
            .iter()
            .find(|m| m.0 == n)
            .unwrap_or_else(|| panic!("{n} missing: {members:?}"))
    };
    assert_eq!(get("init").1, 0o100_755);
    assert_eq!(get("init").3, initramfs::INIT.as_bytes());
    assert_eq!(get("bin/busybox").3, b"\x7fELF-busybox");
    assert_eq!(get("bin/sh").1, 0o120_777);
    assert_eq!(get("bin/sh").3, b"busybox");
    assert_eq!(get("dev/console").1, 0o020_600);
    assert_eq!(get("dev/console").2, (5, 1));
    assert_eq!(get("newroot").1, 0o040_755);
    assert_eq!(get("mods/dummy.ko").3, vec![4; 5]);
    assert_eq!(
        get("mods/order").3,
        b"virtio.ko\ndummy.ko numdummies=0\n",
        "dependency order kept, params on the line"
    );
    // The directories come before what they contain.
    let pos = |n: &str| members.iter().position(|m| m.0 == n).unwrap();
    assert!(pos("mods") < pos("mods/order") && pos("bin") < pos("bin/busybox"));
}

#[test]
fn init_mounts_what_the_tests_rely_on() {
    for needle in [
        "msize=512000",
        "cache=loose",
        "mount -t bpf bpf $R/sys/fs/bpf",
        "mount -t tmpfs -o mode=1777 tmp $R/tmp",
        "mount -t tmpfs -o mode=755 run $R/run",
        "chroot $R /bin/sh /run/wiremesh-vm/cmd.sh",
        "echo \"$rc\" > $W/exit_code",
        initramfs::MARK_START,
        initramfs::MARK_EXIT,
    ] {
        assert!(initramfs::INIT.contains(needle), "init lacks {needle}");
    }
}

#[test]
fn guest_script_quotes_arguments_and_replaces_the_environment() {
    let dir = std::env::temp_dir().join(format!("wm-vm-script-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cmd = VmCommand::new([
        "/bin/sh",
        "-c",
        "pwd; printf '<%s>\\n' \"$1\" \"$2\"; echo \"$WG_COLOR_MODE $WIREMESH_IN_VM $X\"; \
         env | grep -c . ",
        "sh",
        "it's a \"test\" $HOME",
        "",
    ])
    .env("X", "x y")
    .cwd(&dir);
    let script = dir.join("cmd.sh");
    std::fs::write(&script, guest_script(&cmd)).unwrap();
    let out = Command::new("/bin/sh")
        .arg(&script)
        .env("LEAK", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], dir.to_str().unwrap());
    assert_eq!(lines[1], "<it's a \"test\" $HOME>");
    assert_eq!(lines[2], "<>");
    assert_eq!(lines[3], "never 1 x y");
    // PATH HOME TERM LANG WG_COLOR_MODE RUST_BACKTRACE WIREMESH_IN_VM X (+ PWD from sh): no LEAK.
    let n: usize = lines[4].trim().parse().unwrap();
    assert!(
        (8..=9).contains(&n),
        "environment not replaced: {n} variables"
    );
}

#[test]
fn sh_quote_survives_single_quotes() {
    assert_eq!(sh_quote(&OsString::from("a'b")), b"'a'\\''b'");
}

#[test]
fn kernel_package_is_the_versioned_image_dependency() {
    let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
    assert_eq!(
        kernel::depends_image(out).as_deref(),
        Some("linux-image-6.1.0-57-amd64")
    );
    assert_eq!(
        kernel::depends_image("linux-image-amd64\n  Depends: linux-image-amd64-signed\n"),
        None
    );
}

#[test]
fn module_load_order_keeps_dependencies_first_once() {
    let show = "insmod /t/virtio_ring.ko \ninsmod /t/virtio.ko \nbuiltin af_packet\n\
                insmod /t/virtio_ring.ko \ninsmod /t/dummy.ko numdummies=0 \n";
    assert_eq!(
        kernel::load_order(show),
        [
            ("/t/virtio_ring.ko".to_owned(), String::new()),
            ("/t/virtio.ko".to_owned(), String::new()),
            ("/t/dummy.ko".to_owned(), "numdummies=0".to_owned()),
        ]
    );
}

#[test]
fn xz_stream_is_found_in_a_bzimage() {
    let mut image = vec![0u8; 1000];
    image.extend_from_slice(b"\xfd7zXZ\x00rest");
    assert_eq!(kernel::xz_offset(&image), Some(1000));
    assert_eq!(kernel::xz_offset(&[0; 64]), None);
}

#[test]
fn static_elf_is_told_from_dynamic() {
    let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(
        initramfs::is_static_elf(&me),
        Some(false),
        "a Rust test binary is dynamically linked"
    );
    assert_eq!(initramfs::is_static_elf(b"#!/bin/sh\n"), None);
}

#[test]
fn exit_status_and_libtest_summary_are_parsed() {
    assert_eq!(
        exit_marker("x\r\nWIREMESH_VM_EXIT=3\r\n[ 1.0] reboot"),
        Some(3)
    );
    assert_eq!(exit_marker("no marker"), None);
    let stdout = "running 2 tests\ntest a ... ok\n\ntest result: ok. 2 passed; 0 failed; 0 ignored";
    assert_eq!(libtest_passed(stdout), Some(2));
    assert_eq!(
        libtest_passed("test result: FAILED. 1 passed; 1 failed"),
        None
    );
    assert_eq!(tail_lines("1\n2\n3", 2), "2\n3");
}
