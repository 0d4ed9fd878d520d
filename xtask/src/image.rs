//! `cargo xtask image`: the agent's OCI image, made without a container engine or a registry
//! (neither runs here). Its root filesystem holds the release binary; the C runtime it links
//! to, from the Debian packages it was linked against on this machine (libc6 and libgcc-s1
//! for `x86_64`, their `-arm64-cross` builds for aarch64), with their copyright files; the CA
//! certificates (for an OTLP collector over HTTPS); and the mount points a runtime fills.
//! Debian's umoci makes it an image in an OCI layout, one tag per architecture, and `latest`
//! indexes them ([`index`]); `skopeo copy --all oci:DIR:latest docker://REGISTRY/nodewarden`
//! pushes them all under one name.

mod index;

pub use index::check as check_index;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use object::{
    Endianness,
    read::elf::{Dyn as _, ElfFile64, FileHeader as _, ProgramHeader as _},
};

use crate::{
    build, setup,
    vm::{self, Arch},
};

/// Arguments of `cargo xtask image`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Architectures to build (each a tag of the layout: amd64, arm64).
    #[arg(long, value_enum, default_values = ["x86_64", "aarch64"])]
    pub arch: Vec<Arch>,
    /// The OCI layout to write: created if missing, its tags replaced.
    #[arg(long, default_value = "target/image/nodewarden")]
    pub out: PathBuf,
    /// Put this binary in the image instead of a release build (one --arch only).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Then run `nodewarden check` from each image in a VM of its architecture's default kernel.
    #[arg(long)]
    pub check: bool,
}

/// Where the entrypoint is in the image.
const ENTRYPOINT: &str = "/usr/local/bin/nodewarden";

/// What `cargo xtask image` needs from Debian (skopeo reads the index back in the tests).
pub const PACKAGES: &[&str] = &["umoci", "ca-certificates", "skopeo"];

/// An image in an OCI layout.
#[derive(Debug)]
pub struct Image {
    pub layout: PathBuf,
    pub tag: &'static str,
    /// The layers and config as stored (gzip), in bytes.
    pub compressed: u64,
    /// The root filesystem's files, in bytes.
    pub unpacked: u64,
}

impl Image {
    /// `LAYOUT:TAG`, as umoci and skopeo name it.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.layout.display(), self.tag)
    }
}

/// `cargo xtask image`.
pub fn main(args: &Args) -> Result<i32> {
    let layout = vm::workspace_root().join(&args.out);
    if args.binary.is_some() && args.arch.len() != 1 {
        bail!("--binary is for one --arch");
    }
    for &arch in &args.arch {
        install_packages(arch)?;
        let binary = match &args.binary {
            Some(b) => b.clone(),
            None => build::dist(triple(arch))?,
        };
        let image = build(arch, &binary, &layout)?;
        eprintln!(
            "xtask image: {} ({}): {:.1} MiB compressed, {:.1} MiB unpacked",
            image.reference(),
            arch,
            mib(image.compressed),
            mib(image.unpacked)
        );
        if args.check {
            check_in_vm(&image, vm::default_kernel(arch))?;
        }
    }
    if args.check {
        index::check(&layout)?;
    }
    eprintln!(
        "xtask image: push them with `skopeo copy --all oci:{}:{} docker://REGISTRY/nodewarden:TAG`",
        layout.display(),
        index::TAG
    );
    Ok(0)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "sizes far below 2^52 bytes, printed to a tenth of a MiB"
)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

/// Builds the image of `binary` (built for `arch`) as the tag `arch.deb()` of `layout`.
pub fn build(arch: Arch, binary: &Path, layout: &Path) -> Result<Image> {
    let rootfs = sibling(layout, &format!("rootfs-{}", arch.deb()))?;
    let unpacked = assemble(arch, binary, &rootfs)?;
    let tag = arch.deb();
    let reference = format!("{}:{tag}", layout.display());
    let umoci = |args: &[&str]| -> Result<()> {
        setup::run(Command::new("umoci").args(args))
            .with_context(|| format!("umoci {}", args.join(" ")))
    };
    if !layout.join("index.json").exists() {
        fs::create_dir_all(layout.parent().context("the layout has no parent")?)?;
        umoci(&["init", "--layout", &layout.display().to_string()])?;
    }
    // The tag is made anew: removing a tag that is not there fails, harmlessly.
    let _ = setup::output(Command::new("umoci").args(["rm", "--image", &reference]));
    umoci(&["new", "--image", &reference])?;
    umoci(&[
        "insert",
        "--image",
        &reference,
        &rootfs.display().to_string(),
        "/",
    ])?;
    let revision = setup::output(Command::new("git").args(["rev-parse", "HEAD"]))
        .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned());
    umoci(&[
        "config",
        "--image",
        &reference,
        "--os",
        "linux",
        "--architecture",
        tag,
        "--config.user",
        "0:0",
        "--config.entrypoint",
        ENTRYPOINT,
        "--config.cmd",
        "run",
        "--config.label",
        "org.opencontainers.image.title=nodewarden",
        "--config.label",
        &format!("org.opencontainers.image.revision={revision}"),
    ])?;
    umoci(&["gc", "--layout", &layout.display().to_string()])?;
    index::write(layout)?;
    Ok(Image {
        layout: layout.to_owned(),
        tag,
        compressed: stored_size(layout, tag)?,
        unpacked,
    })
}

/// A fresh, empty folder `name` beside `layout`.
fn sibling(layout: &Path, name: &str) -> Result<PathBuf> {
    let dir = layout.with_file_name(name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Debian's multiarch name, where this machine keeps that architecture's C runtime, and the
/// packages that install it there (the host's own, or the foreign architecture's, which the
/// aarch64 build adds; not the older `-arm64-cross` copies the cross linker uses).
fn c_runtime(arch: Arch) -> (&'static str, [&'static str; 2], &'static [&'static str]) {
    match arch {
        Arch::X86_64 => (
            "x86_64-linux-gnu",
            ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"],
            &["libc6", "libgcc-s1"],
        ),
        Arch::Aarch64 => (
            "aarch64-linux-gnu",
            ["/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu"],
            &["libc6:arm64", "libgcc-s1:arm64"],
        ),
        Arch::Riscv64 => (
            "riscv64-linux-gnu",
            ["/lib/riscv64-linux-gnu", "/usr/lib/riscv64-linux-gnu"],
            &["libc6:riscv64", "libgcc-s1:riscv64"],
        ),
    }
}

/// The packages an image for `arch` is made from; installs them.
pub fn install_packages(arch: Arch) -> Result<()> {
    if arch == Arch::Riscv64 {
        bail!(
            "no riscv64 image: bookworm has no riscv64 architecture to install its C runtime from"
        );
    }
    setup::apt_install(PACKAGES)?;
    if arch == Arch::Aarch64 {
        setup::dpkg_add_arch("arm64")?;
    }
    setup::apt_install(c_runtime(arch).2)
}

/// The Rust target of `arch`.
fn triple(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "x86_64-unknown-linux-gnu",
        Arch::Aarch64 => build::AARCH64,
        Arch::Riscv64 => build::RISCV64,
    }
}

/// Fills `rootfs`: the binary, its program interpreter and libraries with their packages'
/// copyright files, CA certificates, name lookup, and empty mount points. Returns the bytes
/// of the files.
fn assemble(arch: Arch, binary: &Path, rootfs: &Path) -> Result<u64> {
    let data = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let (machine, interpreter, needed) =
        dynamic_needs(&data).with_context(|| format!("reading {} as ELF", binary.display()))?;
    let expected = match arch {
        Arch::X86_64 => object::elf::EM_X86_64,
        Arch::Aarch64 => object::elf::EM_AARCH64,
        Arch::Riscv64 => object::elf::EM_RISCV,
    };
    if machine != expected {
        bail!("{} is not an {arch} executable", binary.display());
    }
    let (multiarch, lib_dirs, _) = c_runtime(arch);
    let mut total = 0;
    let mut copy = |from: &Path, to: &str| -> Result<()> {
        let dest = rootfs.join(to.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().context("no parent")?)?;
        // Libraries are symlinks to versioned files: the image gets the file itself.
        total += fs::copy(from, &dest)
            .with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
        Ok(())
    };
    copy(binary, ENTRYPOINT)?;
    let mut packages = vec!["ca-certificates".to_owned()];
    for name in &needed {
        let found = lib_dirs
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists())
            .with_context(|| format!("{name} ({arch}) is in none of {lib_dirs:?}"))?;
        copy(&found, &format!("/lib/{multiarch}/{name}"))?;
        packages.push(owner(&found)?);
    }
    // The kernel starts the interpreter at the path the binary names.
    let interp_name = Path::new(&interpreter)
        .file_name()
        .context("an interpreter without a name")?
        .to_string_lossy()
        .into_owned();
    if !needed.contains(&interp_name) {
        bail!("{interpreter} is not among the libraries {needed:?}");
    }
    let interp = rootfs.join(interpreter.trim_start_matches('/'));
    if !interp.exists() {
        fs::create_dir_all(interp.parent().context("no parent")?)?;
        std::os::unix::fs::symlink(format!("/lib/{multiarch}/{interp_name}"), &interp)?;
    }
    packages.sort();
    packages.dedup();
    for package in &packages {
        let copyright = Path::new("/usr/share/doc").join(package).join("copyright");
        copy(&copyright, &format!("/usr/share/doc/{package}/copyright"))?;
    }
    copy(
        Path::new("/etc/ssl/certs/ca-certificates.crt"),
        "/etc/ssl/certs/ca-certificates.crt",
    )?;
    let nsswitch = rootfs.join("etc/nsswitch.conf");
    fs::write(&nsswitch, "hosts: files dns\n")?;
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    Ok(total)
}

/// The machine, program interpreter and libraries (`DT_NEEDED`) of a 64-bit ELF executable.
fn dynamic_needs(data: &[u8]) -> Result<(u16, String, Vec<String>)> {
    let elf = ElfFile64::<Endianness>::parse(data)?;
    let endian = elf.endian();
    let header = elf.elf_header();
    let machine = header.e_machine(endian);
    let mut interpreter = None;
    for segment in header.program_headers(endian, data)? {
        if let Some(path) = segment.interpreter(endian, data)? {
            interpreter = Some(String::from_utf8_lossy(path).into_owned());
        }
    }
    let sections = header.sections(endian, data)?;
    let (dynamic, index) = sections
        .dynamic(endian, data)?
        .context("no dynamic section: a static binary needs no C runtime in the image")?;
    let strings = sections.strings(endian, data, index)?;
    let mut needed = Vec::new();
    for entry in dynamic {
        if entry.d_tag(endian) == object::elf::DT_NEEDED {
            let name = entry.string(endian, strings)?;
            needed.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok((
        machine,
        interpreter.context("no program interpreter")?,
        needed,
    ))
}

/// The Debian package that installed `path`, without its architecture. dpkg knows a library
/// by the path its package names, which is /lib/... or /usr/lib/... depending on the release:
/// both are asked.
fn owner(path: &Path) -> Result<String> {
    let usr = Path::new("/usr").join(path.strip_prefix("/").unwrap_or(path));
    let out = setup::output(Command::new("dpkg").arg("-S").arg(path))
        .or_else(|_| setup::output(Command::new("dpkg").arg("-S").arg(&usr)))?;
    let package = out
        .split(':')
        .next()
        .filter(|p| !p.is_empty() && !p.contains(' '))
        .with_context(|| format!("dpkg -S {}: {out}", path.display()))?;
    Ok(package.to_owned())
}

/// The bytes the tag's manifest points at (config and layers), as stored in the layout.
fn stored_size(layout: &Path, tag: &str) -> Result<u64> {
    let read = |digest: &str| -> Result<serde_json::Value> {
        let hex = digest
            .strip_prefix("sha256:")
            .context("not a sha256 digest")?;
        let path = layout.join("blobs/sha256").join(hex);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    };
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(layout.join("index.json"))?)?;
    let manifest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .with_context(|| format!("no tag {tag} in {}", layout.display()))?;
    let manifest = read(manifest["digest"].as_str().context("digest")?)?;
    let mut total = manifest["config"]["size"].as_u64().context("config size")?;
    for layer in manifest["layers"].as_array().context("layers")? {
        total += layer["size"].as_u64().context("layer size")?;
    }
    Ok(total)
}

/// Unpacks the image with umoci, as a runtime would get it, and returns the bundle: the root
/// filesystem in `rootfs/` and the runtime configuration with the process to start.
pub fn unpack(image: &Image) -> Result<(PathBuf, Vec<String>)> {
    let bundle = sibling(&image.layout, &format!("bundle-{}", image.tag))?;
    fs::remove_dir(&bundle)?;
    setup::run(
        Command::new("umoci")
            .args(["unpack", "--image", &image.reference()])
            .arg(&bundle),
    )?;
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(bundle.join("config.json"))?)?;
    let args = config["process"]["args"]
        .as_array()
        .context("process.args in the bundle's config.json")?
        .iter()
        .map(|a| a.as_str().map(str::to_owned).context("an argument"))
        .collect::<Result<Vec<_>>>()?;
    Ok((bundle, args))
}

/// The image unpacked by umoci, as a runtime gets it: its entrypoint runs `nodewarden check`
/// chrooted into its root filesystem in a VM of `kernel`, with /proc, /sys and /dev mounted as
/// a runtime mounts them. Returns what `check` printed; fails if it failed.
pub fn check_in_vm(image: &Image, kernel: &str) -> Result<String> {
    let (bundle, process) = unpack(image)?;
    let entrypoint = process.first().context("the image has no entrypoint")?;
    let report = image
        .layout
        .with_file_name(format!("check-{}.txt", image.tag));
    let _ = fs::remove_file(&report);
    let script = format!(
        r#"R='{rootfs}'
mount -t proc proc "$R/proc" && mount -o rbind /sys "$R/sys" && mount -o rbind /dev "$R/dev" || exit 125
chroot "$R" '{entrypoint}' check > '{report}' 2>&1"#,
        rootfs = bundle.join("rootfs").display(),
        report = report.display(),
    );
    let argv = ["sh".to_owned(), "-c".to_owned(), script];
    let status = vm::run(kernel, &vm::RunOptions::default(), &argv)?;
    let text =
        fs::read_to_string(&report).with_context(|| format!("reading {}", report.display()))?;
    eprintln!("{text}");
    eprintln!(
        "xtask: the image {} ({:.1} MiB stored, {:.1} MiB of files) ran `{entrypoint} check` in {kernel}",
        image.reference(),
        mib(image.compressed),
        mib(image.unpacked)
    );
    if status != 0 {
        bail!("`nodewarden check` from the image exited with status {status} in {kernel}");
    }
    Ok(text)
}
