//! The probe guest: what a VM boots, cut down to the point where it can say it ran.
//!
//! q35 + the configured OVMF + the CPU model VMs get, booting a tiny EFI application from a
//! vfat disk. The application runs in long mode, computes its exit value with SSE2 and the
//! x87 FPU, and writes it to QEMU's `isa-debug-exit` port, so QEMU exits with a known status
//! only when the firmware and the instructions every guest needs really run. Opening
//! `/dev/kvm` or running real-mode bytes at the reset vector proves none of that (seen on
//! nested hosts: both pass, then OVMF dies at its first x87 instruction with a KVM emulation
//! failure).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;

use super::{Accel, AccelError, kvm_failure};
use crate::backend::qemu::argv::cpu_model;
use crate::backend::qemu::disk::Ovmf;
use crate::backend::qemu::vfat;

/// What a probe saw.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ProbeOutcome {
    /// The probe application ran and wrote the expected value.
    Works,
    /// It did not; `detail` says how, in QEMU's words where it gave some.
    Fails { detail: String },
}

/// The value the application computes (21 doubled with SSE2, plus one and minus one on the
/// x87 stack) and writes to the debug-exit port.
pub const PROBE_VALUE: u8 = 42;

/// QEMU's exit status after that write: `isa-debug-exit` exits with `(value << 1) | 1`.
pub const PROBE_EXIT_CODE: i32 = ((PROBE_VALUE as i32) << 1) | 1;

/// The application's code (x86-64, position independent, no calls, no data):
/// ```text
/// mov eax, 21; cvtsi2sd xmm0, eax; addsd xmm0, xmm0; cvttsd2si eax, xmm0   ; SSE2: 42
/// sub rsp, 16; mov [rsp], eax
/// fninit; fild dword [rsp]; fld1; faddp st1, st0; fistp dword [rsp]      ; x87: 43
/// mov eax, [rsp]; dec eax; add rsp, 16                                     ; 42
/// out 0xf4, al                                                             ; QEMU exits
/// spin: hlt; jmp spin
/// ```
#[rustfmt::skip]
pub const PROBE_CODE: &[u8] = &[
    0xb8, 0x15, 0x00, 0x00, 0x00,
    0xf2, 0x0f, 0x2a, 0xc0,
    0xf2, 0x0f, 0x58, 0xc0,
    0xf2, 0x0f, 0x2c, 0xc0,
    0x48, 0x83, 0xec, 0x10,
    0x89, 0x04, 0x24,
    0xdb, 0xe3,
    0xdb, 0x04, 0x24,
    0xd9, 0xe8,
    0xde, 0xc1,
    0xdb, 0x1c, 0x24,
    0x8b, 0x04, 0x24,
    0xff, 0xc8,
    0x48, 0x83, 0xc4, 0x10,
    0xe6, 0xf4,
    0xf4, 0xeb, 0xfd,
];

const FILE_ALIGN: usize = 0x200;
const SECTION_RVA: u32 = 0x1000;
/// PE32+ optional header with 16 data directories.
const OPTIONAL_HEADER_LEN: u16 = 240;

/// [`PROBE_CODE`] as a PE32+ EFI application: one `.text` section at RVA 0x1000, no
/// relocations needed (the code uses no absolute address) and none claimed stripped, so the
/// firmware may load it anywhere.
pub fn probe_efi() -> Vec<u8> {
    let mut image = vec![0u8; 2 * FILE_ALIGN];
    image[0..2].copy_from_slice(b"MZ");
    put32(&mut image, 0x3c, 0x40); // e_lfanew
    let mut at = 0x40;
    image[at..at + 4].copy_from_slice(b"PE\0\0");
    at += 4;
    // COFF header: x86-64, one section, executable and large-address aware.
    at = put16(&mut image, at, 0x8664);
    at = put16(&mut image, at, 1);
    at += 12; // time stamp, symbol table, symbol count
    at = put16(&mut image, at, OPTIONAL_HEADER_LEN);
    at = put16(&mut image, at, 0x0022);
    let optional = at;
    at = put16(&mut image, at, 0x020b); // PE32+
    at += 2; // linker version
    at = put32(&mut image, at, FILE_ALIGN as u32); // size of code
    at += 8; // initialised and uninitialised data
    at = put32(&mut image, at, SECTION_RVA); // entry point
    at = put32(&mut image, at, SECTION_RVA); // base of code
    at = put64(&mut image, at, 0x1_4000_0000); // preferred image base
    at = put32(&mut image, at, SECTION_RVA); // section alignment
    at = put32(&mut image, at, FILE_ALIGN as u32);
    at += 16; // OS, image and subsystem versions, Win32 version value
    at = put32(&mut image, at, 2 * SECTION_RVA); // size of image
    at = put32(&mut image, at, FILE_ALIGN as u32); // size of headers
    at += 4; // checksum
    at = put16(&mut image, at, 10); // subsystem: EFI application
    at += 2; // DLL characteristics
    for size in [0x10000u64, 0x1000, 0x10000, 0x1000] {
        at = put64(&mut image, at, size); // stack and heap reserve, commit
    }
    at += 4; // loader flags
    put32(&mut image, at, 16); // number of data directories (all empty)
    // Section header.
    at = optional + usize::from(OPTIONAL_HEADER_LEN);
    image[at..at + 5].copy_from_slice(b".text");
    at += 8;
    at = put32(&mut image, at, PROBE_CODE.len() as u32); // virtual size
    at = put32(&mut image, at, SECTION_RVA);
    at = put32(&mut image, at, FILE_ALIGN as u32); // size of raw data
    at = put32(&mut image, at, FILE_ALIGN as u32); // pointer to raw data
    at += 12; // relocations, line numbers and their counts
    put32(&mut image, at, 0x6000_0020); // code, execute, read
    image[FILE_ALIGN..FILE_ALIGN + PROBE_CODE.len()].copy_from_slice(PROBE_CODE);
    image
}

fn put16(image: &mut [u8], at: usize, value: u16) -> usize {
    image[at..at + 2].copy_from_slice(&value.to_le_bytes());
    at + 2
}

fn put32(image: &mut [u8], at: usize, value: u32) -> usize {
    image[at..at + 4].copy_from_slice(&value.to_le_bytes());
    at + 4
}

fn put64(image: &mut [u8], at: usize, value: u64) -> usize {
    image[at..at + 8].copy_from_slice(&value.to_le_bytes());
    at + 8
}

/// The probe's files: the firmware variables copy and the EFI disk.
pub struct ProbeFiles {
    pub vars: PathBuf,
    pub esp: PathBuf,
}

/// The probe's command line (after the program name): machine, firmware and CPU model as VMs
/// get them (see `argv`), the EFI disk, and the debug-exit port.
pub fn probe_argv(accel: Accel, ovmf_code: &Path, files: &ProbeFiles) -> Vec<String> {
    let machine = format!("q35,accel={}", accel.as_str());
    let code = format!("if=pflash,format=raw,unit=0,readonly=on,file={}", opt_path(ovmf_code));
    let vars = format!("if=pflash,format=raw,unit=1,file={}", opt_path(&files.vars));
    let esp = format!("if=virtio,format=raw,readonly=on,file={}", opt_path(&files.esp));
    let argv = [
        "-machine",
        &machine,
        "-cpu",
        cpu_model(accel),
        "-m",
        "256M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-drive",
        &code,
        "-drive",
        &vars,
        "-drive",
        &esp,
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ];
    argv.iter().map(|s| s.to_string()).collect()
}

fn opt_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// Size of the probe's EFI disk (FAT12 wants a few hundred KiB at least).
const ESP_KIB: u64 = 1024;

/// Writes the probe's files into `dir` (which must exist and be private).
async fn write_files(dir: &Path, ovmf: &Ovmf) -> Result<ProbeFiles, AccelError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| AccelError::Write { path, source }
    };
    let efi = dir.join("BOOTX64.EFI");
    std::fs::write(&efi, probe_efi()).map_err(write_err(&efi))?;
    let vars = dir.join("OVMF_VARS.fd");
    std::fs::copy(&ovmf.vars_template, &vars).map_err(write_err(&vars))?;
    let esp = dir.join("esp.img");
    let tool = |e: vfat::VfatError| AccelError::Write {
        path: e.path.clone(),
        source: std::io::Error::other(e.to_string()),
    };
    vfat::run("mkfs.vfat", &vfat::mkfs_argv(&esp, "PROBE", ESP_KIB), &esp).await.map_err(tool)?;
    vfat::run("mmd", &vfat::mmd_argv(&esp, &["EFI", "EFI/BOOT"]), &esp).await.map_err(tool)?;
    vfat::run("mcopy", &vfat::mcopy_argv(&esp, &[efi], "::/EFI/BOOT"), &esp).await.map_err(tool)?;
    Ok(ProbeFiles { vars, esp })
}

/// Boots the probe under `accel` with its files in a fresh directory below `work_dir`, and
/// reports whether it ran. QEMU is killed and reaped at `deadline`, or as soon as its output
/// shows a KVM failure (a VM in KVM's `internal-error` state waits forever otherwise).
pub async fn run_probe(
    qemu: &Path,
    ovmf: &Ovmf,
    accel: Accel,
    work_dir: &Path,
    deadline: Duration,
) -> Result<ProbeOutcome, AccelError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = work_dir.join(format!("accel-probe-{}-{n}", std::process::id()));
    crate::fsutil::ensure_private_dir(&dir).map_err(|e| AccelError::Write {
        path: dir.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let outcome = match write_files(&dir, ovmf).await {
        Ok(files) => probe_with(qemu, &probe_argv(accel, &ovmf.code, &files), deadline).await,
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// QEMU's stderr kept for the failure detail.
const STDERR_LIMIT: u64 = 8 << 10;

pub(super) async fn probe_with(
    qemu: &Path,
    argv: &[String],
    deadline: Duration,
) -> Result<ProbeOutcome, AccelError> {
    let mut child = Command::new(qemu)
        .args(argv)
        .env_clear()
        .envs(crate::child_env::for_child())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| AccelError::Spawn { binary: qemu.to_owned(), source })?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr.take(STDERR_LIMIT)).lines();
    let watch = async move {
        // Ends at EOF (QEMU exited) or on the first line that names a KVM failure.
        let mut said = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            said.push_str(&line);
            said.push('\n');
            if let Some(failure) = kvm_failure(&said) {
                return (Some(failure), said);
            }
        }
        (None, said)
    };
    let outcome = tokio::time::timeout(deadline, async {
        let (failure, said) = watch.await;
        if let Some(failure) = failure {
            return ProbeOutcome::Fails { detail: failure };
        }
        match child.wait().await {
            Ok(status) if status.code() == Some(PROBE_EXIT_CODE) => ProbeOutcome::Works,
            Ok(status) => {
                let words = said.trim();
                let words = if words.is_empty() { "no output" } else { words };
                ProbeOutcome::Fails { detail: format!("QEMU exited with {status}: {words}") }
            }
            Err(e) => ProbeOutcome::Fails { detail: format!("waiting for QEMU failed: {e}") },
        }
    })
    .await
    .unwrap_or_else(|_| ProbeOutcome::Fails {
        detail: format!(
            "OVMF did not run the probe's EFI application within {} ms",
            deadline.as_millis()
        ),
    });
    // SIGKILL (a no-op once it exited) and reap.
    let _ = child.kill().await;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_efi_image_is_a_pe32_plus_application() {
        let image = probe_efi();
        assert_eq!(image.len(), 0x400);
        assert_eq!(&image[0..2], b"MZ");
        assert_eq!(&image[0x40..0x44], b"PE\0\0");
        let u16_at = |at: usize| u16::from_le_bytes([image[at], image[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
        assert_eq!(u16_at(0x44), 0x8664, "machine");
        assert_eq!(u16_at(0x46), 1, "sections");
        assert_eq!(u16_at(0x54), 240, "optional header size");
        assert_eq!(u16_at(0x56) & 0x0001, 0, "relocations are not stripped");
        assert_eq!(u16_at(0x58), 0x020b, "PE32+");
        assert_eq!(u32_at(0x58 + 16), 0x1000, "entry point");
        assert_eq!(u32_at(0x58 + 56), 0x2000, "size of image");
        assert_eq!(u16_at(0x58 + 68), 10, "EFI application");
        assert_eq!(u32_at(0x58 + 108), 16, "data directories");
        assert!(image[0x58 + 112..0x58 + 240].iter().all(|b| *b == 0), "no data directory");
        let section = 0x58 + 240;
        assert_eq!(&image[section..section + 8], b".text\0\0\0");
        assert_eq!(u32_at(section + 36), 0x6000_0020);
        assert_eq!(&image[0x200..0x200 + PROBE_CODE.len()], PROBE_CODE);
        assert_eq!(PROBE_EXIT_CODE, 85);
    }

    #[test]
    fn probe_argv_is_exact() {
        let files = ProbeFiles { vars: "/r/p/OVMF_VARS.fd".into(), esp: "/r/p/esp.img".into() };
        let argv = probe_argv(Accel::Kvm, Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd"), &files);
        #[rustfmt::skip]
        let expected = [
            "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256M", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot",
            "-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
            "-drive", "if=pflash,format=raw,unit=1,file=/r/p/OVMF_VARS.fd",
            "-drive", "if=virtio,format=raw,readonly=on,file=/r/p/esp.img",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ];
        assert_eq!(argv, expected);
    }

    fn host_ovmf() -> Ovmf {
        crate::backend::qemu::disk::detect_ovmf(
            None,
            None,
            crate::backend::qemu::disk::OVMF_CANDIDATES,
        )
        .expect("OVMF (the test suite installs the ovmf package)")
    }

    /// The probe application really runs where the firmware does: under TCG (which always
    /// works) OVMF boots it from the vfat disk and QEMU exits with the computed value.
    #[tokio::test]
    async fn the_probe_boots_through_ovmf_under_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = Path::new("qemu-system-x86_64");
        let outcome =
            run_probe(qemu, &host_ovmf(), Accel::Tcg, dir.path(), Duration::from_secs(120))
                .await
                .unwrap();
        assert_eq!(outcome, ProbeOutcome::Works);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "probe files left behind");
    }

    /// Firmware that never reaches the application is killed at the deadline.
    #[tokio::test]
    async fn a_probe_that_never_answers_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let halt = dir.path().join("halt.fd");
        std::fs::write(&halt, vec![0xf4; 0x10000]).unwrap(); // hlt at the reset vector
        let ovmf = Ovmf { code: halt.clone(), vars_template: halt };
        let qemu = Path::new("qemu-system-x86_64");
        let outcome = run_probe(qemu, &ovmf, Accel::Tcg, dir.path(), Duration::from_millis(1500))
            .await
            .unwrap();
        let detail = "OVMF did not run the probe's EFI application within 1500 ms";
        assert_eq!(outcome, ProbeOutcome::Fails { detail: detail.into() });
    }

    #[tokio::test]
    async fn a_missing_qemu_is_a_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("no-such-qemu");
        let err = run_probe(&qemu, &host_ovmf(), Accel::Tcg, dir.path(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("set QUDATA_QEMU_BINARY"), "{err}");
    }
}
