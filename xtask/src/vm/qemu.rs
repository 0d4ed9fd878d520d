//! The QEMU that boots x86_64 guests: bookworm-backports' 10.0, not bookworm's own 7.2.
//!
//! Under 7.2's TCG, a guest kernel that patches its own text with int3 (static keys and BPF
//! trampolines switched as programs attach and detach) now and then runs the instruction it had
//! already replaced: bullseye 5.10 froze in the privileges test (in 4 of 6 runs, and in the
//! second of four in a row), one vCPU looping on int3 and the other on a spinlock. 10.0 ran
//! that test four times in a row on 5.10, twice, and two whole 5.10 suites, without a stall. It
//! costs about 8% more emulation time, and trixie 6.12's `Oops: int3` still comes now and then
//! (docs/kernel-support.md).
//!
//! The packages are unpacked under `target/kernel-lab/qemu/`, never installed: the host's
//! `qemu-system-x86` (installed for the x86_64 guests anyway) brings the shared libraries, and
//! those the newer binary needs besides are installed from the host's suite. A host whose own
//! QEMU is 10 or newer uses it.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::kernels::{self, Arch};
use crate::setup;

/// The oldest QEMU the x86_64 guests run on.
const MIN_MAJOR: u32 = 10;

/// Where newer QEMU comes from, when the host's is older.
const SUITE: &str = "bookworm-backports";

/// The packages unpacked: the emulator, its firmware descriptions and option ROMs, and the BIOS.
const PACKAGES: [&str; 3] = ["qemu-system-x86", "qemu-system-data", "seabios"];

/// Bumped when what the folder holds changes.
const LAYOUT: &str = "1";

/// A QEMU to run: the program and the folders it takes its firmware from (`-L`).
#[derive(Debug, Clone)]
pub struct Qemu {
    pub program: PathBuf,
    pub data_dirs: Vec<PathBuf>,
    /// Its version, as `--version` says it.
    pub version: String,
}

impl Qemu {
    /// The command, with its firmware folders.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        for dir in &self.data_dirs {
            cmd.arg("-L").arg(dir);
        }
        cmd
    }
}

/// The QEMU for guests of `arch`: for x86_64 one of at least [`MIN_MAJOR`], unpacked on first
/// use; for the others, the host's.
pub fn for_arch(arch: Arch) -> Result<Qemu> {
    let program = match arch {
        Arch::X86_64 => "qemu-system-x86_64",
        Arch::Aarch64 => "qemu-system-aarch64",
        Arch::Riscv64 => "qemu-system-riscv64",
    };
    let host = || -> Result<Qemu> {
        Ok(Qemu {
            program: PathBuf::from(program),
            data_dirs: Vec::new(),
            version: version_of(Path::new(program))?,
        })
    };
    if arch != Arch::X86_64 {
        return host();
    }
    let system = host()?;
    if major(&system.version).is_some_and(|m| m >= MIN_MAJOR) {
        return Ok(system);
    }
    let dir = kernels::lab_dir().join("qemu");
    if let Some(qemu) = cached(&dir) {
        return Ok(qemu);
    }
    setup::step(
        &format!(
            "unpacking QEMU from {SUITE} (the host has {})",
            system.version
        ),
        || prepare(&dir),
    )
}

/// The folder's QEMU, if complete and of this layout.
fn cached(dir: &Path) -> Option<Qemu> {
    let stamp = fs::read_to_string(dir.join("qemu.info")).ok()?;
    let version = stamp
        .lines()
        .find_map(|l| l.strip_prefix("version="))?
        .to_owned();
    if !stamp.lines().any(|l| l == format!("layout={LAYOUT}")) {
        return None;
    }
    unpacked(dir, version)
}

fn unpacked(dir: &Path, version: String) -> Option<Qemu> {
    let root = dir.join("root");
    let qemu = Qemu {
        program: root.join("usr/bin/qemu-system-x86_64"),
        // The BIOS is in seabios' folder; the option ROMs that boot `-kernel` are in QEMU's.
        data_dirs: vec![root.join("usr/share/seabios"), root.join("usr/share/qemu")],
        version,
    };
    qemu.program.is_file().then_some(qemu)
}

/// Downloads and unpacks [`PACKAGES`], installs the libraries the binary lacks, and checks that
/// it runs.
fn prepare(dir: &Path) -> Result<Qemu> {
    let debs = dir.join("debs");
    if debs.exists() {
        fs::remove_dir_all(&debs).with_context(|| format!("removing {}", debs.display()))?;
    }
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let files = kernels::download_from_suite(SUITE, &PACKAGES, &debs)?;
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for deb in &files {
        setup::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    // The shared libraries it depends on, from the host's own suite (backports builds against it).
    let depends = setup::output(
        Command::new("dpkg-deb")
            .args(["--field"])
            .arg(&files[0])
            .arg("Depends"),
    )?;
    let libs = libraries(&depends);
    setup::apt_install(&libs.iter().map(String::as_str).collect::<Vec<_>>())?;
    let (_, package_version) = kernels::deb_identity(&files[0])?;
    let qemu = unpacked(dir, String::new()).context("the unpacked QEMU has no binary")?;
    let version = version_of(&qemu.program)?;
    if major(&version).is_none_or(|m| m < MIN_MAJOR) {
        bail!("{SUITE}'s qemu-system-x86 {package_version} is {version}, older than {MIN_MAJOR}");
    }
    fs::write(
        dir.join("qemu.info"),
        format!("layout={LAYOUT}\npackage={package_version}\nversion={version}\n"),
    )
    .context("writing the QEMU stamp")?;
    Ok(Qemu { version, ..qemu })
}

/// The library packages of a `Depends` field: the names, without versions or alternatives,
/// leaving out the QEMU packages unpacked beside it and its firmware.
fn libraries(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|d| d.split('|').next())
        .filter_map(|d| d.split_whitespace().next())
        .filter(|name| !name.starts_with("qemu-") && !["seabios", "ipxe-qemu"].contains(name))
        .map(str::to_owned)
        .collect()
}

/// The first line of `PROGRAM --version`, e.g. `QEMU emulator version 10.0.2 (Debian ...)`.
fn version_of(program: &Path) -> Result<String> {
    let out = setup::output(Command::new(program).arg("--version"))?;
    Ok(out.lines().next().unwrap_or_default().trim().to_owned())
}

/// The major version in a `--version` line.
fn major(version: &str) -> Option<u32> {
    version
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_major_version_of_debians_lines() {
        assert_eq!(
            major("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"),
            Some(7)
        );
        assert_eq!(
            major("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"),
            Some(10)
        );
        assert_eq!(major("no version here"), None);
    }

    #[test]
    fn the_libraries_of_a_depends_field() {
        let depends = "libaio1 (>= 0.3.93), libc6 (>= 2.34), libfoo | libbar, qemu-system-common (= 1:10.0.2), qemu-system-data (>> 1:10.0.2+ds~), seabios (>> 1.16.3-1~), ipxe-qemu";
        assert_eq!(libraries(depends), ["libaio1", "libc6", "libfoo"]);
    }
}
