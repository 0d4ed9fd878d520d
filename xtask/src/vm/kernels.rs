//! The kernel catalogue and its cache: stock Debian kernels, downloaded on first use.
//!
//! Kernels come from Debian's archive through a private apt setup (own sources list, package lists
//! and cache under `target/kernel-lab/apt/`), so other suites, arm64 and riscv64 are reachable
//! without touching the host's apt configuration, and nothing is ever installed into the host's
//! `/boot`.
//! Each kernel's folder keeps the `.deb`, the image QEMU boots and the busybox/modules initramfs,
//! plus a stamp file that says the folder is complete. The exact package is resolved when the
//! folder is first prepared; remove `target/kernel-lab/<id>` to pick up a newer one.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use super::initramfs;
use crate::setup;

/// Bumped when the cached layout (image, base initramfs) changes, so old caches get rebuilt.
const LAYOUT: &str = "5";

/// The keyring that signs Debian's suites; part of every Debian install.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Guest architectures the lab can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
    /// Not in the default test set: booted on request (`cargo xtask vm --arch riscv64`).
    #[value(name = "riscv64")]
    Riscv64,
}

impl Arch {
    /// Debian's name for the architecture.
    pub fn deb(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
            Self::Riscv64 => "riscv64",
        }
    }

    /// Host packages needed to boot and prepare guests of this architecture.
    pub fn host_packages(self) -> &'static [&'static str] {
        match self {
            // The x86_64 guest runs the host's own busybox from its initramfs.
            Self::X86_64 => &["qemu-system-x86", "busybox-static", "xz-utils", "zstd"],
            Self::Aarch64 => &["qemu-system-arm", "xz-utils", "zstd"],
            // qemu-system-data, which it pulls in, has the OpenSBI firmware (`-bios default`).
            Self::Riscv64 => &["qemu-system-misc", "xz-utils", "zstd"],
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
            Self::Riscv64 => "riscv64",
        })
    }
}

/// One entry of the catalogue: which suite's generic kernel, for which architecture.
#[derive(Debug)]
pub struct Kernel {
    pub id: &'static str,
    pub arch: Arch,
    /// The Debian suite whose `linux-image-<arch>` metapackage picks the exact package.
    suite: &'static str,
    /// Upstream series the id promises ("6.1."); checked against what the metapackage names, so
    /// a suite moving to another series fails loudly instead of silently testing something else.
    series: &'static str,
}

/// The kernels the lab knows; the first of each architecture is its default.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        id: "bookworm-6.1",
        arch: Arch::X86_64,
        suite: "bookworm",
        series: "6.1.",
    },
    Kernel {
        id: "trixie-6.12",
        arch: Arch::X86_64,
        suite: "trixie",
        series: "6.12.",
    },
    Kernel {
        id: "bullseye-5.10",
        arch: Arch::X86_64,
        suite: "bullseye",
        series: "5.10.",
    },
    Kernel {
        id: "bookworm-6.1-arm64",
        arch: Arch::Aarch64,
        suite: "bookworm",
        series: "6.1.",
    },
    // Debian's first release with riscv64 as an official architecture.
    Kernel {
        id: "trixie-6.12-riscv64",
        arch: Arch::Riscv64,
        suite: "trixie",
        series: "6.12.",
    },
];

/// The ids of the kernels of one architecture, default first (what `cargo xtask test` loops over).
pub fn kernel_ids(arch: Arch) -> Vec<&'static str> {
    KERNELS
        .iter()
        .filter(|k| k.arch == arch)
        .map(|k| k.id)
        .collect()
}

/// The default kernel of an architecture.
pub fn default_kernel(arch: Arch) -> &'static str {
    KERNELS
        .iter()
        .find(|k| k.arch == arch)
        .map_or("bookworm-6.1", |k| k.id)
}

/// Looks a kernel id up in the catalogue.
pub fn find(id: &str) -> Result<&'static Kernel> {
    KERNELS.iter().find(|k| k.id == id).with_context(|| {
        let ids: Vec<&str> = KERNELS.iter().map(|k| k.id).collect();
        format!("unknown kernel {id:?}; known: {}", ids.join(", "))
    })
}

/// A downloaded, ready-to-boot kernel.
#[derive(Debug, Clone)]
pub struct KernelPaths {
    pub id: &'static str,
    pub arch: Arch,
    /// The Debian package, e.g. `linux-image-6.1.0-37-amd64`.
    pub package: String,
    /// The package version, e.g. `6.1.140-1`.
    pub version: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-37-amd64`.
    pub release: String,
    /// What QEMU boots: the vmlinux extracted from the bzImage on `x86_64`, the Image on arm64 and
    /// riscv64.
    pub image: PathBuf,
    /// The cached base initramfs: busybox, the virtio/9p modules (and the arm64 or riscv64 user
    /// space).
    pub initramfs: PathBuf,
    /// The kernel's build configuration, for tests that check features.
    pub config: PathBuf,
}

/// The workspace root, known at compile time: the xtask crate lives in `<root>/xtask`.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where the lab keeps its downloads and builds: in the target dir, outside the source tree.
pub fn lab_dir() -> PathBuf {
    workspace_root().join("target").join("kernel-lab")
}

/// The stamp of a complete kernel folder.
fn stamp_path(dir: &Path) -> PathBuf {
    dir.join("kernel.info")
}

/// Reads a kernel folder's stamp; `None` when the folder is missing, incomplete or outdated.
pub fn cached(kernel: &'static Kernel) -> Option<KernelPaths> {
    let dir = lab_dir().join(kernel.id);
    let text = fs::read_to_string(stamp_path(&dir)).ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    if field("layout")? != LAYOUT {
        return None;
    }
    let paths = KernelPaths {
        id: kernel.id,
        arch: kernel.arch,
        package: field("package")?,
        version: field("version")?,
        release: field("release")?,
        image: dir.join(field("image")?),
        initramfs: dir.join("base.cpio"),
        config: dir.join("config"),
    };
    [&paths.image, &paths.initramfs, &paths.config]
        .iter()
        .all(|p| p.is_file())
        .then_some(paths)
}

/// Makes sure a kernel is downloaded and its base initramfs built; returns its paths.
///
/// Also installs the host tools the kernel's architecture needs (QEMU, busybox, decompressors),
/// so a caller that got `Ok` can boot it.
pub fn ensure_kernel(id: &str) -> Result<KernelPaths> {
    let kernel = find(id)?;
    setup::apt_install(kernel.arch.host_packages())?;
    if let Some(paths) = cached(kernel) {
        return Ok(paths);
    }
    setup::step(&format!("preparing kernel {id}"), || prepare(kernel))
}

/// Downloads (unless the `.deb` is already there), unpacks and builds a kernel folder.
fn prepare(kernel: &'static Kernel) -> Result<KernelPaths> {
    let dir = lab_dir().join(kernel.id);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut apt = PrivateApt::new(kernel.suite, kernel.arch)?;

    let deb = if let Some(deb) = find_deb(&dir, "linux-image-")? {
        deb
    } else {
        let meta = apt.pkg(&format!("linux-image-{}", kernel.arch.deb()));
        let package = apt.metapackage_target(&meta)?;
        if !package.starts_with(&format!("linux-image-{}", kernel.series)) {
            bail!(
                "{}'s {meta} now points to {package}, not a {}x kernel: update the catalogue",
                kernel.suite,
                kernel.series
            );
        }
        apt.download(&apt.pkg(&package), &dir)?
    };
    let (package, version) = deb_identity(&deb)?;
    eprintln!("xtask: kernel {}: {package} {version}", kernel.id);

    let unpacked = Scratch::new(&dir, "unpacked")?;
    let unpacked = unpacked.path();
    setup::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(unpacked))?;
    let (release, vmlinuz) = kernel_image(unpacked)?;
    fs::copy(
        unpacked.join("boot").join(format!("config-{release}")),
        dir.join("config"),
    )
    .context("copying the kernel config")?;

    let image = match kernel.arch {
        Arch::X86_64 => match extract_vmlinux(&vmlinuz, &dir.join("vmlinux")) {
            Ok(()) => "vmlinux",
            Err(e) => {
                // The bzImage boots too, only about 3 s slower under TCG.
                eprintln!("xtask: booting the compressed bzImage: {e:#}");
                fs::copy(&vmlinuz, dir.join("vmlinuz")).context("copying vmlinuz")?;
                "vmlinuz"
            }
        },
        // Debian's arm64 vmlinuz is the uncompressed Image already (QEMU would unpack a gzip one).
        Arch::Aarch64 => {
            fs::copy(&vmlinuz, dir.join("Image")).context("copying vmlinuz")?;
            "Image"
        }
        // Debian's riscv64 package ships the raw Image (named vmlinux, with an EFI stub header),
        // which QEMU loads as is; a gzip one it would not unpack.
        Arch::Riscv64 => {
            let data =
                fs::read(&vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
            let image = if data.starts_with(&[0x1f, 0x8b]) {
                pipe_through(&["gzip", "-dc"], &data).context("decompressing vmlinuz")?
            } else {
                data
            };
            fs::write(dir.join("Image"), image).context("writing the Image")?;
            "Image"
        }
    };

    let modules = modules_dir(unpacked, &release)?;
    let userland = match kernel.arch {
        Arch::X86_64 => None,
        Arch::Aarch64 | Arch::Riscv64 => Some(foreign_userland(&mut apt, &dir)?),
    };
    initramfs::build_base(
        kernel.arch,
        &modules,
        userland.as_ref().map(Scratch::path),
        &dir.join("base.cpio"),
    )?;

    let stamp = format!(
        "layout={LAYOUT}\npackage={package}\nversion={version}\nrelease={release}\nimage={image}\n"
    );
    let tmp = dir.join(format!("kernel.info.{}", std::process::id()));
    fs::write(&tmp, stamp).context("writing the kernel stamp")?;
    fs::rename(&tmp, stamp_path(&dir)).context("renaming the kernel stamp")?;
    cached(kernel).context("the kernel folder is incomplete after preparing it")
}

/// The user space of a guest of another architecture (arm64, riscv64): busybox and the C runtime
/// that cross-built binaries link to, unpacked into one tree. Same suite as the kernel, so its
/// glibc is at least as new as the cross toolchain's (bookworm's libc6-dev-arm64-cross and
/// libc6-dev-riscv64-cross, glibc 2.36).
fn foreign_userland(apt: &mut PrivateApt, dir: &Path) -> Result<Scratch> {
    let tree = Scratch::new(dir, "userland")?;
    let debs = dir.join("userland-debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    for name in ["busybox-static", "libc6", "libgcc-s1"] {
        let deb = match find_deb(&debs, &format!("{name}_"))? {
            Some(deb) => deb,
            None => apt.download(&apt.pkg(name), &debs)?,
        };
        setup::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(tree.path()),
        )?;
    }
    Ok(tree)
}

/// Downloads package `name` of `arch` from `suite` into `dir` through the lab's private apt (a
/// package the host's own suite lacks: bookworm has no riscv64); returns the `.deb`.
pub fn download_package(suite: &str, arch: Arch, name: &str, dir: &Path) -> Result<PathBuf> {
    let mut apt = PrivateApt::new(suite, arch)?;
    apt.download(&apt.pkg(name), dir)
}

/// Downloads the newest of packages `names` for the host (amd64) from `suite` alone (no
/// `-updates` or `-security`: a backports suite has neither) into `dir`; returns the `.deb`s.
pub fn download_from_suite(suite: &str, names: &[&str], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut apt = PrivateApt::with_sources(suite, Arch::X86_64, &[("debian", suite)])?;
    names.iter().map(|name| apt.download(name, dir)).collect()
}

/// A scratch folder (an unpacked `.deb`), removed when dropped, on success or failure. Named per
/// process so that two runs preparing the same kernel do not trip over each other.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(format!("{name}.{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A `.deb` in `dir` whose file name starts with `prefix`.
fn find_deb(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The package name and version recorded in a `.deb`.
pub fn deb_identity(deb: &Path) -> Result<(String, String)> {
    let out = setup::output(
        Command::new("dpkg-deb")
            .args(["--show", "--showformat=${Package}\n${Version}\n"])
            .arg(deb),
    )?;
    let mut lines = out.lines();
    match (lines.next(), lines.next()) {
        (Some(p), Some(v)) => Ok((p.to_owned(), v.to_owned())),
        _ => bail!("dpkg-deb --show {} printed {out:?}", deb.display()),
    }
}

/// The kernel release and the kernel file, from the name of the unpacked `boot/vmlinuz-<release>`
/// (`boot/vmlinux-<release>` in Debian's riscv64 package).
fn kernel_image(unpacked: &Path) -> Result<(String, PathBuf)> {
    let boot = unpacked.join("boot");
    for entry in fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(release) = name
            .strip_prefix("vmlinuz-")
            .or_else(|| name.strip_prefix("vmlinux-"))
        {
            return Ok((release.to_owned(), entry.path()));
        }
    }
    bail!("no vmlinuz in {}", boot.display())
}

/// The modules folder: `lib/modules/<release>` before Debian's merged-/usr move, `usr/lib/...` after.
fn modules_dir(unpacked: &Path, release: &str) -> Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d).join(release))
        .find(|d| d.join("modules.builtin").is_file())
        .with_context(|| format!("no modules for {release} in {}", unpacked.display()))
}

/// Extracts the uncompressed ELF vmlinux from an x86 bzImage (what `extract-vmlinux` does, but
/// using the boot header instead of scanning): under TCG, booting it skips the slow in-guest
/// decompression (about 3 s).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<()> {
    let image = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let u32_at = |off: usize| -> Result<usize> {
        let bytes = image.get(off..off + 4).context("bzImage too short")?;
        let mut le = [0u8; 4];
        le.copy_from_slice(bytes);
        Ok(u32::from_le_bytes(le) as usize)
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        bail!("{} has no x86 boot header", bzimage.display());
    }
    let setup_sects = match image.get(0x1f1).copied().context("bzImage too short")? {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    let payload = image
        .get(start..start + u32_at(0x24c)?)
        .context("the bzImage payload lies outside the file")?;
    let tool: &[&str] = match payload {
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => &["xz", "-dc", "--single-stream"],
        [0x28, 0xb5, 0x2f, 0xfd, ..] => &["zstd", "-dcq"],
        [0x1f, 0x8b, ..] => &["gzip", "-dc"],
        _ => bail!("unknown compression of the bzImage payload"),
    };
    // Most kernel builds append the uncompressed size (4 bytes) after the compressed stream, which
    // some decompressors call trailing garbage: try the payload as is, then without it.
    let stripped = payload
        .get(..payload.len().saturating_sub(4))
        .unwrap_or_default();
    let vmlinux = pipe_through(tool, payload)
        .or_else(|_| pipe_through(tool, stripped))
        .context("decompressing the bzImage payload")?;
    if !vmlinux.starts_with(b"\x7fELF") {
        bail!("the decompressed bzImage payload is not an ELF file");
    }
    fs::write(out, vmlinux).with_context(|| format!("writing {}", out.display()))
}

/// Runs a filter (a decompressor) over `input` and returns its output.
pub fn pipe_through(command: &[&str], input: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let (program, args) = command.split_first().context("empty command")?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {program}"))?;
    let mut stdin = child.stdin.take().context("no stdin pipe")?;
    // Feed from another thread: the filter's output would fill its pipe while we still write.
    std::thread::scope(|s| {
        let writer = s.spawn(move || stdin.write_all(input));
        let out = child
            .wait_with_output()
            .with_context(|| format!("running {program}"))?;
        let written = writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer thread panicked"))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            bail!(
                "{} failed: {}: {}",
                command.join(" "),
                out.status,
                err.trim()
            );
        }
        written.with_context(|| format!("feeding {program}"))?;
        Ok(out.stdout)
    })
}

/// apt with its own sources list, package lists and cache for one suite and architecture, so the
/// host's apt configuration and state stay untouched.
#[derive(Debug)]
struct PrivateApt {
    dir: PathBuf,
    arch: Arch,
    updated: bool,
}

impl PrivateApt {
    fn new(suite: &str, arch: Arch) -> Result<Self> {
        Self::with_sources(
            suite,
            arch,
            &[
                ("debian", suite),
                ("debian", &format!("{suite}-updates")),
                ("debian-security", &format!("{suite}-security")),
            ],
        )
    }

    /// A setup named `name` that reads only `sources`: (archive, suite) pairs of deb.debian.org.
    fn with_sources(name: &str, arch: Arch, sources: &[(&str, &str)]) -> Result<Self> {
        let dir = lab_dir().join("apt").join(format!("{name}-{}", arch.deb()));
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let opts = format!("[arch={} signed-by={KEYRING}]", arch.deb());
        let sources = sources
            .iter()
            .map(|(archive, suite)| {
                format!("deb {opts} http://deb.debian.org/{archive} {suite} main")
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        fs::write(dir.join("sources.list"), sources).context("writing the private sources list")?;
        Ok(Self {
            dir,
            arch,
            updated: false,
        })
    }

    /// The package name as apt needs it for this architecture (`name:arm64` for a foreign one).
    fn pkg(&self, name: &str) -> String {
        match self.arch {
            Arch::X86_64 => name.to_owned(),
            Arch::Aarch64 | Arch::Riscv64 => format!("{name}:{}", self.arch.deb()),
        }
    }

    /// An apt command pointed at the private setup.
    fn command(&self, prog: &str) -> Command {
        let mut cmd = Command::new(prog);
        let d = &self.dir;
        cmd.arg("-q")
            .arg(format!(
                "-oDir::Etc::sourcelist={}",
                d.join("sources.list").display()
            ))
            .arg("-oDir::Etc::sourceparts=-")
            .arg(format!("-oDir::State::Lists={}", d.join("lists").display()))
            .arg(format!("-oDir::Cache={}", d.join("cache").display()))
            // Only the Packages lists are needed: no translations, no AppStream metadata.
            .arg("-oAcquire::Languages=none")
            .arg("-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false")
            // The private folders belong to root; apt's `_apt` sandbox user could not write them.
            .arg("-oAPT::Sandbox::User=root");
        if self.arch != Arch::X86_64 {
            // Makes the foreign architecture known to this apt run only, not to dpkg.
            cmd.arg(format!("-oAPT::Architectures::={}", self.arch.deb()));
        }
        cmd
    }

    /// Fetches the suite's package lists, once per process: versions are resolved fresh.
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            let what = format!("apt-get update (private, {})", self.dir.display());
            setup::step(&what, || {
                setup::output(self.command("apt-get").arg("update")).map(drop)
            })?;
            self.updated = true;
        }
        Ok(())
    }

    /// The package a metapackage (`linux-image-amd64`) currently depends on.
    fn metapackage_target(&mut self, meta: &str) -> Result<String> {
        self.update()?;
        let show =
            setup::output(
                self.command("apt-cache")
                    .args(["show", "--no-all-versions", meta]),
            )?;
        let depends = show
            .lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .with_context(|| format!("{meta} has no Depends"))?;
        let target = depends
            .split([',', ' ', '('])
            .find(|s| s.starts_with("linux-image-"))
            .with_context(|| format!("{meta} depends on no linux-image: {depends}"))?;
        Ok(target.to_owned())
    }

    /// Downloads a package's candidate version into `dir`; returns the `.deb`.
    fn download(&mut self, pkg: &str, dir: &Path) -> Result<PathBuf> {
        self.update()?;
        let name = pkg.split(':').next().unwrap_or(pkg);
        setup::step(&format!("apt-get download {pkg}"), || {
            setup::output(
                self.command("apt-get")
                    .arg("download")
                    .arg(pkg)
                    .current_dir(dir),
            )
        })?;
        find_deb(dir, &format!("{name}_"))?
            .with_context(|| format!("apt-get download {pkg} left no .deb in {}", dir.display()))
    }
}
