//! The on-disk keystore: this node's X25519 secrets in a state directory.
//!
//! | file | meaning |
//! |---|---|
//! | `private.key` | the key in force (initiates, answers) |
//! | `next.key` | K' of a rotation in progress, not switched to yet |
//! | `previous.key` | K after a switch, still answered until retired |
//!
//! Each file is the base64 secret and a newline, mode 0600, in a 0700 directory. Every write is
//! atomic: a temporary file in the same directory, fsync, rename over the target, fsync the
//! directory. A file that exists but cannot be read or parsed is an error naming the path, never
//! a reason to make a new key: a new key churns every peer. Only [`Keystore::regenerate`] (the
//! agent's `--regenerate-key`) replaces a key on purpose. Files or a directory open to group or
//! others are tightened and the fix is reported in the [`LoadOutcome`]. Key files are opened
//! with `O_NOFOLLOW` and checked on the open descriptor (a symlink swapped in after a check is
//! never followed); a key file or directory owned by another user is an error (whoever owns it
//! chose this node's identity).
//!
//! One process owns a state directory at a time.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use zeroize::Zeroizing;

use crate::{
    keys::{KeyError, PrivateKey, PublicKey},
    rotation::agent::{KeystoreStep, LocalKeys},
};

#[cfg(test)]
mod tests;

/// File name of the key in force.
pub const PRIVATE_KEY_FILE: &str = "private.key";
/// File name of the next key of a rotation.
pub const NEXT_KEY_FILE: &str = "next.key";
/// File name of the key before the last switch.
pub const PREVIOUS_KEY_FILE: &str = "previous.key";

const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Prefix of temporary files; leftovers from a crash are removed on load.
const TEMP_PREFIX: &str = ".wiremesh-key.tmp.";
/// A key file is 44 base64 characters and a newline; anything much longer is not a key file.
const MAX_FILE_LEN: u64 = 256;

/// Why the keystore failed. Messages name the path and never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// A file-system call failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file exists but does not hold a key. Fix or remove it, or regenerate explicitly.
    #[error(
        "key file {path} is corrupt ({detail}); refusing to replace it silently: restore it, or \
         regenerate the key explicitly (--regenerate-key), which changes this node's identity"
    )]
    Corrupt { path: PathBuf, detail: String },
    /// The path is a symlink, directory or device instead of a regular file.
    #[error("{path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    /// A key file or the state directory belongs to another user, who could have chosen (or
    /// can read) this node's key.
    #[error(
        "{path} is owned by uid {owner}, not by this process's uid {expected}; refusing to use \
         it: check who wrote it, then fix its owner or regenerate the key (--regenerate-key)"
    )]
    ForeignOwner {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    /// `private.key` is missing while rotation files exist: someone removed it.
    #[error(
        "{path} is missing but {other} exists; refusing to generate a new identity over a \
         half-present keystore (regenerate explicitly with --regenerate-key)"
    )]
    MissingPrivateKey { path: PathBuf, other: PathBuf },
    /// [`Keystore::load`] on a directory without a key.
    #[error("no key at {path}")]
    NoKey { path: PathBuf },
    /// A rotation step needs a file that is not there.
    #[error("cannot {step}: {path} does not exist")]
    StepNeedsFile { step: &'static str, path: PathBuf },
    /// Promoting would overwrite an old identity that is still in use.
    #[error(
        "cannot promote the next key: {path} still holds an old key; retire or restore it first"
    )]
    PreviousKeyPresent { path: PathBuf },
    /// The random source failed.
    #[error("generating a key: {0}")]
    Generate(#[from] KeyError),
}

/// Where the key in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// Read from `private.key`.
    Loaded,
    /// No key existed: a new one was made (first start).
    Generated,
    /// Replaced on request by [`Keystore::regenerate`].
    Regenerated,
}

/// A permission problem that was fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionFix {
    /// The file or directory.
    pub path: PathBuf,
    /// Its mode before (permission bits only).
    pub old_mode: u32,
    /// Its mode now.
    pub new_mode: u32,
}

/// Every key in the keystore.
#[derive(Clone)]
pub struct KeySet {
    /// `private.key`.
    pub current: PrivateKey,
    /// `next.key`.
    pub next: Option<PrivateKey>,
    /// `previous.key`, unless it equals the current key (left over from an interrupted switch).
    pub previous: Option<PrivateKey>,
}

impl KeySet {
    /// The public halves, for the rotation state machine and the peer set.
    pub fn public(&self) -> LocalKeys {
        LocalKeys {
            current: self.current.public_key(),
            next: self.next.as_ref().map(PrivateKey::public_key),
            previous: self.previous.as_ref().map(PrivateKey::public_key),
        }
    }

    /// Every public key this node answers to or will answer to.
    pub fn public_keys(&self) -> Vec<PublicKey> {
        let keys = self.public();
        std::iter::once(keys.current)
            .chain(keys.next)
            .chain(keys.previous)
            .collect()
    }
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("current", &self.current)
            .field("next", &self.next)
            .field("previous", &self.previous)
            .finish()
    }
}

/// The result of loading the keystore.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    /// The keys.
    pub keys: KeySet,
    /// Where the key in force came from.
    pub source: KeySource,
    /// Permissions that were too open and have been tightened; log them as warnings.
    pub permissions_fixed: Vec<PermissionFix>,
}

/// A state directory holding this node's keys.
#[derive(Debug, Clone)]
pub struct Keystore {
    dir: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Keystore {
    /// A keystore in `dir` (created on first load). No I/O happens here.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of one of the key files.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Loads the keys, generating `private.key` if the directory holds no key at all.
    pub fn load_or_generate(&self) -> Result<LoadOutcome, KeystoreError> {
        self.load_inner(true)
    }

    /// Loads the keys; a missing `private.key` is [`KeystoreError::NoKey`].
    pub fn load(&self) -> Result<LoadOutcome, KeystoreError> {
        self.load_inner(false)
    }

    /// Replaces the key in force with a new one and drops any rotation state, whatever the old
    /// files held (even if corrupt). This changes the node's identity: every peer must pick up
    /// the new public key.
    pub fn regenerate(&self) -> Result<LoadOutcome, KeystoreError> {
        let mut permissions_fixed = Vec::new();
        self.prepare_dir(&mut permissions_fixed)?;
        let key = PrivateKey::generate()?;
        self.write_key(PRIVATE_KEY_FILE, &key)?;
        self.remove(NEXT_KEY_FILE)?;
        self.remove(PREVIOUS_KEY_FILE)?;
        self.sync_dir()?;
        Ok(LoadOutcome {
            keys: KeySet {
                current: key,
                next: None,
                previous: None,
            },
            source: KeySource::Regenerated,
            permissions_fixed,
        })
    }

    /// Generates K' and persists it as `next.key`. An existing valid `next.key` is kept and
    /// returned: the key may already be announced.
    pub fn generate_next(&self) -> Result<PublicKey, KeystoreError> {
        if let Some(next) = self.read_key(NEXT_KEY_FILE, &mut Vec::new())? {
            return Ok(next.public_key());
        }
        let key = PrivateKey::generate()?;
        self.write_key(NEXT_KEY_FILE, &key)?;
        Ok(key.public_key())
    }

    /// Switches to `next.key`: copies `private.key` to `previous.key`, then renames `next.key`
    /// over `private.key`. A crash between the two leaves `previous.key` equal to `private.key`,
    /// which loads as "not switched" and is overwritten by the next attempt.
    pub fn promote_next(&self) -> Result<PublicKey, KeystoreError> {
        let mut fixes = Vec::new();
        let current = self
            .read_key(PRIVATE_KEY_FILE, &mut fixes)?
            .ok_or_else(|| KeystoreError::NoKey {
                path: self.path(PRIVATE_KEY_FILE),
            })?;
        let next = self.read_key(NEXT_KEY_FILE, &mut fixes)?.ok_or_else(|| {
            KeystoreError::StepNeedsFile {
                step: "promote the next key",
                path: self.path(NEXT_KEY_FILE),
            }
        })?;
        if let Some(previous) = self.read_key(PREVIOUS_KEY_FILE, &mut fixes)?
            && previous.public_key() != current.public_key()
        {
            return Err(KeystoreError::PreviousKeyPresent {
                path: self.path(PREVIOUS_KEY_FILE),
            });
        }
        self.write_key(PREVIOUS_KEY_FILE, &current)?;
        self.rename(NEXT_KEY_FILE, PRIVATE_KEY_FILE)?;
        Ok(next.public_key())
    }

    /// Rolls back a switch: renames `previous.key` over `private.key`.
    pub fn restore_previous(&self) -> Result<PublicKey, KeystoreError> {
        let previous = self
            .read_key(PREVIOUS_KEY_FILE, &mut Vec::new())?
            .ok_or_else(|| KeystoreError::StepNeedsFile {
                step: "restore the previous key",
                path: self.path(PREVIOUS_KEY_FILE),
            })?;
        self.rename(PREVIOUS_KEY_FILE, PRIVATE_KEY_FILE)?;
        Ok(previous.public_key())
    }

    /// Deletes `next.key` (no error if absent).
    pub fn discard_next(&self) -> Result<(), KeystoreError> {
        self.remove(NEXT_KEY_FILE)?;
        self.sync_dir()
    }

    /// Deletes `previous.key`, retiring the old identity (no error if absent).
    pub fn retire_previous(&self) -> Result<(), KeystoreError> {
        self.remove(PREVIOUS_KEY_FILE)?;
        self.sync_dir()
    }

    /// Applies one step of the rotation state machine.
    pub fn apply(&self, step: KeystoreStep) -> Result<(), KeystoreError> {
        match step {
            KeystoreStep::GenerateNext => self.generate_next().map(drop),
            KeystoreStep::PromoteNext => self.promote_next().map(drop),
            KeystoreStep::DiscardNext => self.discard_next(),
            KeystoreStep::RestorePrevious => self.restore_previous().map(drop),
            KeystoreStep::RetirePrevious => self.retire_previous(),
        }
    }

    fn load_inner(&self, generate: bool) -> Result<LoadOutcome, KeystoreError> {
        let mut permissions_fixed = Vec::new();
        self.prepare_dir(&mut permissions_fixed)?;
        self.remove_stale_temps()?;
        let next = self.read_key(NEXT_KEY_FILE, &mut permissions_fixed)?;
        let previous = self.read_key(PREVIOUS_KEY_FILE, &mut permissions_fixed)?;
        let (current, source) = match self.read_key(PRIVATE_KEY_FILE, &mut permissions_fixed)? {
            Some(key) => (key, KeySource::Loaded),
            None => {
                let path = self.path(PRIVATE_KEY_FILE);
                if let Some(other) = [(NEXT_KEY_FILE, &next), (PREVIOUS_KEY_FILE, &previous)]
                    .into_iter()
                    .find_map(|(file, key)| key.as_ref().map(|_| self.path(file)))
                {
                    return Err(KeystoreError::MissingPrivateKey { path, other });
                }
                if !generate {
                    return Err(KeystoreError::NoKey { path });
                }
                let key = PrivateKey::generate()?;
                self.write_key(PRIVATE_KEY_FILE, &key)?;
                (key, KeySource::Generated)
            }
        };
        let previous = previous.filter(|p| p.public_key() != current.public_key());
        Ok(LoadOutcome {
            keys: KeySet {
                current,
                next,
                previous,
            },
            source,
            permissions_fixed,
        })
    }

    /// Creates the directory (0700) or tightens its mode.
    fn prepare_dir(&self, fixes: &mut Vec<PermissionFix>) -> Result<(), KeystoreError> {
        match fs::symlink_metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => {
                check_owner(&self.dir, &meta)?;
                let mode = meta.permissions().mode() & 0o7777;
                if mode & 0o077 != 0 {
                    let new_mode = mode & !0o077;
                    fs::set_permissions(&self.dir, fs::Permissions::from_mode(new_mode))
                        .map_err(|e| io_err("chmod", &self.dir, e))?;
                    fixes.push(PermissionFix {
                        path: self.dir.clone(),
                        old_mode: mode,
                        new_mode,
                    });
                }
                Ok(())
            }
            Ok(_) => Err(KeystoreError::Io {
                op: "use as state directory",
                path: self.dir.clone(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(&self.dir)
                    .map_err(|e| io_err("create directory", &self.dir, e))?;
                // The umask may have removed bits we asked for; set exactly 0700.
                fs::set_permissions(&self.dir, fs::Permissions::from_mode(DIR_MODE))
                    .map_err(|e| io_err("chmod", &self.dir, e))
            }
            Err(e) => Err(io_err("stat", &self.dir, e)),
        }
    }

    /// Reads one key file. `Ok(None)` only when the file does not exist.
    fn read_key(
        &self,
        file: &str,
        fixes: &mut Vec<PermissionFix>,
    ) -> Result<Option<PrivateKey>, KeystoreError> {
        let path = self.path(file);
        // O_NOFOLLOW: a symlink is an error, not followed (also one swapped in after a check);
        // O_NONBLOCK: a FIFO does not block the open. Every check below is on this descriptor.
        let mut f = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(KeystoreError::NotRegularFile { path });
            }
            Err(e) => return Err(io_err("open", &path, e)),
        };
        let meta = f.metadata().map_err(|e| io_err("stat", &path, e))?;
        if !meta.file_type().is_file() {
            return Err(KeystoreError::NotRegularFile { path });
        }
        check_owner(&path, &meta)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            f.set_permissions(fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| io_err("chmod", &path, e))?;
            fixes.push(PermissionFix {
                path: path.clone(),
                old_mode: mode,
                new_mode: FILE_MODE,
            });
        }
        if meta.len() > MAX_FILE_LEN {
            return Err(KeystoreError::Corrupt {
                path,
                detail: format!("{} bytes, a key file has 45", meta.len()),
            });
        }
        let mut text = Zeroizing::new(String::new());
        f.read_to_string(&mut text).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => KeystoreError::Corrupt {
                path: path.clone(),
                detail: "not UTF-8 text".to_string(),
            },
            _ => io_err("read", &path, e),
        })?;
        if text.trim().is_empty() {
            return Err(KeystoreError::Corrupt {
                path,
                detail: "empty".to_string(),
            });
        }
        PrivateKey::from_base64(&text)
            .map(Some)
            .map_err(|e| KeystoreError::Corrupt {
                path,
                detail: e.to_string(),
            })
    }

    /// Writes `key` to `file` atomically, mode 0600.
    fn write_key(&self, file: &str, key: &PrivateKey) -> Result<(), KeystoreError> {
        let target = self.path(file);
        let temp = self.dir.join(format!(
            "{TEMP_PREFIX}{file}.{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&temp)
                .map_err(|e| io_err("create", &temp, e))?;
            let mut line = key.to_base64();
            line.push('\n');
            f.write_all(line.as_bytes())
                .map_err(|e| io_err("write", &temp, e))?;
            f.sync_all().map_err(|e| io_err("fsync", &temp, e))?;
            fs::rename(&temp, &target).map_err(|e| io_err("rename into place", &target, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result?;
        self.sync_dir()
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), KeystoreError> {
        let target = self.path(to);
        fs::rename(self.path(from), &target)
            .map_err(|e| io_err("rename into place", &target, e))?;
        self.sync_dir()
    }

    fn remove(&self, file: &str) -> Result<(), KeystoreError> {
        let path = self.path(file);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path, e)),
        }
    }

    fn remove_stale_temps(&self) -> Result<(), KeystoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_err("list", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("list", &self.dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let path = entry.path();
                fs::remove_file(&path).map_err(|e| io_err("remove stale temporary", &path, e))?;
            }
        }
        Ok(())
    }

    /// Makes renames and removals in the directory durable.
    fn sync_dir(&self) -> Result<(), KeystoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("fsync directory", &self.dir, e))
    }
}

/// This process's effective uid, from `/proc/self/status` (the crate has no unsafe code for
/// `geteuid`).
fn effective_uid() -> Result<u32, KeystoreError> {
    let path = Path::new("/proc/self/status");
    let status = fs::read_to_string(path).map_err(|e| io_err("read", path, e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| {
            io_err(
                "find the effective uid in",
                path,
                io::Error::new(io::ErrorKind::InvalidData, "no Uid line"),
            )
        })
}

/// [`KeystoreError::ForeignOwner`] unless `meta` (of `path`) belongs to this process's
/// effective uid.
fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), KeystoreError> {
    let expected = effective_uid()?;
    if meta.uid() != expected {
        return Err(KeystoreError::ForeignOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            expected,
        });
    }
    Ok(())
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> KeystoreError {
    KeystoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
