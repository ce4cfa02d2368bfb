//! Keystore tests on real temporary directories: generation, reload, corruption, permissions,
//! rotation files and secrecy of messages.

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use super::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn store() -> (tempfile::TempDir, Keystore) {
    let dir = tempfile::tempdir().unwrap();
    let ks = Keystore::new(dir.path().join("state"));
    (dir, ks)
}

fn secret_text(ks: &Keystore, file: &str) -> String {
    fs::read_to_string(ks.path(file)).unwrap()
}

#[test]
fn first_load_generates_a_private_key_0600_in_a_0700_dir() {
    let (_t, ks) = store();
    let out = ks.load_or_generate().unwrap();
    assert_eq!(out.source, KeySource::Generated);
    assert!(out.permissions_fixed.is_empty());
    assert!(out.keys.next.is_none() && out.keys.previous.is_none());
    let path = ks.path(PRIVATE_KEY_FILE);
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(ks.dir()), 0o700);
    let text = secret_text(&ks, PRIVATE_KEY_FILE);
    assert_eq!(text.len(), 45);
    assert!(text.ends_with('\n'));
    assert_eq!(
        PrivateKey::from_base64(&text).unwrap().public_key(),
        out.keys.current.public_key()
    );
    // Nothing but the key file is left behind.
    let names: Vec<_> = fs::read_dir(ks.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, [PRIVATE_KEY_FILE]);
}

#[test]
fn second_load_returns_the_same_key() {
    let (_t, ks) = store();
    let first = ks.load_or_generate().unwrap().keys.current.public_key();
    for _ in 0..3 {
        let out = ks.load_or_generate().unwrap();
        assert_eq!(out.source, KeySource::Loaded);
        assert_eq!(out.keys.current.public_key(), first);
    }
    assert_eq!(ks.load().unwrap().keys.current.public_key(), first);
}

#[test]
fn load_without_generate_reports_no_key() {
    let (_t, ks) = store();
    let e = ks.load().unwrap_err();
    assert!(matches!(e, KeystoreError::NoKey { .. }), "{e}");
    assert!(!ks.path(PRIVATE_KEY_FILE).exists());
}

#[test]
fn key_written_by_wg_genkey_format_loads() {
    let (_t, ks) = store();
    fs::create_dir_all(ks.dir()).unwrap();
    let key = PrivateKey::from_bytes([3; 32]);
    fs::write(
        ks.path(PRIVATE_KEY_FILE),
        format!("{}\n", key.to_base64().as_str()),
    )
    .unwrap();
    fs::set_permissions(ks.path(PRIVATE_KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(ks.dir(), fs::Permissions::from_mode(0o700)).unwrap();
    let out = ks.load_or_generate().unwrap();
    assert_eq!(out.source, KeySource::Loaded);
    assert_eq!(out.keys.current.public_key(), key.public_key());
}

fn corrupt_with(contents: &[u8]) -> (tempfile::TempDir, Keystore, KeystoreError) {
    let (t, ks) = store();
    ks.load_or_generate().unwrap();
    fs::write(ks.path(PRIVATE_KEY_FILE), contents).unwrap();
    let e = ks.load_or_generate().unwrap_err();
    // Never replaced silently.
    assert_eq!(fs::read(ks.path(PRIVATE_KEY_FILE)).unwrap(), contents);
    (t, ks, e)
}

#[test]
fn corrupt_key_files_are_errors_naming_the_path() {
    let cases: [&[u8]; 7] = [
        b"",
        b"\n\n",
        b"this is not a key\n",
        b"AAAA\n",
        b"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ==\n",
        &[0xff, 0xfe, 0x00, 0x41],
        &[b'A'; 4096],
    ];
    for contents in cases {
        let (_t, ks, e) = corrupt_with(contents);
        assert!(
            matches!(e, KeystoreError::Corrupt { .. }),
            "{contents:?}: {e:?}"
        );
        let message = e.to_string();
        assert!(
            message.contains(&ks.path(PRIVATE_KEY_FILE).display().to_string()),
            "{message}"
        );
        assert!(message.contains("--regenerate-key"), "{message}");
    }
}

#[test]
fn corrupt_message_never_quotes_the_secret() {
    // A real key with one character broken: the error must not echo any of it.
    let key = PrivateKey::from_bytes([0x5c; 32]);
    let mut text = key.to_base64().as_str().to_string();
    text.replace_range(10..11, "!");
    let (_t, _ks, e) = corrupt_with(text.as_bytes());
    let message = format!("{e} {e:?}");
    for window in text.as_bytes().windows(6) {
        let w = std::str::from_utf8(window).unwrap();
        assert!(!message.contains(w), "message quotes {w:?}: {message}");
    }
}

#[test]
fn directory_or_symlink_instead_of_key_file_is_an_error() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    fs::remove_file(ks.path(PRIVATE_KEY_FILE)).unwrap();
    fs::create_dir(ks.path(PRIVATE_KEY_FILE)).unwrap();
    let e = ks.load_or_generate().unwrap_err();
    assert!(matches!(e, KeystoreError::NotRegularFile { .. }), "{e}");
    assert!(e.to_string().contains("private.key"));

    let (t2, ks2) = store();
    ks2.load_or_generate().unwrap();
    let elsewhere = t2.path().join("elsewhere.key");
    fs::rename(ks2.path(PRIVATE_KEY_FILE), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, ks2.path(PRIVATE_KEY_FILE)).unwrap();
    let e = ks2.load_or_generate().unwrap_err();
    assert!(matches!(e, KeystoreError::NotRegularFile { .. }), "{e}");
}

#[test]
fn state_dir_that_is_a_file_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("file");
    fs::write(&path, "x").unwrap();
    let e = Keystore::new(&path).load_or_generate().unwrap_err();
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
}

#[test]
fn too_open_permissions_are_fixed_and_reported() {
    let (_t, ks) = store();
    let key = ks.load_or_generate().unwrap().keys.current.public_key();
    ks.generate_next().unwrap();
    fs::set_permissions(ks.path(PRIVATE_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(ks.path(NEXT_KEY_FILE), fs::Permissions::from_mode(0o660)).unwrap();
    fs::set_permissions(ks.dir(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = ks.load_or_generate().unwrap();
    assert_eq!(out.source, KeySource::Loaded);
    assert_eq!(out.keys.current.public_key(), key);
    let mut fixes: Vec<(PathBuf, u32, u32)> = out
        .permissions_fixed
        .iter()
        .map(|f| (f.path.clone(), f.old_mode, f.new_mode))
        .collect();
    fixes.sort();
    let mut want = vec![
        (ks.dir().to_path_buf(), 0o755, 0o700),
        (ks.path(PRIVATE_KEY_FILE), 0o644, 0o600),
        (ks.path(NEXT_KEY_FILE), 0o660, 0o600),
    ];
    want.sort();
    assert_eq!(fixes, want);
    assert_eq!(mode(&ks.path(PRIVATE_KEY_FILE)), 0o600);
    assert_eq!(mode(&ks.path(NEXT_KEY_FILE)), 0o600);
    assert_eq!(mode(ks.dir()), 0o700);
    // Fixed once, quiet afterwards.
    assert!(ks.load().unwrap().permissions_fixed.is_empty());
}

#[test]
fn stricter_permissions_are_left_alone() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    fs::set_permissions(ks.path(PRIVATE_KEY_FILE), fs::Permissions::from_mode(0o400)).unwrap();
    let out = ks.load().unwrap();
    assert!(out.permissions_fixed.is_empty());
    assert_eq!(mode(&ks.path(PRIVATE_KEY_FILE)), 0o400);
}

#[test]
fn regenerate_replaces_even_a_corrupt_key_and_drops_rotation_state() {
    let (_t, ks) = store();
    let old = ks.load_or_generate().unwrap().keys.current.public_key();
    ks.generate_next().unwrap();
    fs::write(ks.path(PRIVATE_KEY_FILE), "garbage").unwrap();
    assert!(ks.load_or_generate().is_err());
    let out = ks.regenerate().unwrap();
    assert_eq!(out.source, KeySource::Regenerated);
    let new = out.keys.current.public_key();
    assert_ne!(new, old);
    assert!(!ks.path(NEXT_KEY_FILE).exists());
    assert_eq!(mode(&ks.path(PRIVATE_KEY_FILE)), 0o600);
    assert_eq!(ks.load().unwrap().keys.current.public_key(), new);
}

#[test]
fn missing_private_key_beside_rotation_files_is_an_error() {
    for file in [NEXT_KEY_FILE, PREVIOUS_KEY_FILE] {
        let (_t, ks) = store();
        ks.load_or_generate().unwrap();
        fs::copy(ks.path(PRIVATE_KEY_FILE), ks.path(file)).unwrap();
        fs::remove_file(ks.path(PRIVATE_KEY_FILE)).unwrap();
        let e = ks.load_or_generate().unwrap_err();
        assert!(matches!(e, KeystoreError::MissingPrivateKey { .. }), "{e}");
        assert!(e.to_string().contains(file), "{e}");
        assert!(!ks.path(PRIVATE_KEY_FILE).exists());
    }
}

#[test]
fn corrupt_next_key_is_an_error_too() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    fs::write(ks.path(NEXT_KEY_FILE), "nope").unwrap();
    let e = ks.load_or_generate().unwrap_err();
    assert!(e.to_string().contains("next.key"), "{e}");
    assert!(ks.generate_next().is_err());
}

#[test]
fn stale_temporary_files_are_removed() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    let stale = ks.dir().join(format!("{TEMP_PREFIX}private.key.1.1"));
    fs::write(&stale, "half a key").unwrap();
    let unrelated = ks.dir().join("notes.txt");
    fs::write(&unrelated, "keep me").unwrap();
    ks.load_or_generate().unwrap();
    assert!(!stale.exists());
    assert!(unrelated.exists());
}

#[test]
fn rotation_files_walk_through_a_full_rotation() {
    let (_t, ks) = store();
    let k = ks.load_or_generate().unwrap().keys.current.public_key();

    let k2 = ks.generate_next().unwrap();
    assert_ne!(k2, k);
    assert_eq!(
        ks.generate_next().unwrap(),
        k2,
        "generate_next keeps an existing next key"
    );
    assert_eq!(mode(&ks.path(NEXT_KEY_FILE)), 0o600);
    let keys = ks.load().unwrap().keys.public();
    assert_eq!(
        (keys.current, keys.next, keys.previous),
        (k, Some(k2), None)
    );

    assert_eq!(ks.promote_next().unwrap(), k2);
    let keys = ks.load().unwrap().keys.public();
    assert_eq!(
        (keys.current, keys.next, keys.previous),
        (k2, None, Some(k))
    );
    assert_eq!(mode(&ks.path(PREVIOUS_KEY_FILE)), 0o600);
    assert_eq!(mode(&ks.path(PRIVATE_KEY_FILE)), 0o600);

    ks.retire_previous().unwrap();
    let keys = ks.load().unwrap().keys.public();
    assert_eq!((keys.current, keys.next, keys.previous), (k2, None, None));
    ks.retire_previous().unwrap();
}

#[test]
fn rollback_restores_the_old_key() {
    let (_t, ks) = store();
    let k = ks.load_or_generate().unwrap().keys.current.public_key();
    ks.generate_next().unwrap();
    ks.promote_next().unwrap();
    assert_eq!(ks.restore_previous().unwrap(), k);
    let keys = ks.load().unwrap().keys.public();
    assert_eq!((keys.current, keys.next, keys.previous), (k, None, None));
}

#[test]
fn discard_next_keeps_the_current_key() {
    let (_t, ks) = store();
    let k = ks.load_or_generate().unwrap().keys.current.public_key();
    ks.generate_next().unwrap();
    ks.discard_next().unwrap();
    ks.discard_next().unwrap();
    let keys = ks.load().unwrap().keys.public();
    assert_eq!((keys.current, keys.next, keys.previous), (k, None, None));
}

#[test]
fn interrupted_promotion_loads_as_not_switched_and_can_be_redone() {
    let (_t, ks) = store();
    let k = ks.load_or_generate().unwrap().keys.current.public_key();
    let k2 = ks.generate_next().unwrap();
    // The crash window: previous.key written, next.key not renamed yet.
    fs::copy(ks.path(PRIVATE_KEY_FILE), ks.path(PREVIOUS_KEY_FILE)).unwrap();
    let keys = ks.load().unwrap().keys.public();
    assert_eq!(
        (keys.current, keys.next, keys.previous),
        (k, Some(k2), None)
    );
    assert_eq!(ks.promote_next().unwrap(), k2);
    let keys = ks.load().unwrap().keys.public();
    assert_eq!(
        (keys.current, keys.next, keys.previous),
        (k2, None, Some(k))
    );
}

#[test]
fn promotion_refuses_to_overwrite_an_old_identity() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    ks.generate_next().unwrap();
    ks.promote_next().unwrap();
    ks.generate_next().unwrap();
    let e = ks.promote_next().unwrap_err();
    assert!(matches!(e, KeystoreError::PreviousKeyPresent { .. }), "{e}");
}

#[test]
fn steps_that_need_a_file_say_which() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    let e = ks.promote_next().unwrap_err();
    assert!(e.to_string().contains("next.key"), "{e}");
    let e = ks.restore_previous().unwrap_err();
    assert!(e.to_string().contains("previous.key"), "{e}");
}

#[test]
fn apply_runs_each_step() {
    let (_t, ks) = store();
    let k = ks.load_or_generate().unwrap().keys.current.public_key();
    ks.apply(KeystoreStep::GenerateNext).unwrap();
    let k2 = ks.load().unwrap().keys.public().next.unwrap();
    ks.apply(KeystoreStep::PromoteNext).unwrap();
    assert_eq!(ks.load().unwrap().keys.public().current, k2);
    ks.apply(KeystoreStep::RestorePrevious).unwrap();
    assert_eq!(ks.load().unwrap().keys.public().current, k);
    ks.apply(KeystoreStep::GenerateNext).unwrap();
    ks.apply(KeystoreStep::DiscardNext).unwrap();
    ks.apply(KeystoreStep::GenerateNext).unwrap();
    ks.apply(KeystoreStep::PromoteNext).unwrap();
    ks.apply(KeystoreStep::RetirePrevious).unwrap();
    let keys = ks.load().unwrap().keys.public();
    assert_ne!(keys.current, k);
    assert_eq!((keys.next, keys.previous), (None, None));
}

#[test]
fn debug_output_never_contains_secrets() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    ks.generate_next().unwrap();
    let out = ks.load().unwrap();
    let debug = format!("{out:?} {:?}", out.keys);
    for file in [PRIVATE_KEY_FILE, NEXT_KEY_FILE] {
        let secret = secret_text(&ks, file);
        assert!(!debug.contains(secret.trim()), "{debug}");
        assert!(!debug.contains(&secret.trim()[..12]), "{debug}");
    }
    assert!(debug.contains(&out.keys.current.public_key().to_base64()));
    assert_eq!(out.keys.public_keys().len(), 2);
}

/// Gives `path` to uid/gid 65534 (nobody); `false` when this process may not (not root).
fn give_away(path: &Path) -> bool {
    match std::os::unix::fs::chown(path, Some(65534), Some(65534)) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipping the foreign-owner case: chown needs root ({e})");
            false
        }
        Err(e) => panic!("chown {}: {e}", path.display()),
    }
}

/// Finding 14 (docs/threat-model.md): a key file or state directory owned by another user is
/// refused, naming the path and both uids; the key is not used.
#[test]
fn a_key_file_or_directory_of_another_owner_is_refused() {
    let (_t, ks) = store();
    ks.load_or_generate().unwrap();
    let key = ks.path(PRIVATE_KEY_FILE);
    if !give_away(&key) {
        return;
    }
    let e = ks.load_or_generate().unwrap_err();
    assert!(
        matches!(e, KeystoreError::ForeignOwner { owner: 65534, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("private.key"), "{e}");
    std::os::unix::fs::chown(&key, Some(0), Some(0)).unwrap();
    ks.load().expect("own file loads again");

    let dir = ks.dir().to_path_buf();
    assert!(give_away(&dir));
    let e = ks.load().unwrap_err();
    assert!(
        matches!(&e, KeystoreError::ForeignOwner { path, .. } if *path == dir),
        "{e}"
    );
}

/// Finding 14: a symlink swapped in for `private.key` between any check and the open is never
/// followed. A thread keeps replacing the file (atomically, by rename) with a symlink to
/// another key and back while the keystore loads; a load returns the real key or an error,
/// never the symlink target's key.
#[test]
fn a_symlink_swapped_in_during_a_load_is_never_followed() {
    let (t, ks) = store();
    let real = ks.load_or_generate().unwrap().keys.current.public_key();
    let attacker = t.path().join("attacker.key");
    let attacker_key = PrivateKey::generate().unwrap();
    fs::write(
        &attacker,
        format!("{}\n", attacker_key.to_base64().as_str()),
    )
    .unwrap();
    fs::set_permissions(&attacker, fs::Permissions::from_mode(0o600)).unwrap();
    let target = ks.path(PRIVATE_KEY_FILE);
    let (link, file) = (t.path().join("link.tmp"), t.path().join("file.tmp"));
    let original = fs::read(&target).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let (stop, target, link, file, attacker) = (
            stop.clone(),
            target.clone(),
            link.clone(),
            file.clone(),
            attacker.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = fs::remove_file(&link);
                std::os::unix::fs::symlink(&attacker, &link).unwrap();
                fs::rename(&link, &target).unwrap();
                fs::write(&file, &original).unwrap();
                fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
                fs::rename(&file, &target).unwrap();
            }
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let (mut loaded, mut refused) = (0u32, 0u32);
    while std::time::Instant::now() < deadline {
        match ks.load() {
            Ok(o) => {
                assert_eq!(
                    o.keys.current.public_key(),
                    real,
                    "the symlink target's key was loaded"
                );
                loaded += 1;
            }
            Err(_) => refused += 1,
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(
        loaded > 0 && refused > 0,
        "loaded {loaded}, refused {refused}"
    );
}
