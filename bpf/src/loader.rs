//! The loader: loads the embedded object, pins its maps under the node's bpffs directory
//! (reusing pins left by a previous run, so enforcement survives an agent restart), attaches
//! the programs to interfaces with pinned TCX links (kernels 6.6 and later) or netlink tc
//! filters of our own priority and handle (older kernels, such as 5.15-6.1), and exposes the maps
//! and the flow ring. Either way an attached program outlives the loader and the process, and
//! the next run swaps its programs in place.
//! Pins of an older build whose maps have another shape are not reused: the maps go to a new
//! generation directory (`<pin_dir>/gen-<n>`) beside them, the caller fills them, `attach`
//! swaps the new programs into the pinned links atomically, and
//! [`Loader::remove_previous_generations`] deletes the old map pins (no enforcement gap).

use std::{
    ffi::CString,
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader, Pod, include_bytes_aligned,
    maps::{
        Array, HashMap, LpmTrie, MapData, MapError, MapInfo, PerCpuArray, RingBuf, lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{
            NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle, qdisc_add_clsact,
            qdisc_detach_program,
        },
    },
    util::KernelVersion,
};
use ipnet::{Ipv4Net, Ipv6Net};
use tracing::{debug, info, warn};
use wiremesh_policy::{Identity, IsolationKey, MapDiff, RuleKey};

use crate::abi::{
    AbiError, Config, Ct6Key, CtKey, CtValue, EndpointValue, Flow, FlowEvent, FlowKey, FlowKey6,
    FlowState, FragKey, FragValue, Hook, IpcacheValue, IsolationKeyRaw, RuleData, Stats6, lpm4_key,
    lpm4_net, lpm6_key, lpm6_net, rule_key,
};
use crate::sync::{MapWriter, PolicyApplied, apply_policy, apply_policy_dual};

mod retain;
pub use retain::Retained;

/// The object built from `src/datapath.bpf.c` by build.rs.
static DATAPATH: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.bpf.o"));

/// Where bpffs is normally mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `<bpffs>/wiremesh/<node>`: one directory per agent, as several agents share a host in the
/// virtual cluster.
pub fn node_pin_dir(bpffs: &Path, node: &str) -> PathBuf {
    bpffs.join("wiremesh").join(node)
}

/// Loader errors, with the object (map, program, interface, path) they concern.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pin directory could not be created or inspected.
    #[error("pin directory {path}: {source}")]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The pin directory is not on a bpffs.
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// Creating or opening the maps or parsing the object failed.
    #[error("loading the eBPF object with maps pinned in {pin_dir}: {source}")]
    Load {
        /// The pin directory.
        pin_dir: PathBuf,
        /// The cause.
        source: Box<aya::EbpfError>,
    },
    /// A program is missing from the object or was rejected (the message carries the verifier
    /// log).
    #[error("program {program}: {source}")]
    Program {
        /// The program name.
        program: &'static str,
        /// The cause, with the verifier output for a rejected program.
        source: Box<ProgramError>,
    },
    /// A map is missing from the object.
    #[error("map {map} missing from the eBPF object")]
    MapMissing {
        /// The map name.
        map: &'static str,
    },
    /// A map operation failed.
    #[error("map {map}: {source}")]
    Map {
        /// The map name.
        map: &'static str,
        /// The cause.
        source: Box<MapError>,
    },
    /// The interface does not exist in this thread's network namespace.
    #[error("interface {iface}: {source}")]
    Interface {
        /// The interface name.
        iface: String,
        /// The cause.
        source: io::Error,
    },
    /// Adding the clsact qdisc, or removing a netlink filter, failed (kernels before 6.6 only).
    #[error("interface {iface}: adding clsact qdisc: {source}")]
    Qdisc {
        /// The interface name.
        iface: String,
        /// The cause.
        source: Box<TcError>,
    },
    /// Attaching, or pinning the link, failed.
    #[error("interface {iface}: attaching {program}: {source}")]
    Attach {
        /// The interface name.
        iface: String,
        /// The program name.
        program: &'static str,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map pinned by an earlier run has a different shape than this build's (an ABI change
    /// needs a migration; remove the pin to start empty).
    #[error(
        "pinned map {path} has key/value/max_entries {found:?}, this build expects {expected:?}"
    )]
    PinnedMapMismatch {
        /// The pin.
        path: PathBuf,
        /// (key size, value size, max entries) of the pinned map.
        found: (u32, u32, u32),
        /// (key size, value size, max entries) this build defines.
        expected: (u32, u32, u32),
    },
    /// An entry cannot be expressed in the maps.
    #[error(transparent)]
    Abi(#[from] AbiError),
    /// Waiting on the ring buffer failed.
    #[error("flow ring buffer: {0}")]
    Ring(io::Error),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> Error {
    move |e| Error::Map {
        map,
        source: Box::new(e),
    }
}

/// What the kernel accounted for one program ([`Loader::program_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramStats {
    /// The kernel's program id.
    pub id: u32,
    /// Runs counted while statistics were enabled.
    pub run_count: u64,
    /// Time spent in those runs.
    pub run_time: Duration,
}

/// The result of [`Loader::test_run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    /// The program's return value (`TC_ACT_*`, or the redirect result) of the last run.
    pub retval: u32,
    /// Average time per run, as the kernel measured it.
    pub per_run: Duration,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const _: () = assert!(size_of::<TestRunAttr>() == 80);

/// The `test` member of `union bpf_attr` (80 bytes with the explicit tail padding, no implicit padding).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so it is zero: the kernel rejects (EINVAL) an attr with non-zero bytes after
    /// the command's last field, and implicit padding would be uninitialized.
    pad: u32,
}

/// How [`Loader::attach`] attached a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new TCX link, now pinned.
    Pinned,
    /// The program of a link pinned by an earlier run was replaced atomically.
    ReplacedPinned,
    /// A new netlink tc filter at [`NETLINK_PRIORITY`]/[`NETLINK_HANDLE`] (kernels before 6.6;
    /// it outlives the loader and the process by itself).
    Netlink,
    /// The program of our netlink filter, left by an earlier run or loader, was replaced
    /// atomically (cls_bpf swaps it in place: no gap).
    NetlinkReplaced,
}

impl Attached {
    /// A fresh attachment on this kernel: [`Attached::Pinned`] with TCX, [`Attached::Netlink`]
    /// without.
    pub fn fresh() -> Self {
        if tcx_available() {
            Self::Pinned
        } else {
            Self::Netlink
        }
    }

    /// A program swapped into an existing attachment on this kernel.
    pub fn replaced() -> Self {
        if tcx_available() {
            Self::ReplacedPinned
        } else {
            Self::NetlinkReplaced
        }
    }
}

/// Whether this kernel has TCX links (6.6 and later); older kernels get netlink tc filters
/// under a clsact qdisc.
pub fn tcx_available() -> bool {
    KernelVersion::current()
        .map(|v| v >= KernelVersion::new(6, 6, 0))
        .unwrap_or(false)
}

/// The tc priority of our netlink filters (kernels before 6.6): 1, ahead of filters added with
/// the kernel's default priority (49152 and below, what `tc filter add` without `prio` picks).
pub const NETLINK_PRIORITY: u16 = 1;
/// The handle of our netlink filters ("wm"): a fixed slot, so a later run replaces exactly our
/// filter and never a filter of another project at the same priority.
pub const NETLINK_HANDLE: u32 = 0x776d;

/// Every map of the object with (key size, value size, max entries) as `wiremesh.h` defines
/// them; checked against pins reused from an earlier run.
const MAP_SHAPES: [(&str, u32, u32, u32); 17] = [
    ("wm_ipcache4", 8, size_of::<IpcacheValue>() as u32, 65536),
    ("wm_cidrs4", 8, 4, 65536),
    ("wm_isolated", size_of::<IsolationKeyRaw>() as u32, 1, 65536),
    ("wm_rules", 16, 1, 262_144),
    ("wm_config", 4, size_of::<Config>() as u32, 1),
    ("wm_events", 0, 0, 1 << 20),
    ("wm_flows", 20, 24, 65536),
    (
        "wm_ct",
        size_of::<CtKey>() as u32,
        size_of::<CtValue>() as u32,
        262_144,
    ),
    ("wm_stats", 4, 8, 1),
    ("wm_endpoints", 4, size_of::<EndpointValue>() as u32, 65536),
    ("wm_policy_epoch", 4, 4, 1),
    ("wm_ipcache6", 20, size_of::<IpcacheValue>() as u32, 65536),
    ("wm_cidrs6", 20, 4, 65536),
    (
        "wm_ct6",
        size_of::<Ct6Key>() as u32,
        size_of::<CtValue>() as u32,
        65536,
    ),
    ("wm_stats6", 4, size_of::<Stats6>() as u32, 1),
    ("wm_flows6", 44, 24, 65536),
    (
        "wm_frags",
        size_of::<FragKey>() as u32,
        size_of::<FragValue>() as u32,
        8192,
    ),
];

fn check_pinned_shapes(pin_dir: &Path) -> Result<(), Error> {
    for (name, key, value, max) in MAP_SHAPES {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(map_err(name))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        if found != (key, value, max) {
            return Err(Error::PinnedMapMismatch {
                path,
                found,
                expected: (key, value, max),
            });
        }
        debug!(map = name, "reusing pinned map");
    }
    Ok(())
}

/// The IPv4 ipcache entries pinned in `pin_dir`'s newest generation, read from the pin alone:
/// nothing is loaded or attached (tests and tools inspect a node's datapath this way while its
/// agent runs).
pub fn pinned_ipcache_entries(pin_dir: &Path) -> Result<Vec<(Ipv4Net, IpcacheValue)>, Error> {
    let newest = pinned_generations(pin_dir).last().copied().unwrap_or(0);
    let name = "wm_ipcache4";
    let data =
        MapData::from_pin(generation_dir(pin_dir, newest).join(name)).map_err(map_err(name))?;
    let trie: LpmTrie<MapData, [u8; 4], IpcacheValue> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).map_err(map_err(name))?;
    lpm_entries(&trie, name, lpm4_net)
}

/// [`pinned_ipcache_entries`] for the IPv6 ipcache (`wm_ipcache6`).
pub fn pinned_ipcache6_entries(pin_dir: &Path) -> Result<Vec<(Ipv6Net, IpcacheValue)>, Error> {
    let newest = pinned_generations(pin_dir).last().copied().unwrap_or(0);
    let name = "wm_ipcache6";
    let data =
        MapData::from_pin(generation_dir(pin_dir, newest).join(name)).map_err(map_err(name))?;
    let trie: LpmTrie<MapData, [u8; 16], IpcacheValue> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).map_err(map_err(name))?;
    lpm_entries(&trie, name, lpm6_net)
}

/// Where the generations of map pins live under a node's pin directory: the directory itself
/// (generation 0, as every build before generations pinned them) and `gen-<n>` in it.
fn generation_dir(pin_dir: &Path, generation: u32) -> PathBuf {
    if generation == 0 {
        pin_dir.to_owned()
    } else {
        pin_dir.join(format!("gen-{generation}"))
    }
}

/// The generations that hold map pins, oldest first.
fn pinned_generations(pin_dir: &Path) -> Vec<u32> {
    let holds_maps = |dir: &Path| MAP_SHAPES.iter().any(|(name, ..)| dir.join(name).exists());
    let mut out: Vec<u32> = std::fs::read_dir(pin_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("gen-")?
                .parse::<u32>()
                .ok()
        })
        .filter(|g| *g > 0 && holds_maps(&generation_dir(pin_dir, *g)))
        .collect();
    if holds_maps(pin_dir) {
        out.push(0);
    }
    out.sort_unstable();
    out
}

/// A loaded datapath: the programs (loaded, verified) and the maps, pinned per node.
pub struct Loader {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    map_dir: PathBuf,
    previous: Vec<PathBuf>,
    maps: Maps,
    flows: Option<FlowReader>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Loader {
    /// Loads the object with its maps pinned in `pin_dir` (created if missing, must be on a
    /// bpffs). Maps already pinned there by an earlier run are reused with their entries;
    /// every program is loaded (verified) now. Must run in the node's network namespace.
    ///
    /// When the newest pinned generation has a map of another shape (an older build), the maps
    /// are created empty in a new generation directory instead and the old ones keep serving
    /// the programs still attached: fill the new maps, [`Loader::attach`] every hook again
    /// (the pinned links switch to the new programs atomically), then call
    /// [`Loader::remove_previous_generations`].
    pub fn load(pin_dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(pin_dir.join("links")).map_err(|source| Error::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        check_bpffs(pin_dir)?;
        let generations = pinned_generations(pin_dir);
        let newest = generations.last().copied().unwrap_or(0);
        let generation = match check_pinned_shapes(&generation_dir(pin_dir, newest)) {
            Ok(()) => newest,
            Err(Error::PinnedMapMismatch {
                path,
                found,
                expected,
            }) => {
                warn!(
                    pin = %path.display(),
                    ?found,
                    ?expected,
                    generation = newest + 1,
                    "pinned maps of an older build have another shape; loading a new generation \
                     beside them (the attached programs keep the old maps until swapped)"
                );
                newest + 1
            }
            Err(e) => return Err(e),
        };
        let map_dir = generation_dir(pin_dir, generation);
        std::fs::create_dir_all(&map_dir).map_err(|source| Error::PinDir {
            path: map_dir.clone(),
            source,
        })?;
        let previous: Vec<PathBuf> = generations
            .iter()
            .filter(|g| **g != generation)
            .map(|g| generation_dir(pin_dir, *g))
            .collect();
        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .load(DATAPATH)
            .map_err(|e| Error::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(e),
            })?;
        for hook in Hook::ALL {
            program(&mut ebpf, hook)?
                .load()
                .map_err(|e| Error::Program {
                    program: hook.program(),
                    source: Box::new(e),
                })?;
        }
        let maps = Maps::take(&mut ebpf)?;
        let ring = take(&mut ebpf, "wm_events")?;
        let flows = FlowReader {
            ring: RingBuf::try_from(ring).map_err(map_err("wm_events"))?,
        };
        info!(pin_dir = %pin_dir.display(), map_dir = %map_dir.display(), "eBPF datapath loaded");
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            map_dir,
            previous,
            maps,
            flows: Some(flows),
        })
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The directory of this loader's map pins: the pin directory, or a `gen-<n>` directory in
    /// it after an upgrade changed the maps' shapes.
    pub fn map_dir(&self) -> &Path {
        &self.map_dir
    }

    /// Map pin directories of other generations (an older build's maps, still used by the
    /// programs attached before this loader's [`Loader::attach`] calls replaced them).
    pub fn previous_generations(&self) -> &[PathBuf] {
        &self.previous
    }

    /// Deletes the map pins of the other generations; call it once every attached hook runs
    /// this loader's programs (the kernel frees the old maps when their last program goes).
    /// Returns the number of pins deleted.
    pub fn remove_previous_generations(&mut self) -> Result<usize, Error> {
        let mut n = 0;
        for dir in std::mem::take(&mut self.previous) {
            for (name, ..) in MAP_SHAPES {
                let path = dir.join(name);
                match std::fs::remove_file(&path) {
                    Ok(()) => n += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(source) => return Err(Error::PinDir { path, source }),
                }
            }
            if dir != self.pin_dir {
                // Empty now unless something foreign lives there; then it stays.
                let _ = std::fs::remove_dir(&dir);
            }
            info!(dir = %dir.display(), "removed the map pins of a previous generation");
        }
        Ok(n)
    }

    /// The maps.
    pub fn maps(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// The maps, read-only.
    pub fn maps_ref(&self) -> &Maps {
        &self.maps
    }

    /// Run count and cumulative run time of `hook`'s program as the kernel accounts them. The
    /// kernel counts only while run-time statistics are enabled (`aya::sys::enable_stats` or
    /// the `kernel.bpf_stats_enabled` sysctl); otherwise both stay zero.
    pub fn program_stats(&self, hook: Hook) -> Result<ProgramStats, Error> {
        self.with_program(hook, |prog| {
            let info = prog.info()?;
            Ok(ProgramStats {
                id: info.id(),
                run_count: info.run_count(),
                run_time: info.run_time(),
            })
        })
    }

    /// Calls `f` on `hook`'s loaded program, naming the program in its error.
    fn with_program<T>(
        &self,
        hook: Hook,
        f: impl FnOnce(&aya::programs::Program) -> Result<T, ProgramError>,
    ) -> Result<T, Error> {
        let prog = self
            .ebpf
            .program(hook.program())
            .ok_or(ProgramError::UnexpectedProgramType);
        prog.and_then(f).map_err(|source| Error::Program {
            program: hook.program(),
            source: Box::new(source),
        })
    }

    /// Runs `hook`'s program `repeat` times (at least once) on `frame`, an Ethernet frame, with
    /// `BPF_PROG_TEST_RUN`, as if it passed the device `ifindex` of this thread's network
    /// namespace (0: loopback). Maps are used and updated as by real traffic, so this measures
    /// the program's own cost without any network around it (benchmarks), and checks verdicts
    /// without namespaces.
    pub fn test_run(
        &self,
        hook: Hook,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRun, Error> {
        let fd = self.with_program(hook, |prog| Ok(prog.fd()?.as_fd().as_raw_fd()))?;
        // struct __sk_buff (192 bytes): only ifindex (offset 40) is set.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: repeat.max(1),
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            ..TestRunAttr::default()
        };
        // SAFETY: BPF_PROG_TEST_RUN with an attr whose pointers reference live buffers of the
        // sizes given; the kernel writes only into `out` and `attr`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRunAttr,
                size_of::<TestRunAttr>() as u32,
            )
        };
        if r < 0 {
            let io_error = io::Error::last_os_error();
            return Err(Error::Program {
                program: hook.program(),
                source: Box::new(ProgramError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_prog_test_run",
                    io_error,
                })),
            });
        }
        Ok(TestRun {
            retval: attr.retval,
            per_run: Duration::from_nanos(u64::from(attr.duration)),
        })
    }

    /// The flow-record reader; `None` once taken.
    pub fn take_flow_reader(&mut self) -> Option<FlowReader> {
        self.flows.take()
    }

    /// Attaches `hook`'s program to `iface` (in this thread's network namespace). On kernels
    /// 6.6 and later the TCX link is pinned in `<pin_dir>/links/<program>-<iface>` so the program
    /// stays attached when this process exits; a link pinned by an earlier run is updated in
    /// place to the new program (no gap). Older kernels get a clsact qdisc and a netlink filter
    /// at [`NETLINK_PRIORITY`]/[`NETLINK_HANDLE`]: an existing one (an earlier run's) gets the new
    /// program in place, otherwise it is created; it also outlives the loader and the process.
    pub fn attach(&mut self, iface: &str, hook: Hook) -> Result<Attached, Error> {
        if_index(iface)?;
        let name = hook.program();
        let attach_type = attach_type(hook);
        let attach_err = |source: Box<dyn std::error::Error + Send + Sync>| Error::Attach {
            iface: iface.to_owned(),
            program: name,
            source,
        };
        let prog = program(&mut self.ebpf, hook)?;
        if !tcx_available() {
            let how = attach_netlink(prog, iface, attach_type).map_err(attach_err)?;
            info!(iface, program = name, ?how, "attached (netlink)");
            return Ok(how);
        }
        let pin = self.pin_dir.join("links").join(format!("{name}-{iface}"));
        if pin.exists() {
            match replace_pinned(prog, &pin) {
                Ok(()) => {
                    info!(iface, program = name, pin = %pin.display(), "replaced program in pinned link");
                    return Ok(Attached::ReplacedPinned);
                }
                Err(e) => {
                    // A link of a deleted device (or a foreign file): start over.
                    warn!(iface, program = name, pin = %pin.display(), error = %e, "stale pinned link, re-attaching");
                    std::fs::remove_file(&pin).map_err(|e| attach_err(Box::new(e)))?;
                }
            }
        }
        let id = prog
            .attach(iface, attach_type)
            .map_err(|e| attach_err(Box::new(e)))?;
        let link = prog.take_link(id).map_err(|e| attach_err(Box::new(e)))?;
        let fd = FdLink::try_from(link).map_err(|e| attach_err(Box::new(e)))?;
        fd.pin(&pin).map_err(|e| attach_err(Box::new(e)))?;
        info!(iface, program = name, pin = %pin.display(), "attached (tcx, pinned)");
        Ok(Attached::Pinned)
    }

    /// Detaches `hook`'s program from `iface`: removes its pinned link (TCX), or its netlink
    /// filters (older kernels; every filter of that program name on the interface, so those of
    /// earlier builds too). A missing link, filter or interface is not an error.
    pub fn detach(&mut self, iface: &str, hook: Hook) -> Result<(), Error> {
        let pin = self
            .pin_dir
            .join("links")
            .join(format!("{}-{iface}", hook.program()));
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Attach {
                    iface: iface.to_owned(),
                    program: hook.program(),
                    source: Box::new(e),
                });
            }
        }
        if tcx_available() {
            return Ok(());
        }
        match qdisc_detach_program(iface, attach_type(hook), hook.program()) {
            Ok(()) => {
                info!(iface, program = hook.program(), "detached (netlink)");
                Ok(())
            }
            // No such filter, or no such interface (its filters went with it).
            Err(TcError::IoError(e))
                if matches!(e.kind(), io::ErrorKind::NotFound)
                    || e.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::Qdisc {
                iface: iface.to_owned(),
                source: Box::new(e),
            }),
        }
    }
}

fn attach_type(hook: Hook) -> TcAttachType {
    match hook {
        Hook::FromPod | Hook::UnderlayIngress => TcAttachType::Ingress,
        Hook::ToPod | Hook::UnderlayEgress => TcAttachType::Egress,
    }
}

/// The netlink attach of kernels before 6.6: a clsact qdisc (one may exist already: "Exclusivity
/// flag on" / EEXIST is fine), then our filter slot: replaced in place when it exists (no
/// NLM_F_CREATE: the kernel answers ENOENT when it does not), created otherwise. The link aya
/// tracks is forgotten, not dropped: dropping it (or the loader) would delete the filter, which
/// must outlive the agent like a pinned TCX link does.
fn attach_netlink(
    prog: &mut SchedClassifier,
    iface: &str,
    attach_type: TcAttachType,
) -> Result<Attached, Box<dyn std::error::Error + Send + Sync>> {
    match qdisc_add_clsact(iface) {
        Ok(()) | Err(TcError::AlreadyAttached) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(Box::new(e)),
    }
    let handle = TcHandle::from(NETLINK_HANDLE);
    let ours = SchedClassifierLink::attached(iface, attach_type, NETLINK_PRIORITY, handle, None)?;
    let (id, how) = match prog.attach_to_link(ours) {
        Ok(id) => (id, Attached::NetlinkReplaced),
        Err(ProgramError::TcError(TcError::NetlinkError(e)))
            if e.raw_os_error() == Some(libc::ENOENT) =>
        {
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: NETLINK_PRIORITY,
                handle,
                classid: None,
            });
            let id = prog.attach_with_options(iface, attach_type, options)?;
            (id, Attached::Netlink)
        }
        Err(e) => return Err(Box::new(e)),
    };
    std::mem::forget(prog.take_link(id)?);
    Ok(how)
}

fn replace_pinned(
    prog: &mut SchedClassifier,
    pin: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let fd = FdLink::from(PinnedLink::from_pin(pin)?);
    let link = SchedClassifierLink::try_from(fd)?;
    let id = prog.attach_to_link(link)?;
    // The pin keeps the link; dropping our fd must not detach it.
    drop(prog.take_link(id)?);
    Ok(())
}

fn program(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, Error> {
    let name = hook.program();
    let prog = ebpf.program_mut(name).ok_or(Error::Program {
        program: name,
        source: Box::new(ProgramError::UnexpectedProgramType),
    })?;
    prog.try_into().map_err(|e| Error::Program {
        program: name,
        source: Box::new(e),
    })
}

fn take(ebpf: &mut Ebpf, map: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(map).ok_or(Error::MapMissing { map })
}

/// The ifindex of `iface` in the calling thread's network namespace (for
/// [`Maps::upsert_endpoint`]).
pub fn if_index(iface: &str) -> Result<u32, Error> {
    let err = |source| Error::Interface {
        iface: iface.to_owned(),
        source,
    };
    let c = CString::new(iface).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: c is a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(err(io::Error::last_os_error())),
        i => Ok(i),
    }
}

fn check_bpffs(dir: &Path) -> Result<(), Error> {
    let c = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|e| Error::PinDir {
        path: dir.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: zeroed statfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::PinDir {
            path: dir.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// Harmless to fail on kernels >= 5.11 (memcg accounting).
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        debug!(error = %io::Error::last_os_error(), "setrlimit(RLIMIT_MEMLOCK) failed (ignored)");
    }
}

/// Typed handles on the pinned maps.
pub struct Maps {
    ipcache: LpmTrie<MapData, [u8; 4], IpcacheValue>,
    cidrs: LpmTrie<MapData, [u8; 4], u32>,
    isolated: HashMap<MapData, IsolationKeyRaw, u8>,
    rules: LpmTrie<MapData, RuleData, u8>,
    config: Array<MapData, Config>,
    stats: PerCpuArray<MapData, u64>,
    flows: HashMap<MapData, FlowKey, FlowState>,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    epoch: Array<MapData, u32>,
    ct: HashMap<MapData, CtKey, CtValue>,
    ipcache6: LpmTrie<MapData, [u8; 16], IpcacheValue>,
    cidrs6: LpmTrie<MapData, [u8; 16], u32>,
    stats6: PerCpuArray<MapData, Stats6>,
    flows6: HashMap<MapData, FlowKey6, FlowState>,
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, Error> {
        Ok(Self {
            ipcache: LpmTrie::try_from(take(ebpf, "wm_ipcache4")?)
                .map_err(map_err("wm_ipcache4"))?,
            cidrs: LpmTrie::try_from(take(ebpf, "wm_cidrs4")?).map_err(map_err("wm_cidrs4"))?,
            isolated: HashMap::try_from(take(ebpf, "wm_isolated")?)
                .map_err(map_err("wm_isolated"))?,
            rules: LpmTrie::try_from(take(ebpf, "wm_rules")?).map_err(map_err("wm_rules"))?,
            config: Array::try_from(take(ebpf, "wm_config")?).map_err(map_err("wm_config"))?,
            stats: PerCpuArray::try_from(take(ebpf, "wm_stats")?).map_err(map_err("wm_stats"))?,
            flows: HashMap::try_from(take(ebpf, "wm_flows")?).map_err(map_err("wm_flows"))?,
            endpoints: HashMap::try_from(take(ebpf, "wm_endpoints")?)
                .map_err(map_err("wm_endpoints"))?,
            epoch: Array::try_from(take(ebpf, "wm_policy_epoch")?)
                .map_err(map_err("wm_policy_epoch"))?,
            ct: HashMap::try_from(take(ebpf, "wm_ct")?).map_err(map_err("wm_ct"))?,
            ipcache6: LpmTrie::try_from(take(ebpf, "wm_ipcache6")?)
                .map_err(map_err("wm_ipcache6"))?,
            cidrs6: LpmTrie::try_from(take(ebpf, "wm_cidrs6")?).map_err(map_err("wm_cidrs6"))?,
            stats6: PerCpuArray::try_from(take(ebpf, "wm_stats6")?)
                .map_err(map_err("wm_stats6"))?,
            flows6: HashMap::try_from(take(ebpf, "wm_flows6")?).map_err(map_err("wm_flows6"))?,
        })
    }

    /// [`Maps::flow_backlog`] of the IPv6 flows.
    pub fn flow_backlog6(&self) -> Result<Vec<(FlowKey6, FlowState)>, Error> {
        hash_entries(&self.flows6, "wm_flows6")
    }

    /// Inserts or overwrites an ipcache6 prefix (and starts a new policy epoch).
    pub fn upsert_ipcache6(&mut self, net: Ipv6Net, value: IpcacheValue) -> Result<(), Error> {
        self.ipcache6
            .insert(&lpm6_key(net), value, 0)
            .map_err(map_err("wm_ipcache6"))?;
        self.bump_policy_epoch()
    }

    /// Deletes an ipcache6 prefix (and starts a new policy epoch); a missing entry is not an
    /// error.
    pub fn remove_ipcache6(&mut self, net: Ipv6Net) -> Result<(), Error> {
        ignore_missing(self.ipcache6.remove(&lpm6_key(net)), "wm_ipcache6")?;
        self.bump_policy_epoch()
    }

    /// All ipcache6 entries.
    pub fn ipcache6_entries(&self) -> Result<Vec<(Ipv6Net, IpcacheValue)>, Error> {
        lpm_entries(&self.ipcache6, "wm_ipcache6", lpm6_net)
    }

    /// IPv6 packets per verdict since the map was created, summed over CPUs (IPv6 has no flow
    /// records yet). Index with `Verdict::X as usize`; [`crate::STATS6_SPOOFED`] counts
    /// spoofed sources.
    pub fn ipv6_verdicts(&self) -> Result<[u64; 8], Error> {
        let per_cpu = self.stats6.get(&0, 0).map_err(map_err("wm_stats6"))?;
        let mut out = [0u64; 8];
        for s in per_cpu.iter() {
            for (o, v) in out.iter_mut().zip(s.by_verdict) {
                *o += v;
            }
        }
        Ok(out)
    }

    /// Applies a policy diff for both address families (see [`apply_policy_dual`]), then
    /// starts a new policy epoch.
    pub fn apply_policy_dual(
        &mut self,
        diff: &MapDiff,
        place4: impl Fn(Ipv4Addr, Identity) -> IpcacheValue,
        place6: impl Fn(Ipv6Addr, Identity) -> IpcacheValue,
    ) -> Result<PolicyApplied, Error> {
        apply_policy_dual(self, diff, place4, place6)
    }

    /// Starts a new policy epoch: flows decided before re-run the policy lookups on their
    /// next packet. [`apply_policy`] (at its end) and every ipcache write (also through
    /// [`MapWriter`]) do this themselves; call it after writing or deleting policy entries
    /// (isolated, rules, CIDRs) any other way, e.g. through the [`MapWriter`] methods one by
    /// one or a garbage collection of the policy maps.
    pub fn bump_policy_epoch(&mut self) -> Result<(), Error> {
        let e = self.policy_epoch()?;
        self.epoch
            .set(0, e.wrapping_add(1), 0)
            .map_err(map_err("wm_policy_epoch"))
    }

    /// The current policy epoch.
    pub fn policy_epoch(&self) -> Result<u32, Error> {
        self.epoch.get(&0, 0).map_err(map_err("wm_policy_epoch"))
    }

    /// Declares the pod behind the host-side veth `ifindex` (see [`if_index`]): from_pod
    /// then drops packets from that veth whose source is not the pod's address
    /// (anti-spoofing, reported as dropped-policy). Interfaces without an entry are not
    /// checked.
    pub fn upsert_endpoint(&mut self, ifindex: u32, value: EndpointValue) -> Result<(), Error> {
        self.endpoints
            .insert(ifindex, value, 0)
            .map_err(map_err("wm_endpoints"))
    }

    /// Removes the entry of a veth; a missing entry is not an error.
    pub fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), Error> {
        ignore_missing(self.endpoints.remove(&ifindex), "wm_endpoints")
    }

    /// All endpoint entries (ifindex, addresses).
    pub fn endpoint_entries(&self) -> Result<Vec<(u32, EndpointValue)>, Error> {
        hash_entries(&self.endpoints, "wm_endpoints")
    }

    /// The conntrack entries (tuple of the allowed direction, last use and epoch).
    pub fn ct_entries(&self) -> Result<Vec<(CtKey, CtValue)>, Error> {
        hash_entries(&self.ct, "wm_ct")
    }

    /// Writes the config entry.
    pub fn set_config(&mut self, config: &Config) -> Result<(), Error> {
        self.config.set(0, config, 0).map_err(map_err("wm_config"))
    }

    /// Reads the config entry.
    pub fn config(&self) -> Result<Config, Error> {
        self.config.get(&0, 0).map_err(map_err("wm_config"))
    }

    /// Flow records lost because the ring buffer was full (all CPUs, since the map was
    /// created).
    pub fn events_lost(&self) -> Result<u64, Error> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err("wm_stats"))?;
        Ok(per_cpu.iter().sum())
    }

    /// The packets and bytes of each tracked flow not yet written as a record (a flow reports
    /// again only when it sees a packet a second or more after its last record; read this to
    /// account for flows that went idle).
    pub fn flow_backlog(&self) -> Result<Vec<(FlowKey, FlowState)>, Error> {
        hash_entries(&self.flows, "wm_flows")
    }

    /// Inserts or overwrites an ipcache prefix (and starts a new policy epoch).
    pub fn upsert_ipcache(&mut self, net: Ipv4Net, value: IpcacheValue) -> Result<(), Error> {
        self.ipcache
            .insert(&lpm4_key(net), value, 0)
            .map_err(map_err("wm_ipcache4"))?;
        self.bump_policy_epoch()
    }

    /// Deletes an ipcache prefix (and starts a new policy epoch); a missing entry is not an
    /// error.
    pub fn remove_ipcache(&mut self, net: Ipv4Net) -> Result<(), Error> {
        ignore_missing(self.ipcache.remove(&lpm4_key(net)), "wm_ipcache4")?;
        self.bump_policy_epoch()
    }

    /// All ipcache entries.
    pub fn ipcache_entries(&self) -> Result<Vec<(Ipv4Net, IpcacheValue)>, Error> {
        lpm_entries(&self.ipcache, "wm_ipcache4", lpm4_net)
    }

    /// Number of entries in the isolated and rules maps.
    pub fn policy_counts(&self) -> (usize, usize) {
        (self.isolated.keys().count(), self.rules.keys().count())
    }

    /// Applies a policy diff (see [`apply_policy`]), then starts a new policy epoch.
    pub fn apply_policy(
        &mut self,
        diff: &MapDiff,
        place: impl Fn(Ipv4Addr, Identity) -> IpcacheValue,
    ) -> Result<PolicyApplied, Error> {
        apply_policy(self, diff, place)
    }
}

impl MapWriter for Maps {
    fn set_config(&mut self, config: &Config) -> Result<(), Error> {
        Maps::set_config(self, config)
    }
    // ipcache writes start a new epoch each (they are rare, and callers write them one by one
    // outside apply_policy too); policy entries wait for policy_written.
    fn put_ipcache(&mut self, net: Ipv4Net, value: IpcacheValue) -> Result<(), Error> {
        self.upsert_ipcache(net, value)
    }
    fn del_ipcache(&mut self, net: Ipv4Net) -> Result<(), Error> {
        self.remove_ipcache(net)
    }
    fn put_ipcache6(&mut self, net: Ipv6Net, value: IpcacheValue) -> Result<(), Error> {
        self.upsert_ipcache6(net, value)
    }
    fn del_ipcache6(&mut self, net: Ipv6Net) -> Result<(), Error> {
        self.remove_ipcache6(net)
    }
    fn put_cidr6(&mut self, net: Ipv6Net, identity: u32) -> Result<(), Error> {
        self.cidrs6
            .insert(&lpm6_key(net), identity, 0)
            .map_err(map_err("wm_cidrs6"))
    }
    fn del_cidr6(&mut self, net: Ipv6Net) -> Result<(), Error> {
        ignore_missing(self.cidrs6.remove(&lpm6_key(net)), "wm_cidrs6")
    }
    fn policy_written(&mut self) -> Result<(), Error> {
        self.bump_policy_epoch()
    }
    fn put_cidr(&mut self, net: Ipv4Net, identity: u32) -> Result<(), Error> {
        self.cidrs
            .insert(&lpm4_key(net), identity, 0)
            .map_err(map_err("wm_cidrs4"))
    }
    fn del_cidr(&mut self, net: Ipv4Net) -> Result<(), Error> {
        ignore_missing(self.cidrs.remove(&lpm4_key(net)), "wm_cidrs4")
    }
    fn put_isolated(&mut self, key: &IsolationKey) -> Result<(), Error> {
        self.isolated
            .insert(IsolationKeyRaw::from(key), 1, 0)
            .map_err(map_err("wm_isolated"))
    }
    fn del_isolated(&mut self, key: &IsolationKey) -> Result<(), Error> {
        ignore_missing(
            self.isolated.remove(&IsolationKeyRaw::from(key)),
            "wm_isolated",
        )
    }
    fn put_rule(&mut self, key: &RuleKey) -> Result<(), Error> {
        self.rules
            .insert(&rule_key(key), 1, 0)
            .map_err(map_err("wm_rules"))
    }
    fn del_rule(&mut self, key: &RuleKey) -> Result<(), Error> {
        ignore_missing(self.rules.remove(&rule_key(key)), "wm_rules")
    }
}

/// Every entry of a hash map.
fn hash_entries<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, Error> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(name))
}

/// Every entry of an LPM trie whose key `net` reads as a prefix; other keys are passed over.
fn lpm_entries<K: Pod, V: Pod, N>(
    trie: &LpmTrie<MapData, K, V>,
    name: &'static str,
    net: impl Fn(&Key<K>) -> Option<N>,
) -> Result<Vec<(N, V)>, Error> {
    let mut out = Vec::new();
    for item in trie.iter() {
        let (key, value) = item.map_err(map_err(name))?;
        if let Some(net) = net(&key) {
            out.push((net, value));
        }
    }
    Ok(out)
}

fn ignore_missing(r: Result<(), MapError>, map: &'static str) -> Result<(), Error> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(map_err(map)(e)),
    }
}

/// Second handles on the pinned `wm_flows` and `wm_flows6` maps, so another thread (the agent's
/// API server) can read the backlog of both families at request time while the loader keeps its
/// own.
pub struct FlowBacklog {
    flows: HashMap<MapData, FlowKey, FlowState>,
    flows6: HashMap<MapData, FlowKey6, FlowState>,
}

impl FlowBacklog {
    /// [`Maps::flow_backlog`] (IPv4), read now.
    pub fn read(&self) -> Result<Vec<(FlowKey, FlowState)>, Error> {
        hash_entries(&self.flows, "wm_flows")
    }

    /// [`Maps::flow_backlog6`] (IPv6), read now.
    pub fn read6(&self) -> Result<Vec<(FlowKey6, FlowState)>, Error> {
        hash_entries(&self.flows6, "wm_flows6")
    }
}

impl Loader {
    /// Opens [`FlowBacklog`] on this loader's pinned `wm_flows` and `wm_flows6`.
    pub fn flow_backlog_handle(&self) -> Result<FlowBacklog, Error> {
        fn open<K: Pod>(
            loader: &Loader,
            name: &'static str,
        ) -> Result<HashMap<MapData, K, FlowState>, Error> {
            let data = MapData::from_pin(loader.map_dir().join(name)).map_err(map_err(name))?;
            HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(map_err(name))
        }
        Ok(FlowBacklog {
            flows: open(self, "wm_flows")?,
            flows6: open(self, "wm_flows6")?,
        })
    }
}

/// Waits until `fd` is readable or `timeout` passes (an interrupted wait counts as a timeout).
fn poll_readable(fd: std::os::fd::RawFd, timeout: Duration) -> Result<bool, Error> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(Error::Ring(e));
        }
        return Ok(false);
    }
    Ok(r > 0)
}

/// A second descriptor of the flow ring buffer ([`FlowReader::waiter`]): waits for records.
pub struct RingWaiter {
    fd: std::os::fd::OwnedFd,
}

impl RingWaiter {
    /// Whether records arrived within `timeout` (they may already be drained by whoever holds
    /// the reader).
    pub fn wait(&self, timeout: Duration) -> Result<bool, Error> {
        poll_readable(self.fd.as_raw_fd(), timeout)
    }
}

/// Reads flow records from the ring buffer.
pub struct FlowReader {
    ring: RingBuf<MapData>,
}

impl FlowReader {
    /// Returns the IPv4 records available now, or waits up to `timeout` for the first one (an
    /// empty vector when none arrived). IPv6 records are consumed and dropped (use
    /// [`FlowReader::read_any`] to get both); records of an unknown size are skipped.
    pub fn read(&mut self, timeout: Duration) -> Result<Vec<FlowEvent>, Error> {
        Ok(self
            .read_any(timeout)?
            .into_iter()
            .filter_map(|f| match f {
                Flow::V4(e) => Some(e),
                Flow::V6(_) => None,
            })
            .collect())
    }

    /// Returns the records of both families available now, or waits up to `timeout` for the
    /// first one (an empty vector when none arrived). Records of an unknown size are skipped.
    pub fn read_any(&mut self, timeout: Duration) -> Result<Vec<Flow>, Error> {
        let mut out = self.drain();
        if !out.is_empty() {
            return Ok(out);
        }
        poll_readable(self.ring.as_raw_fd(), timeout)?;
        out = self.drain();
        Ok(out)
    }

    /// The IPv4 records in the ring now, without waiting (IPv6 records are consumed and
    /// dropped, as by [`FlowReader::read`]).
    pub fn read_ready(&mut self) -> Vec<FlowEvent> {
        self.drain()
            .into_iter()
            .filter_map(|f| match f {
                Flow::V4(e) => Some(e),
                Flow::V6(_) => None,
            })
            .collect()
    }

    /// The records of both families in the ring now, without waiting.
    pub fn read_ready_any(&mut self) -> Vec<Flow> {
        self.drain()
    }

    /// A handle that waits for records without borrowing the reader, so one thread can wait
    /// while another holds the reader (and drains it at request time).
    pub fn waiter(&self) -> Result<RingWaiter, Error> {
        let fd = self
            .ring
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::Ring)?;
        Ok(RingWaiter { fd })
    }

    fn drain(&mut self) -> Vec<Flow> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            match Flow::from_bytes(&item) {
                Some(f) => out.push(f),
                None => warn!(len = item.len(), "flow record of unexpected size"),
            }
        }
        out
    }
}
