//! The testenv process (a real kube-apiserver on embedded etcd, see `integration-tests/testenv`):
//! starting it, waiting for its `READY` line, its credentials, kubeconfigs for nodes, and kube clients.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::process::{ManagedProcess, ProcessError, ProcessIdentity};

/// Why testenv could not be started, used or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TestenvError {
    /// The binary is not there: `make testenv` (part of `make deps`) builds it.
    #[error(
        "testenv binary {0} not found: run `make testenv` (or `make deps`) in the repository root first"
    )]
    BinaryMissing(PathBuf),
    /// A file could not be created or read.
    #[error("{what} {path}: {source}")]
    Io {
        /// What the file is.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Spawning or stopping the process failed.
    #[error("testenv process: {0}")]
    Process(#[from] ProcessError),
    /// testenv exited before it printed READY.
    #[error("testenv exited before it was ready ({status}); see {log}")]
    ExitedEarly {
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
    /// No READY line within the deadline.
    #[error("testenv was not ready within {timeout:?}; see {log}")]
    NotReady {
        /// The deadline.
        timeout: Duration,
        /// Its log file.
        log: PathBuf,
    },
    /// testenv printed something other than the READY line on stdout.
    #[error("unexpected line on testenv's stdout: {0:?}")]
    Protocol(String),
    /// The credentials JSON did not parse.
    #[error("credentials file {path}: {source}")]
    Credentials {
        /// Its path.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// No token was provisioned for this node when testenv started.
    #[error("testenv has no credentials for node {0:?}: list it in TestenvOptions::nodes")]
    UnknownNode(String),
    /// A kubeconfig could not be serialized.
    #[error("kubeconfig: {0}")]
    Yaml(#[from] serde_yaml::Error),
    /// A kubeconfig could not be loaded into a client.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// Its path.
        path: PathBuf,
        /// What kube-rs said.
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A kube client could not be built.
    #[error("kube client: {0}")]
    Client(#[from] kube::Error),
    /// testenv exited with a failure status when asked to stop.
    #[error("testenv exited with {status} when stopped; see {log}")]
    BadExit {
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
    },
}

/// The default testenv binary: `integration-tests/testenv/bin/testenv` in this checkout, or
/// `$WIREMESH_TESTENV_BIN`.
pub fn default_binary() -> PathBuf {
    std::env::var_os("WIREMESH_TESTENV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("testenv/bin/testenv"))
}

/// How to run testenv.
#[derive(Clone, Debug)]
pub struct TestenvOptions {
    /// The testenv executable.
    pub binary: PathBuf,
    /// The address to serve on; nodes reach the apiserver here (the underlay bridge IP). 127.0.0.1 is
    /// served as well when possible.
    pub listen_address: Ipv4Addr,
    /// TCP port; 0 lets testenv pick a free one.
    pub port: u16,
    /// Where testenv keeps etcd data, certificates, tokens, the kubeconfig and the credentials; it is
    /// not removed by testenv (the caller owns it).
    pub data_dir: PathBuf,
    /// stdout/stderr of testenv go here.
    pub log_path: PathBuf,
    /// Node names that get a `system:node:<name>` token. Tokens are fixed at start: a node added
    /// later must be listed here from the beginning.
    pub nodes: Vec<String>,
    /// Deadline for the READY line.
    pub ready_timeout: Duration,
    /// Keep running after this process exits (`meshctl demo up`): stdin is not watched, and dropping
    /// the handle without [`Testenv::stop`] or [`Testenv::detach`] still stops it.
    pub outlive_parent: bool,
    /// Extra kube-apiserver flags, e.g. `--v=2`.
    pub apiserver_args: Vec<String>,
}

impl TestenvOptions {
    /// Options with the default binary, an automatic port and a 3-minute readiness deadline.
    pub fn new(listen_address: Ipv4Addr, data_dir: impl Into<PathBuf>, nodes: Vec<String>) -> Self {
        let data_dir = data_dir.into();
        Self {
            binary: default_binary(),
            listen_address,
            port: 0,
            log_path: data_dir.join("testenv.log"),
            data_dir,
            nodes,
            ready_timeout: Duration::from_secs(180),
            outlive_parent: false,
            apiserver_args: Vec::new(),
        }
    }
}

/// A static-token user of testenv. `Debug` does not show the token.
#[derive(Clone, Serialize, Deserialize)]
pub struct UserCredential {
    /// The user name, e.g. `system:node:node-1`.
    pub user: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// The bearer token (a secret).
    pub token: String,
}

impl std::fmt::Debug for UserCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCredential")
            .field("user", &self.user)
            .field("groups", &self.groups)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// testenv's credentials file (`--credentials-out`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestenvCredentials {
    /// `https://IP:port` of the apiserver.
    pub server: String,
    /// The CA certificate (PEM) that signed the serving certificate.
    #[serde(rename = "caPEM")]
    pub ca_pem: String,
    /// The same CA as a file.
    pub ca_file: PathBuf,
    /// The admin user (group system:masters).
    pub admin: UserCredential,
    /// Node users by node name.
    pub nodes: std::collections::BTreeMap<String, UserCredential>,
}

impl TestenvCredentials {
    /// Reads a credentials file.
    pub fn read(path: &Path) -> Result<Self, TestenvError> {
        let text = std::fs::read_to_string(path).map_err(|source| TestenvError::Io {
            what: "reading credentials",
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| TestenvError::Credentials {
            path: path.to_owned(),
            source,
        })
    }

    /// A kubeconfig (YAML) for `user`, with the CA embedded and token authentication.
    pub fn kubeconfig_yaml(
        &self,
        context: &str,
        user: &UserCredential,
    ) -> Result<String, TestenvError> {
        use base64::{Engine as _, engine::general_purpose::STANDARD};
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testenv", "cluster": {
                "server": self.server,
                "certificate-authority-data": STANDARD.encode(self.ca_pem.as_bytes()),
            }}],
            "users": [{"name": user.user, "user": {"token": user.token}}],
            "contexts": [{"name": context, "context": {"cluster": "testenv", "user": user.user}}],
            "current-context": context,
        });
        Ok(serde_yaml::to_string(&doc)?)
    }

    /// Writes a kubeconfig for node `node` (user `system:node:<node>`) to `path` atomically, mode 0600.
    pub fn write_node_kubeconfig(&self, node: &str, path: &Path) -> Result<(), TestenvError> {
        let user = self
            .nodes
            .get(node)
            .ok_or_else(|| TestenvError::UnknownNode(node.to_owned()))?;
        self.write_kubeconfig(node, user, path)
    }

    /// Writes a kubeconfig for `user` (e.g. a ServiceAccount with a token from the TokenRequest
    /// API) to `path` atomically, mode 0600.
    pub fn write_kubeconfig(
        &self,
        context: &str,
        user: &UserCredential,
        path: &Path,
    ) -> Result<(), TestenvError> {
        let yaml = self.kubeconfig_yaml(context, user)?;
        crate::fsutil::write_private_atomic(path, yaml.as_bytes()).map_err(|source| {
            TestenvError::Io {
                what: "writing kubeconfig",
                path: path.to_owned(),
                source,
            }
        })
    }
}

/// Builds a kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client, TestenvError> {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).map_err(|source| TestenvError::Kubeconfig {
            path: path.to_owned(),
            source,
        })?;
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .map_err(|source| TestenvError::Kubeconfig {
        path: path.to_owned(),
        source,
    })?;
    Ok(kube::Client::try_from(config)?)
}

/// How long testenv gets to shut the apiserver and etcd down before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(60);

enum StdoutEvent {
    Line(String),
    Eof,
}

/// A running testenv. Dropping it stops it (SIGTERM, then SIGKILL after a grace period).
#[derive(Debug)]
pub struct Testenv {
    // Held open: testenv shuts down when it reads end of file, also when this process dies. Declared
    // before `process` so that on drop the pipe closes first and testenv is already shutting down.
    stdin: Option<ChildStdin>,
    process: ManagedProcess,
    kubeconfig: PathBuf,
    credentials_path: PathBuf,
    credentials: TestenvCredentials,
    data_dir: PathBuf,
}

impl Testenv {
    /// Starts testenv and waits for its READY line (up to `opts.ready_timeout`).
    pub fn start(opts: &TestenvOptions) -> Result<Self, TestenvError> {
        if !opts.binary.is_file() {
            return Err(TestenvError::BinaryMissing(opts.binary.clone()));
        }
        let io = |what, path: &Path, source| TestenvError::Io {
            what,
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(&opts.data_dir).map_err(|e| io("creating", &opts.data_dir, e))?;
        let kubeconfig = opts.data_dir.join("admin.kubeconfig");
        let credentials_path = opts.data_dir.join("credentials.json");
        if let Some(dir) = opts.log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log_path)
            .map_err(|e| io("opening log", &opts.log_path, e))?;

        let mut cmd = Command::new(&opts.binary);
        cmd.arg(format!("--listen-address={}", opts.listen_address))
            .arg(format!("--port={}", opts.port))
            .arg("--data-dir")
            .arg(&opts.data_dir)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--credentials-out")
            .arg(&credentials_path)
            .arg(format!("--nodes={}", opts.nodes.join(",")))
            .arg(format!(
                "--ready-timeout={}s",
                opts.ready_timeout.as_secs().max(1)
            ))
            .arg(format!("--watch-stdin={}", !opts.outlive_parent))
            .args(
                opts.apiserver_args
                    .iter()
                    .map(|a| format!("--apiserver-arg={a}")),
            )
            .stdin(if opts.outlive_parent {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            program: opts.binary.display().to_string(),
            source,
        })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let mut process = ManagedProcess::adopt("testenv".to_owned(), child, opts.log_path.clone())
            .with_grace(STOP_GRACE);
        tracing::info!(pid = process.pid(), listen = %opts.listen_address, log = %opts.log_path.display(), "testenv starting");

        // Read stdout on a thread so the wait below has a deadline; the thread keeps draining stdout
        // until testenv exits.
        let (tx, rx) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::Builder::new()
                .name("testenv-stdout".into())
                .spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        if tx.send(StdoutEvent::Line(line)).is_err() {
                            // Nobody listens any more; keep draining so testenv never blocks on stdout.
                            continue;
                        }
                    }
                    let _ = tx.send(StdoutEvent::Eof);
                })
                .map_err(|source| ProcessError::Spawn {
                    program: "stdout reader thread".into(),
                    source,
                })?;
        }

        let deadline = Instant::now() + opts.ready_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(StdoutEvent::Line(line)) => {
                    if line.starts_with("READY ") {
                        break;
                    }
                    return Err(TestenvError::Protocol(line));
                }
                Ok(StdoutEvent::Eof) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status =
                        crate::process::wait_child(process.child_mut(), Duration::from_secs(10))?
                            .map_or_else(|| "stdout closed".to_owned(), |s| s.to_string());
                    return Err(TestenvError::ExitedEarly {
                        status,
                        log: opts.log_path.clone(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = process.try_wait()? {
                        return Err(TestenvError::ExitedEarly {
                            status: status.to_string(),
                            log: opts.log_path.clone(),
                        });
                    }
                    if left.is_zero() {
                        return Err(TestenvError::NotReady {
                            timeout: opts.ready_timeout,
                            log: opts.log_path.clone(),
                        });
                    }
                }
            }
        }

        let credentials = TestenvCredentials::read(&credentials_path)?;
        tracing::info!(pid = process.pid(), server = %credentials.server, "testenv ready");
        Ok(Self {
            process,
            stdin,
            kubeconfig,
            credentials_path,
            credentials,
            data_dir: opts.data_dir.clone(),
        })
    }

    /// The testenv PID.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// PID and start time.
    pub fn identity(&self) -> ProcessIdentity {
        self.process.identity()
    }

    /// The admin kubeconfig (user in system:masters).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The credentials file testenv wrote.
    pub fn credentials_path(&self) -> &Path {
        &self.credentials_path
    }

    /// Server URL, CA and tokens.
    pub fn credentials(&self) -> &TestenvCredentials {
        &self.credentials
    }

    /// testenv's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// testenv's log file.
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// A client acting as the admin.
    pub async fn admin_client(&self) -> Result<kube::Client, TestenvError> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Writes a kubeconfig for `node` (token of `system:node:<node>`, CA embedded) to `path`.
    pub fn write_node_kubeconfig(&self, node: &str, path: &Path) -> Result<(), TestenvError> {
        self.credentials.write_node_kubeconfig(node, path)
    }

    /// Stops testenv (SIGTERM, it shuts etcd and the apiserver down) and checks it exited cleanly.
    pub fn stop(mut self) -> Result<(), TestenvError> {
        drop(self.stdin.take());
        let status = self.process.stop(STOP_GRACE)?;
        if status.success() {
            Ok(())
        } else {
            Err(TestenvError::BadExit {
                status: status.to_string(),
                log: self.process.log_path().to_owned(),
            })
        }
    }

    /// Leaves testenv running and returns its identity (only meaningful with
    /// [`TestenvOptions::outlive_parent`]; otherwise it stops when this process exits).
    pub fn detach(self) -> ProcessIdentity {
        let Self { process, stdin, .. } = self;
        std::mem::forget(stdin);
        process.detach()
    }
}
