//! Unit tests of [`select`] with fake links and devices.

use std::sync::{
    Mutex,
    atomic::{AtomicU32, Ordering},
};

use super::*;
use crate::datapath::fake::FakeDatapath;

struct FakeLinks {
    existing: Mutex<Option<LinkKind>>,
    module: bool,
    calls: Mutex<Vec<String>>,
}

impl FakeLinks {
    fn new(existing: Option<LinkKind>, module: bool) -> Self {
        Self {
            existing: Mutex::new(existing),
            module,
            calls: Mutex::default(),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Links for FakeLinks {
    async fn kind(&self, _ifname: &str) -> Result<Option<LinkKind>, String> {
        Ok(self.existing.lock().unwrap().clone())
    }

    async fn create_wireguard(&self, ifname: &str) -> Result<(), CreateError> {
        self.calls.lock().unwrap().push(format!("create {ifname}"));
        if !self.module {
            return Err(CreateError::ModuleMissing(
                "Operation not supported".to_string(),
            ));
        }
        *self.existing.lock().unwrap() = Some(LinkKind::Wireguard);
        Ok(())
    }

    async fn delete(&self, ifname: &str) -> Result<(), String> {
        self.calls.lock().unwrap().push(format!("delete {ifname}"));
        *self.existing.lock().unwrap() = None;
        Ok(())
    }
}

/// The userspace socket answers after `fail_first` attempts.
struct FakeDevices {
    fail_first: u32,
    attempts: AtomicU32,
}

impl FakeDevices {
    fn new(fail_first: u32) -> Self {
        Self {
            fail_first,
            attempts: AtomicU32::new(0),
        }
    }
}

impl Devices for FakeDevices {
    fn kernel(&self, ifname: &str) -> Result<Arc<dyn Datapath>, String> {
        Ok(Arc::new(FakeDatapath::new(ifname)))
    }

    fn userspace(&self, ifname: &str, _socket: &Path) -> Result<Arc<dyn Datapath>, String> {
        if self.attempts.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return Err("connection refused".to_string());
        }
        Ok(Arc::new(FakeDatapath::new(ifname)))
    }
}

const WAIT: Duration = Duration::from_secs(2);

async fn run(
    links: &FakeLinks,
    devices: &FakeDevices,
    choice: DatapathChoice,
) -> Result<Selection, SelectError> {
    select(
        links,
        devices,
        choice,
        "wm0",
        Path::new("/x/wm0.sock"),
        WAIT,
    )
    .await
    .map(|(_, s)| s)
}

#[tokio::test]
async fn auto_falls_back_to_userspace_without_the_module_and_says_why() {
    let links = FakeLinks::new(None, false);
    let devices = FakeDevices::new(3);
    let s = run(&links, &devices, DatapathChoice::Auto).await.unwrap();
    assert_eq!(s.kind, DatapathKind::Userspace);
    assert_eq!(s.reason, "no-kernel-module");
    assert!(
        s.message.contains("no wireguard kernel module"),
        "{}",
        s.message
    );
    assert_eq!(links.calls(), ["create wm0"]);
    // It waited for the socket through three refusals.
    assert_eq!(devices.attempts.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn auto_prefers_the_kernel_and_adopts_what_exists() {
    let links = FakeLinks::new(None, true);
    let s = run(&links, &FakeDevices::new(0), DatapathChoice::Auto)
        .await
        .unwrap();
    assert_eq!((s.kind, s.reason), (DatapathKind::Kernel, "kernel-module"));

    // A restarted agent finds the link it created: adopted, not created again.
    let links = FakeLinks::new(Some(LinkKind::Wireguard), true);
    let s = run(&links, &FakeDevices::new(0), DatapathChoice::Auto)
        .await
        .unwrap();
    assert_eq!(
        (s.kind, s.reason),
        (DatapathKind::Kernel, "adopted-kernel-link")
    );
    assert!(links.calls().is_empty());

    // The device process's TUN holds the name: userspace, even with the module.
    let links = FakeLinks::new(Some(LinkKind::Other("tun".into())), true);
    let s = run(&links, &FakeDevices::new(0), DatapathChoice::Auto)
        .await
        .unwrap();
    assert_eq!(
        (s.kind, s.reason),
        (DatapathKind::Userspace, "adopted-userspace-device")
    );
}

#[tokio::test]
async fn kernel_never_falls_back_and_userspace_waits_bounded() {
    let err = run(
        &FakeLinks::new(None, false),
        &FakeDevices::new(0),
        DatapathChoice::Kernel,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("kernel module is not available"),
        "{err}"
    );
    let err = run(
        &FakeLinks::new(Some(LinkKind::Other("tun".into())), true),
        &FakeDevices::new(0),
        DatapathChoice::Kernel,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SelectError::NotWireguard { .. }), "{err}");

    let err = run(
        &FakeLinks::new(None, false),
        &FakeDevices::new(u32::MAX),
        DatapathChoice::Userspace,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("did not answer within 2s"),
        "{err}"
    );

    // Switching a node from kernel to userspace frees the name for the device process.
    let links = FakeLinks::new(Some(LinkKind::Wireguard), true);
    let s = run(&links, &FakeDevices::new(0), DatapathChoice::Userspace)
        .await
        .unwrap();
    assert_eq!(s.kind, DatapathKind::Userspace);
    assert_eq!(links.calls(), ["delete wm0"]);
}

#[test]
fn the_flag_wins_over_the_spec() {
    use wiremesh_crds::DatapathMode;
    assert_eq!(effective_choice(None, None), DatapathChoice::Auto);
    assert_eq!(
        effective_choice(None, Some(DatapathMode::Kernel)),
        DatapathChoice::Kernel
    );
    assert_eq!(
        effective_choice(Some(DatapathChoice::Userspace), Some(DatapathMode::Kernel)),
        DatapathChoice::Userspace
    );
}

#[test]
fn an_empty_slot_says_so() {
    let slot = DatapathSlot::new("wm0");
    let err = slot.status().unwrap_err();
    assert!(err.to_string().contains("no device selected yet"), "{err}");
    let device: Arc<dyn Datapath> = Arc::new(FakeDatapath::new("wm0"));
    slot.set(
        device,
        Selection {
            choice: DatapathChoice::Auto,
            kind: DatapathKind::Kernel,
            reason: "kernel-module",
            message: String::new(),
        },
    );
    assert!(slot.status().is_ok());
    assert_eq!(slot.kind(), DatapathKind::Kernel);
}
