//! The guest's initramfs, in two cpio archives that QEMU gets as one file:
//!
//! 1. the base, cached per kernel: busybox, the kernel's virtio/9p modules (decompressed, in load
//!    order) and, for arm64 and riscv64, the user space that becomes the guest's root;
//! 2. per run, a small archive with `/init`, the run's parameters and the command script.
//!
//! Keeping `/init` in the second archive means changing it never invalidates the cached base.
//! The archives are written here in the kernel's `newc` format rather than with `cpio(1)`: each one
//! must start 4-byte aligned when concatenated, and building in memory avoids staging folders.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::kernels::{Arch, pipe_through};

/// Modules the guest needs to mount 9p over virtio-pci; their dependencies (netfs, fscache,
/// `virtio_ring`, ...) come along, and built-in ones are skipped.
///
/// The command's output goes over the emulated UART, not a virtio console: the latter looked
/// faster but costs a host round trip per write, which made line-buffered output 10x slower.
const MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// The guest's `/init`. It runs busybox from the initramfs; on `x86_64` it mounts the host's `/`
/// read-only and runs the command chrooted there, on arm64 and riscv64 the initramfs itself is
/// the root.
/// A failure before the command prints why and powers off without the exit marker, which the
/// host reports as a failed VM.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
fail() { echo "nodewarden-vm init: $*"; sync; poweroff -f; }
. /nodewarden/params
mount -t sysfs sysfs /sys || fail "mounting /sys"
mount -t devtmpfs devtmpfs /dev || fail "mounting /dev"
while read -r m; do
    insmod "/modules/$m.ko" || fail "insmod $m"
done < /modules/order
ip link set lo up || fail "bringing lo up"
mount9p() {
    mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144,$3" "$1" "$2" ||
        fail "mounting 9p $1 on $2"
}
R="$NW_ROOT"
if [ -n "$R" ]; then
    mkdir -p "$R"
    mount9p hostroot "$R" ro,cache=loose
    mount -t proc proc "$R/proc" || fail "mounting $R/proc"
    mount -t sysfs sysfs "$R/sys" || fail "mounting $R/sys"
    mount -t devtmpfs devtmpfs "$R/dev" || fail "mounting $R/dev"
fi
mkdir -p "$R/tmp" "$R/run" "$R/dev/pts" "$R/dev/shm"
mount -t devpts devpts "$R/dev/pts" || fail "mounting devpts"
mount -t tmpfs tmpfs "$R/dev/shm" || fail "mounting /dev/shm"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup" || fail "mounting cgroup2"
mount -t tracefs tracefs "$R/sys/kernel/tracing" || fail "mounting tracefs"
mount -t debugfs debugfs "$R/sys/kernel/debug" || fail "mounting debugfs"
mount -t bpf bpf "$R/sys/fs/bpf" || fail "mounting bpffs"
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp" || fail "mounting /tmp"
mount -t tmpfs -o mode=0755 tmpfs "$R/run" || fail "mounting /run"
# After /tmp and /run: a project checked out under either stays visible at its own path.
mkdir -p "$R$NW_PROJECT" || fail "creating $NW_PROJECT"
mount9p project "$R$NW_PROJECT" cache=mmap
cp /nodewarden/cmd.sh "$R/run/nodewarden-cmd.sh" || fail "copying the command"
if [ -n "$NW_SYSTEMD" ]; then
    # The host's systemd as PID 1, with the writable /var of a booted system, runs the command
    # as a service that prints the status on the console and powers the guest off.
    [ -n "$R" ] || fail "systemd needs the host's root"
    mount -t tmpfs -o mode=0755 tmpfs "$R/var" || fail "mounting /var"
    mkdir -p "$R/var/tmp" "$R/var/lib" "$R/var/log" "$R/var/cache" "$R/run/systemd/system"
    chmod 1777 "$R/var/tmp"
    ln -s ../run "$R/var/run"
    ln -s ../run/lock "$R/var/lock"
    cat > "$R/run/nodewarden-vm.sh" <<EOF
/bin/sh /run/nodewarden-cmd.sh </dev/null
rc=\$?
sync
echo "$NW_EXIT\$rc"
EOF
    cat > "$R/run/systemd/system/nodewarden-vm.service" <<EOF
[Unit]
Description=The command of cargo xtask vm
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate
[Service]
Type=oneshot
ExecStart=/bin/sh /run/nodewarden-vm.sh
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TimeoutStartSec=infinity
EOF
    echo "$NW_START"
    # switch_root, not chroot: a service's mount namespace must have the host's root as its
    # root, or the paths the kernel gives the agent start with $R.
    exec env -i /bin/busybox switch_root "$R" /lib/systemd/systemd \
        --unit=nodewarden-vm.service --show-status=false
fi
echo "$NW_START"
if [ -n "$R" ]; then
    env -i /bin/busybox chroot "$R" /bin/sh /run/nodewarden-cmd.sh </dev/null
else
    env -i /bin/sh /run/nodewarden-cmd.sh </dev/null
fi
rc=$?
sync
echo "$NW_EXIT$rc"
poweroff -f
"#;

/// Builds a kernel's base initramfs at `out`: busybox, the 9p modules from `modules` (the
/// kernel's `lib/modules/<release>`) and, for arm64 and riscv64, the unpacked user space
/// `userland`.
pub fn build_base(arch: Arch, modules: &Path, userland: Option<&Path>, out: &Path) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in [
        "usr/bin", "usr/sbin", "usr/lib", "proc", "sys", "dev", "root", "etc", "modules",
    ] {
        cpio.dir(dir)?;
    }
    // Merged /usr, as in current Debian: arm64 packages from either side of the move then work.
    for top in ["bin", "sbin", "lib"] {
        cpio.symlink(top, &format!("usr/{top}"))?;
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio.char_dev("dev/console", 0o600, 5, 1)?;

    match (arch, userland) {
        (Arch::X86_64, _) => {
            let busybox = fs::read("/bin/busybox").context("reading the host's /bin/busybox")?;
            cpio.file("usr/bin/busybox", 0o755, &busybox)?;
        }
        (Arch::Aarch64 | Arch::Riscv64, Some(tree)) => add_userland(&mut cpio, tree)?,
        (Arch::Aarch64 | Arch::Riscv64, None) => bail!("the {arch} guest needs a user space"),
    }

    let mut order = String::new();
    for (name, data) in module_load_order(modules)? {
        cpio.file(&format!("modules/{name}.ko"), 0o644, &data)?;
        order.push_str(&name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes())?;

    // Written aside and renamed, so a concurrent run never sees half an archive.
    let tmp = out.with_extension(format!("cpio.{}", std::process::id()));
    fs::write(&tmp, cpio.finish()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))
}

/// Adds an unpacked Debian user space (busybox, libc) to the archive, under merged /usr and
/// without `usr/share` (documentation) and glibc's gconv modules (iconv charsets, 20 MB that
/// would be copied into every run's initramfs): the guest only needs to run binaries.
fn add_userland(cpio: &mut Cpio, tree: &Path) -> Result<()> {
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            let rel = path.strip_prefix(tree)?.to_string_lossy().into_owned();
            let name = merged_usr(&rel);
            if name == "usr/share" || name.ends_with("/gconv") {
                continue;
            }
            let meta = fs::symlink_metadata(&path)?;
            if meta.is_dir() {
                cpio.dir(&name)?;
                stack.push(path);
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path)?;
                cpio.symlink(&name, &target.to_string_lossy())?;
            } else if meta.is_file() {
                let data =
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                cpio.file(&name, meta.permissions().mode() & 0o7777, &data)?;
            }
        }
    }
    Ok(())
}

/// Moves `bin`, `sbin`, `lib` and `lib64` paths under `usr/`, as Debian's merged /usr does.
fn merged_usr(rel: &str) -> String {
    let top = rel.split('/').next().unwrap_or_default();
    if ["bin", "sbin", "lib", "lib64"].contains(&top) {
        format!("usr/{rel}")
    } else {
        rel.to_owned()
    }
}

/// The modules to load, dependencies first, with their decompressed contents.
///
/// Debian's packages ship no `modules.dep` (depmod writes it when the package is installed), so
/// the dependencies come from each module's own `.modinfo` `depends=` entry.
fn module_load_order(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let builtin = fs::read_to_string(dir.join("modules.builtin"))
        .with_context(|| format!("reading {}/modules.builtin", dir.display()))?;
    let builtin: HashSet<String> = builtin.lines().map(module_name).collect();
    let mut files = HashMap::new();
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(module_name(&path.to_string_lossy()), path);
            }
        }
    }

    let modules = ModuleTree { builtin, files };
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for name in MODULES {
        modules.add(name, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// A kernel's modules: which are built in, and where the others' files are.
#[derive(Debug)]
struct ModuleTree {
    builtin: HashSet<String>,
    files: HashMap<String, PathBuf>,
}

impl ModuleTree {
    /// Appends `name` to `order` after its dependencies (depth first; modules have no cycles).
    fn add(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        if self.builtin.contains(name) || !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let path = self
            .files
            .get(name)
            .with_context(|| format!("module {name} is neither built in nor shipped"))?;
        let data = read_module(path)?;
        for dep in modinfo_depends(&data) {
            self.add(&dep, seen, order)?;
        }
        order.push((name.to_owned(), data));
        Ok(())
    }
}

/// The `depends=` entry of a module's `.modinfo` section: the modules it needs loaded first.
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(pos) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[pos + KEY.len()..];
    let value = &value[..value.iter().position(|&b| b == 0).unwrap_or(value.len())];
    String::from_utf8_lossy(value)
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// A module's name from its path: `kernel/net/9p/9pnet_virtio.ko.xz` -> `9pnet_virtio`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// A module's contents, decompressed: busybox's insmod loads plain ELF objects only.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    let tool: &[&str] = if name.ends_with(".ko") {
        return Ok(data);
    } else if name.ends_with(".xz") {
        &["xz", "-dc"]
    } else if name.ends_with(".zst") {
        &["zstd", "-dcq"]
    } else if name.ends_with(".gz") {
        &["gzip", "-dc"]
    } else {
        bail!("unknown module compression: {name}");
    };
    pipe_through(tool, &data).with_context(|| format!("decompressing {name}"))
}

/// What one run executes, and where.
#[derive(Debug)]
pub struct Plan<'a> {
    /// Mount the host's `/` read-only and chroot into it (`x86_64`), or run in the initramfs
    /// (arm64, riscv64).
    pub host_root: bool,
    /// Boot the host's systemd and run the command as its service (needs `host_root`).
    pub systemd: bool,
    /// The project folder, shared read-write at the same path.
    pub project: &'a Path,
    /// Where the command starts; the project folder when the guest cannot see it.
    pub cwd: &'a Path,
    /// The command's environment (besides what `env -i` leaves: nothing).
    pub env: &'a [(String, String)],
    pub argv: &'a [String],
    /// Lines the init prints before the command and (followed by the status) after it.
    pub start_marker: &'a str,
    pub exit_marker: &'a str,
}

/// The per-run archive: `/init`, its parameters and the command script.
pub fn command_cpio(plan: &Plan<'_>) -> Result<Vec<u8>> {
    let project = path_str(plan.project)?;
    let cwd = path_str(plan.cwd)?;
    let params = format!(
        "NW_ROOT={}\nNW_SYSTEMD={}\nNW_PROJECT={}\nNW_START={}\nNW_EXIT={}\n",
        if plan.host_root { "/newroot" } else { "''" },
        if plan.systemd { "1" } else { "''" },
        sh_quote(project),
        sh_quote(plan.start_marker),
        sh_quote(plan.exit_marker),
    );

    let mut lines = vec!["# The command of `cargo xtask vm`, run by /init.".to_owned()];
    lines.extend(
        plan.env
            .iter()
            .map(|(key, value)| format!("export {key}={}", sh_quote(value))),
    );
    let fallback = format!("xtask vm: {cwd} is not visible in the guest, running in {project}");
    lines.push(format!(
        "cd {} 2>/dev/null || {{ echo {} >&2; cd {} || exit 125; }}",
        sh_quote(cwd),
        sh_quote(&fallback),
        sh_quote(project),
    ));
    let argv: Vec<String> = plan.argv.iter().map(|a| sh_quote(a)).collect();
    lines.push(format!("exec {}", argv.join(" ")));
    let script = lines.join("\n") + "\n";

    let mut cpio = Cpio::default();
    cpio.file("init", 0o755, INIT.as_bytes())?;
    cpio.dir("nodewarden")?;
    cpio.file("nodewarden/params", 0o644, params.as_bytes())?;
    cpio.file("nodewarden/cmd.sh", 0o644, script.as_bytes())?;
    Ok(cpio.finish())
}

/// A path as UTF-8, which the shell scripts need.
fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not valid UTF-8", path.display()))
}

/// Quotes a word for a POSIX shell: single quotes, with `'` written as `'\''`.
pub fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// A `newc` cpio archive built in memory.
#[derive(Debug, Default)]
struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    /// Adds a directory and any missing parents.
    fn dir(&mut self, name: &str) -> Result<()> {
        let mut path = PathBuf::new();
        for part in Path::new(name).components() {
            let Component::Normal(part) = part else {
                bail!("bad archive path {name:?}");
            };
            path.push(part);
            let key = path.to_string_lossy().into_owned();
            if self.dirs.insert(key.clone()) {
                self.entry(&key, 0o040_755, (0, 0), &[]);
            }
        }
        Ok(())
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.parent(name)?;
        self.entry(name, 0o100_000 | perm, (0, 0), data);
        Ok(())
    }

    fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.parent(name)?;
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
        Ok(())
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.parent(name)?;
        self.entry(name, 0o020_000 | perm, (major, minor), &[]);
        Ok(())
    }

    fn parent(&mut self, name: &str) -> Result<()> {
        match Path::new(name).parent() {
            Some(p) if !p.as_os_str().is_empty() => self.dir(&p.to_string_lossy()),
            _ => Ok(()),
        }
    }

    /// One header, name and data, each padded to 4 bytes as `newc` requires.
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let name_len = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, dev major/minor, rdev major/minor,
        // namesize, check.
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name_len,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            let _ = write!(self.out, "{field:08x}");
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// Ends the archive; its length is a multiple of 4, so another archive may follow directly.
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}
