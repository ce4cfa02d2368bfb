//! Which WireGuard device the agent drives, and the slot through which every other part of the
//! agent reaches it. The agent never creates the userspace device: it runs as its own process
//! (`mesh-agent device`, the `device` container), and the agent connects to its UAPI socket; a
//! kernel device is a `wireguard` link the agent creates (or adopts) over rtnetlink and configures
//! over generic netlink. Neither is torn down when the agent exits.
//!
//! [`select`] decides, for a [`DatapathChoice`] (the `--datapath` flag, else
//! `MeshEncryption.spec.datapath`, else `auto`):
//! - `kernel`: adopt the `wireguard` link named `--interface`, or create it; no fallback (a node
//!   without the module reports an error);
//! - `userspace`: wait (bounded) for the device process's UAPI socket; a kernel link of that
//!   name, left by an earlier `kernel` selection of this agent, is deleted first so the device
//!   process can create its TUN;
//! - `auto`: adopt what exists (a `wireguard` link: kernel; any other link of that name, the
//!   device process's TUN: userspace), else create a kernel link, and fall back to the userspace
//!   device when the module is missing.
//!
//! The outcome comes with a reason (a short code for the `wiremesh_datapath_info` metric, and a
//! sentence for the status and the Event). [`DatapathSlot`] is a [`Datapath`] whose device can be
//! swapped at run time when the choice changes.

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    time::Duration,
};

use wiremesh_keyexchange::PublicKey;
use wiremesh_wgctrl::{KernelDevice, UapiDevice, link};

use crate::{
    config::DatapathChoice,
    datapath::{Datapath, DatapathError, DatapathKind, DeviceSettings, DeviceStatus, PeerConfig},
};

/// What the agent drives and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// The choice this selection answers.
    pub choice: DatapathChoice,
    pub kind: DatapathKind,
    /// Short code for the metric label: `requested`, `kernel-module`, `no-kernel-module`,
    /// `adopted-kernel-link`, `adopted-userspace-device`.
    pub reason: &'static str,
    /// The same for people (status, Event).
    pub message: String,
}

/// Why no device could be selected.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("kernel WireGuard for {ifname}: {message}")]
    Kernel { ifname: String, message: String },
    #[error(
        "interface {ifname} exists and is a {kind} link, not a kernel wireguard link \
         (the userspace device holds the name?)"
    )]
    NotWireguard { ifname: String, kind: String },
    #[error(
        "no userspace WireGuard device for {ifname}: its UAPI socket {socket} did not answer \
         within {waited:?} ({last}); is the device process (`mesh-agent device {ifname}`) running?"
    )]
    NoUserspaceDevice {
        ifname: String,
        socket: PathBuf,
        waited: Duration,
        last: String,
    },
    #[error("rtnetlink: {0}")]
    Netlink(String),
}

/// What kind of link holds a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Wireguard,
    /// Anything else (a TUN, or a kind the kernel did not name), with its kind for messages.
    Other(String),
}

/// Why a kernel `wireguard` link could not be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateError {
    /// The kernel has no WireGuard module ("Unknown device type").
    ModuleMissing(String),
    Other(String),
}

/// Link probing and creation (rtnetlink; a fake in unit tests).
pub trait Links: Send + Sync {
    /// The kind of the link named `ifname`, `None` when there is none.
    fn kind(&self, ifname: &str) -> impl Future<Output = Result<Option<LinkKind>, String>> + Send;
    /// Creates a `wireguard` link named `ifname`.
    fn create_wireguard(
        &self,
        ifname: &str,
    ) -> impl Future<Output = Result<(), CreateError>> + Send;
    /// Deletes the link named `ifname` (absent: not an error).
    fn delete(&self, ifname: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// Opening a device once its link exists (real clients; fakes in unit tests).
pub trait Devices: Send + Sync {
    /// The kernel WireGuard device on link `ifname`, over generic netlink.
    fn kernel(&self, ifname: &str) -> Result<Arc<dyn Datapath>, String>;
    /// The userspace device serving `socket`; fails while the socket does not answer.
    fn userspace(&self, ifname: &str, socket: &Path) -> Result<Arc<dyn Datapath>, String>;
}

/// How long to wait between two attempts to reach the userspace device.
const USERSPACE_RETRY: Duration = Duration::from_millis(200);

/// Selects the device for `choice`; see the module docs. Waits at most `wait` for a userspace
/// device's socket.
pub async fn select(
    links: &impl Links,
    devices: &impl Devices,
    choice: DatapathChoice,
    ifname: &str,
    socket: &Path,
    wait: Duration,
) -> Result<(Arc<dyn Datapath>, Selection), SelectError> {
    let existing = links.kind(ifname).await.map_err(SelectError::Netlink)?;
    let kernel_error = |message: String| SelectError::Kernel {
        ifname: ifname.to_string(),
        message,
    };
    let selection = |kind, reason, message: String| Selection {
        choice,
        kind,
        reason,
        message,
    };
    match choice {
        DatapathChoice::Kernel => {
            let reason = match existing {
                Some(LinkKind::Wireguard) => "adopted-kernel-link",
                Some(LinkKind::Other(kind)) => {
                    return Err(SelectError::NotWireguard {
                        ifname: ifname.to_string(),
                        kind,
                    });
                }
                None => {
                    links.create_wireguard(ifname).await.map_err(|e| match e {
                        CreateError::ModuleMissing(m) => kernel_error(format!(
                            "the wireguard kernel module is not available ({m})"
                        )),
                        CreateError::Other(m) => kernel_error(m),
                    })?;
                    "requested"
                }
            };
            let device = devices.kernel(ifname).map_err(kernel_error)?;
            Ok((
                device,
                selection(
                    DatapathKind::Kernel,
                    reason,
                    format!("datapath kernel requested: kernel WireGuard link {ifname}"),
                ),
            ))
        }
        DatapathChoice::Userspace => {
            if existing == Some(LinkKind::Wireguard) {
                // Ours, from an earlier `kernel` selection: give the name to the device process.
                links.delete(ifname).await.map_err(SelectError::Netlink)?;
                tracing::info!(
                    interface = ifname,
                    "deleted the kernel wireguard link: the userspace device takes over the name"
                );
            }
            let device = wait_userspace(devices, ifname, socket, wait).await?;
            Ok((
                device,
                selection(
                    DatapathKind::Userspace,
                    "requested",
                    format!(
                        "datapath userspace requested: the device process at {}",
                        socket.display()
                    ),
                ),
            ))
        }
        DatapathChoice::Auto => match existing {
            Some(LinkKind::Wireguard) => {
                let device = devices.kernel(ifname).map_err(kernel_error)?;
                Ok((
                    device,
                    selection(
                        DatapathKind::Kernel,
                        "adopted-kernel-link",
                        format!("auto: adopted the existing kernel WireGuard link {ifname}"),
                    ),
                ))
            }
            Some(LinkKind::Other(kind)) => {
                let device = wait_userspace(devices, ifname, socket, wait).await?;
                Ok((
                    device,
                    selection(
                        DatapathKind::Userspace,
                        "adopted-userspace-device",
                        format!(
                            "auto: {ifname} is a {kind} link served by the userspace device \
                             process at {}",
                            socket.display()
                        ),
                    ),
                ))
            }
            None => match links.create_wireguard(ifname).await {
                Ok(()) => {
                    let device = devices.kernel(ifname).map_err(kernel_error)?;
                    Ok((
                        device,
                        selection(
                            DatapathKind::Kernel,
                            "kernel-module",
                            format!(
                                "auto: the wireguard kernel module is available; created {ifname}"
                            ),
                        ),
                    ))
                }
                Err(CreateError::ModuleMissing(why)) => {
                    let device = wait_userspace(devices, ifname, socket, wait).await?;
                    Ok((
                        device,
                        selection(
                            DatapathKind::Userspace,
                            "no-kernel-module",
                            format!(
                                "auto: no wireguard kernel module ({why}); using the userspace \
                                 device process at {}",
                                socket.display()
                            ),
                        ),
                    ))
                }
                Err(CreateError::Other(message)) => Err(kernel_error(message)),
            },
        },
    }
}

async fn wait_userspace(
    devices: &impl Devices,
    ifname: &str,
    socket: &Path,
    wait: Duration,
) -> Result<Arc<dyn Datapath>, SelectError> {
    let started = tokio::time::Instant::now();
    let mut logged = false;
    loop {
        match devices.userspace(ifname, socket) {
            Ok(device) => return Ok(device),
            Err(last) => {
                if started.elapsed() >= wait {
                    return Err(SelectError::NoUserspaceDevice {
                        ifname: ifname.to_string(),
                        socket: socket.to_path_buf(),
                        waited: wait,
                        last,
                    });
                }
                if !logged {
                    tracing::info!(
                        interface = ifname,
                        socket = %socket.display(),
                        error = %last,
                        "waiting for the userspace device process"
                    );
                    logged = true;
                }
            }
        }
        tokio::time::sleep(USERSPACE_RETRY).await;
    }
}

/// What [`Selector::select`] returns.
pub type SelectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(Arc<dyn Datapath>, Selection), SelectError>> + Send + 'a>>;

/// Selects a device for a choice (the reconciler holds one as a trait object).
pub trait Selector: Send + Sync {
    fn select(&self, choice: DatapathChoice) -> SelectFuture<'_>;
}

/// The agent's [`Selector`]: `links` to probe and create links, `devices` to open them.
pub struct SystemSelector<L, D> {
    pub links: L,
    pub devices: D,
    pub ifname: String,
    pub socket: PathBuf,
    pub wait: Duration,
}

impl<L: Links, D: Devices> Selector for SystemSelector<L, D> {
    fn select(&self, choice: DatapathChoice) -> SelectFuture<'_> {
        Box::pin(select(
            &self.links,
            &self.devices,
            choice,
            &self.ifname,
            &self.socket,
            self.wait,
        ))
    }
}

/// [`Links`] over the device-control layer's rtnetlink calls, in the agent's network namespace.
pub struct SystemLinks;

impl Links for SystemLinks {
    async fn kind(&self, ifname: &str) -> Result<Option<LinkKind>, String> {
        match link::find_link(ifname) {
            Ok(None) => Ok(None),
            Ok(Some(found)) if found.is_wireguard() => Ok(Some(LinkKind::Wireguard)),
            Ok(Some(found)) => Ok(Some(LinkKind::Other(
                found.kind.unwrap_or_else(|| "unknown".to_string()),
            ))),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn create_wireguard(&self, ifname: &str) -> Result<(), CreateError> {
        match link::create_wireguard_link(ifname) {
            Ok(_) => Ok(()),
            Err(e @ link::LinkError::Unsupported { .. }) => {
                Err(CreateError::ModuleMissing(e.to_string()))
            }
            Err(e) => Err(CreateError::Other(e.to_string())),
        }
    }

    async fn delete(&self, ifname: &str) -> Result<(), String> {
        match link::find_link(ifname).map_err(|e| e.to_string())? {
            Some(found) => link::delete_link(found.ifindex).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

/// [`Devices`]: [`KernelDevice`] over generic netlink, [`UapiDevice`] over the UAPI socket (it
/// connects per operation, so a restarted device process is reached without reconnecting).
pub struct SystemDevices;

impl Devices for SystemDevices {
    fn kernel(&self, ifname: &str) -> Result<Arc<dyn Datapath>, String> {
        KernelDevice::open(ifname)
            .map(|d| Arc::new(d) as Arc<dyn Datapath>)
            .map_err(|e| e.to_string())
    }

    fn userspace(&self, ifname: &str, socket: &Path) -> Result<Arc<dyn Datapath>, String> {
        let device = UapiDevice::with_socket(ifname, socket);
        // Answers `get`: the device process is up.
        device.status().map_err(|e| e.to_string())?;
        Ok(Arc::new(device))
    }
}

/// A [`Datapath`] whose device is set (and replaced) at run time; before the first selection
/// every call fails with "no device selected yet".
pub struct DatapathSlot {
    ifname: String,
    inner: RwLock<Option<(Arc<dyn Datapath>, Selection)>>,
}

impl DatapathSlot {
    pub fn new(ifname: &str) -> Self {
        Self {
            ifname: ifname.to_string(),
            inner: RwLock::new(None),
        }
    }

    /// Drives `device` from now on.
    pub fn set(&self, device: Arc<dyn Datapath>, selection: Selection) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = Some((device, selection));
    }

    /// Forgets the device (it is gone; the next pass selects again).
    pub fn clear(&self) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The current selection.
    pub fn selection(&self) -> Option<Selection> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(_, s)| s.clone())
    }

    fn device(&self) -> Result<Arc<dyn Datapath>, DatapathError> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(d, _)| d.clone())
            .ok_or_else(|| DatapathError::Invalid {
                ifname: self.ifname.clone(),
                message: "no device selected yet".to_string(),
            })
    }
}

impl Datapath for DatapathSlot {
    fn kind(&self) -> DatapathKind {
        self.selection().map_or(DatapathKind::Userspace, |s| s.kind)
    }

    fn ifname(&self) -> &str {
        &self.ifname
    }

    fn configure(&self, settings: &DeviceSettings) -> Result<(), DatapathError> {
        self.device()?.configure(settings)
    }

    fn set_peer(&self, peer: &PeerConfig) -> Result<(), DatapathError> {
        self.device()?.set_peer(peer)
    }

    fn remove_peer(&self, public_key: &PublicKey) -> Result<(), DatapathError> {
        self.device()?.remove_peer(public_key)
    }

    fn status(&self) -> Result<DeviceStatus, DatapathError> {
        self.device()?.status()
    }

    fn probe(&self) -> Result<u32, DatapathError> {
        self.device()?.probe()
    }
}

/// The choice in force: the flag, else `MeshEncryption.spec.datapath`, else auto.
pub fn effective_choice(
    flag: Option<DatapathChoice>,
    spec: Option<wiremesh_crds::DatapathMode>,
) -> DatapathChoice {
    use wiremesh_crds::DatapathMode;
    flag.unwrap_or(match spec {
        Some(DatapathMode::Kernel) => DatapathChoice::Kernel,
        Some(DatapathMode::Userspace) => DatapathChoice::Userspace,
        Some(DatapathMode::Auto) | None => DatapathChoice::Auto,
    })
}

#[cfg(test)]
mod tests;

/// The two tunnel slots of a node and which one carries its current world (docs/rotation.md:
/// a rotation brings up the next world on the other slot, and at its end that slot becomes the
/// current one). As a [`Datapath`] it is the current world's device, for everything that
/// reports on "the" tunnel (status, health).
pub struct Worlds {
    slots: [Arc<DatapathSlot>; 2],
    current_b: std::sync::atomic::AtomicBool,
}

impl Worlds {
    /// Slots a and b; slot a is current until [`Worlds::set_current`].
    pub fn new(a: Arc<DatapathSlot>, b: Arc<DatapathSlot>) -> Self {
        Self {
            slots: [a, b],
            current_b: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The slot at `index` (0 = a, 1 = b).
    pub fn slot(&self, index: usize) -> &Arc<DatapathSlot> {
        &self.slots[index.min(1)]
    }

    /// The index of the current world's slot.
    pub fn current_index(&self) -> usize {
        usize::from(self.current_b.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The current world's slot.
    pub fn current(&self) -> &Arc<DatapathSlot> {
        self.slot(self.current_index())
    }

    /// Makes the slot at `index` the current world.
    pub fn set_current(&self, index: usize) {
        self.current_b
            .store(index == 1, std::sync::atomic::Ordering::Release);
    }
}

impl Datapath for Worlds {
    fn kind(&self) -> DatapathKind {
        self.current().kind()
    }

    fn ifname(&self) -> &str {
        self.current().ifname()
    }

    fn configure(&self, settings: &DeviceSettings) -> Result<(), DatapathError> {
        self.current().configure(settings)
    }

    fn set_peer(&self, peer: &PeerConfig) -> Result<(), DatapathError> {
        self.current().set_peer(peer)
    }

    fn remove_peer(&self, public_key: &PublicKey) -> Result<(), DatapathError> {
        self.current().remove_peer(public_key)
    }

    fn status(&self) -> Result<DeviceStatus, DatapathError> {
        self.current().status()
    }

    fn probe(&self) -> Result<u32, DatapathError> {
        self.current().probe()
    }
}
