use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::guest::ManagementKey;

/// Without its comment, as the console and the file carry it.
fn public(k: &ManagementKey) -> PublicKey {
    let line = k.public_line();
    let mut fields = line.split_whitespace();
    PublicKey::from_openssh(&format!("{} {}", fields.next().unwrap(), fields.next().unwrap()))
        .unwrap()
}

fn block(prefix: &str, keys: &[&ManagementKey]) -> String {
    let mut text = format!("{prefix}{BEGIN}\r\n");
    for k in keys {
        text.push_str(&format!("{prefix}{} root@qudata-1\r\n", k.public_line().trim()));
    }
    text.push_str(&format!("{prefix}{END}\r\n"));
    text
}

struct Case {
    _dir: tempfile::TempDir,
    keys: HostKeys,
    console: PathBuf,
}

fn case() -> Case {
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("serial.log");
    std::fs::write(&console, "booting\n").unwrap();
    let keys = HostKeys::new(dir.path().join("known_hosts"), Some(console.clone()));
    Case { _dir: dir, keys, console }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

#[test]
fn blocks_are_read_with_prefixes_and_garbage_around_them() {
    let (a, b) = (ManagementKey::generate(), ManagementKey::generate());
    let console = format!(
        "noise\n{}more noise\n{}\n{BEGIN}\nnot a key\n{END}\n{BEGIN}\n{} x\n",
        block("ec2: ", &[&a]),
        block("", &[&a, &b]),
        b.public_line().trim()
    );
    let blocks = console_key_blocks(&console);
    assert_eq!(blocks.len(), 2, "the empty and the unterminated blocks are dropped");
    assert_eq!(blocks[0], vec![public(&a)]);
    assert_eq!(blocks[1], vec![public(&a), public(&b)]);
}

#[test]
fn first_contact_waits_for_the_console_then_learns_its_keys() {
    let c = case();
    let (a, b) = (ManagementKey::generate(), ManagementKey::generate());
    assert!(matches!(c.keys.check(&public(&a)), Err(PinError::NotYet { .. })));
    assert!(!c.keys.file.exists());
    append(&c.console, &block("", &[&b, &a]));
    c.keys.check(&public(&a)).unwrap();
    assert_eq!(std::fs::metadata(&c.keys.file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(read_keys(&c.keys.file).unwrap(), vec![public(&b), public(&a)]);
    c.keys.check(&public(&b)).unwrap();
}

#[test]
fn a_key_the_console_did_not_show_is_refused() {
    let c = case();
    let (a, b) = (ManagementKey::generate(), ManagementKey::generate());
    append(&c.console, &block("", &[&a]));
    assert!(matches!(c.keys.check(&public(&b)), Err(PinError::Changed { .. })), "first contact");
    c.keys.check(&public(&a)).unwrap();
    match c.keys.check(&public(&b)) {
        Err(PinError::Changed { pinned, offered }) => {
            assert_eq!(pinned, a.fingerprint());
            assert_eq!(offered, b.fingerprint());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn changed_keys_are_learned_again_from_a_later_block() {
    let c = case();
    let (a, b) = (ManagementKey::generate(), ManagementKey::generate());
    append(&c.console, &block("", &[&a]));
    c.keys.check(&public(&a)).unwrap();
    append(&c.console, &block("", &[&b]));
    c.keys.check(&public(&b)).unwrap();
    assert_eq!(read_keys(&c.keys.file).unwrap(), vec![public(&b)]);
}

#[test]
fn a_guest_that_prints_no_keys_is_trusted_on_first_contact_once_cloud_init_is_done() {
    let c = case();
    let (a, b) = (ManagementKey::generate(), ManagementKey::generate());
    assert!(matches!(c.keys.check(&public(&a)), Err(PinError::NotYet { .. })));
    append(&c.console, "Cloud-init v. 25.1.4 finished at Sun, 06 Dec 2026 14:00:00 +0000.\n");
    c.keys.check(&public(&a)).unwrap();
    assert!(matches!(c.keys.check(&public(&b)), Err(PinError::Changed { .. })));

    let none = HostKeys::new(c.keys.file.with_extension("other"), None);
    none.check(&public(&b)).unwrap();
    none.check(&public(&b)).unwrap();
    assert!(matches!(none.check(&public(&a)), Err(PinError::Changed { .. })));
}

#[test]
fn an_unreadable_file_refuses_instead_of_learning_again() {
    let c = case();
    std::fs::write(&c.keys.file, "junk").unwrap();
    let key = public(&ManagementKey::generate());
    assert!(matches!(c.keys.check(&key), Err(PinError::Corrupt { .. })));
    forget_host_key(&c.keys.file).unwrap();
    forget_host_key(&c.keys.file).unwrap();
}
