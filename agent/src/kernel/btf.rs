//! Kernel struct offsets for the eBPF programs, read from the running kernel's BTF.
//!
//! Rust eBPF programs cannot carry CO-RE relocations, so the loader resolves each field here and
//! hands the table to the programs as a global before loading them. The BTF is parsed with
//! `btfparse` (aya's own parser keeps its type accessors crate-private).

use std::{collections::HashMap, path::Path};

use agent_common::{KernelOffsets, OFFSET_UNKNOWN};
use btfparse::{Offset, Readable, TypeInformation, TypeVariant};

/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Offsets found, and the fields that were not (as `struct.field`).
#[derive(Debug)]
pub struct Resolved {
    pub offsets: KernelOffsets,
    pub missing: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading kernel BTF {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing kernel BTF {path}: {message}")]
    Parse { path: String, message: String },
}

/// The BTF file, in memory (one read; the parser reads it in small pieces).
struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let part = usize::try_from(offset)
            .ok()
            .and_then(|start| self.0.get(start..start.checked_add(buffer.len())?))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buffer.copy_from_slice(part);
        Ok(())
    }
}

/// The structs the programs read, by name, each its defining type (not a declaration).
const STRUCTS: [&str; 17] = [
    "task_struct",
    "css_set",
    "cgroup",
    "kernfs_node",
    "kernfs_open_file",
    "files_struct",
    "fdtable",
    "file",
    "inode",
    "super_block",
    "signal_struct",
    "mm_struct",
    "oom_control",
    "mem_cgroup",
    "linux_binprm",
    "percpu_counter",
    "mm_rss_stat",
];

/// The kernel's types, and its structs by name.
struct Types {
    info: TypeInformation,
    structs: HashMap<&'static str, u32>,
}

impl Types {
    fn new(info: TypeInformation) -> Self {
        let mut structs = HashMap::new();
        for (id, t) in info.get() {
            if let TypeVariant::Struct(s) = t
                && !s.member_list().is_empty()
                && let Some(name) = s.name()
                && let Some(wanted) = STRUCTS.iter().find(|w| **w == name.as_str())
            {
                structs.entry(*wanted).or_insert(*id);
            }
        }
        Self { info, structs }
    }

    /// The byte offset of `path` (`field`, `a.b`, `a[1].b`; anonymous members looked into) in
    /// struct `strukt`; `None` when the kernel has no such field, or it is a bit field.
    fn offset(&self, strukt: &str, path: &str) -> Option<u32> {
        let id = *self.structs.get(strukt)?;
        match self.info.offset_of(id, path).ok()?.1 {
            Offset::ByteOffset(n) => Some(n),
            Offset::BitOffsetAndSize(..) => None,
        }
    }
}

/// Resolves every offset from the BTF at `path`; missing fields are listed, not fatal.
pub fn resolve(path: &Path) -> Result<Resolved, BtfError> {
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let info = TypeInformation::new(&Bytes(data)).map_err(|e| BtfError::Parse {
        path: path.display().to_string(),
        message: format!("{e:?}"),
    })?;
    Ok(offsets(&Types::new(info)))
}

fn offsets(types: &Types) -> Resolved {
    let mut missing = Vec::new();
    let (mm_rss_counters, mm_rss_stride) = rss_counters(types).unwrap_or_else(|| {
        missing.push("mm_struct.rss_stat".to_owned());
        (OFFSET_UNKNOWN, OFFSET_UNKNOWN)
    });
    // The first of `paths` the kernel has (fields are renamed across versions).
    let mut find = |strukt: &str, paths: &[&str]| {
        paths
            .iter()
            .find_map(|p| types.offset(strukt, p))
            .unwrap_or_else(|| {
                missing.push(format!("{strukt}.{}", paths.join("|")));
                OFFSET_UNKNOWN
            })
    };
    let offsets = KernelOffsets {
        mm_rss_counters,
        mm_rss_stride,
        mem_cgroup_css_cgroup: find("mem_cgroup", &["css.cgroup"]),
        mem_cgroup_usage: find("mem_cgroup", &["memory.usage"]),
        mem_cgroup_max: find("mem_cgroup", &["memory.max"]),
        task_mm: find("task_struct", &["mm"]),
        task_signal: find("task_struct", &["signal"]),
        signal_oom_score_adj: find("signal_struct", &["oom_score_adj"]),
        mm_total_vm: find("mm_struct", &["total_vm"]),
        oom_control_memcg: find("oom_control", &["memcg"]),
        oom_control_constraint: find("oom_control", &["constraint"]),
        oom_control_totalpages: find("oom_control", &["totalpages"]),
        task_pid: find("task_struct", &["pid"]),
        task_tgid: find("task_struct", &["tgid"]),
        task_comm: find("task_struct", &["comm"]),
        task_cgroups: find("task_struct", &["cgroups"]),
        css_set_dfl_cgrp: find("css_set", &["dfl_cgrp"]),
        cgroup_kn: find("cgroup", &["kn"]),
        kernfs_node_id: find("kernfs_node", &["id"]),
        // Renamed to __parent in 6.15 when it became RCU-protected.
        kernfs_node_parent: find("kernfs_node", &["parent", "__parent"]),
        kernfs_open_file_kn: find("kernfs_open_file", &["kn"]),
        kernfs_node_name: find("kernfs_node", &["name"]),
        task_files: find("task_struct", &["files"]),
        files_struct_fdt: find("files_struct", &["fdt"]),
        fdtable_max_fds: find("fdtable", &["max_fds"]),
        fdtable_fd: find("fdtable", &["fd"]),
        files_struct_fdtab: find("files_struct", &["fdtab"]),
        files_struct_fd_array: find("files_struct", &["fd_array"]),
        file_f_inode: find("file", &["f_inode"]),
        inode_i_sb: find("inode", &["i_sb"]),
        super_block_s_magic: find("super_block", &["s_magic"]),
        inode_i_private: find("inode", &["i_private"]),
        linux_binprm_file: find("linux_binprm", &["file"]),
        inode_i_ino: find("inode", &["i_ino"]),
        super_block_s_dev: find("super_block", &["s_dev"]),
        mm_exe_file: find("mm_struct", &["exe_file"]),
        task_real_parent: find("task_struct", &["real_parent"]),
        file_f_mode: find("file", &["f_mode"]),
    };
    Resolved { offsets, missing }
}

/// Where `mm_struct`'s RSS counters are: the first counter's value and the distance between
/// counters. Before 6.2 `rss_stat` is a `struct mm_rss_stat { atomic_long_t count[4]; }`; since
/// then an array of `struct percpu_counter`, whose `count` is the (approximate) total, the same
/// figure the kernel's own OOM report prints.
fn rss_counters(types: &Types) -> Option<(u32, u32)> {
    [
        ("rss_stat[0].count", "rss_stat[1].count"),
        ("rss_stat.count[0]", "rss_stat.count[1]"),
    ]
    .iter()
    .find_map(|(first, second)| {
        let a = types.offset("mm_struct", first)?;
        let b = types.offset("mm_struct", second)?;
        Some((a, b.checked_sub(a)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the BTF of the kernel the tests run on: every field the programs use must be there
    /// on any kernel we support (5.10 and later), so none may be missing.
    #[test]
    fn running_kernel_has_every_field() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("SKIP: {VMLINUX_BTF} does not exist on this kernel");
            return;
        }
        let r = resolve(Path::new(VMLINUX_BTF)).expect("BTF parses");
        assert!(r.missing.is_empty(), "missing: {:?}", r.missing);
        let o = r.offsets;
        // comm is an array of 16 bytes somewhere after pid and tgid, which are adjacent ints.
        assert_eq!(o.task_tgid, o.task_pid + 4);
        assert!(o.task_comm > o.task_tgid);
        // The RSS counters are 64-bit counts, one after another or a percpu_counter apart.
        assert!(o.mm_rss_stride >= 8, "{}", o.mm_rss_stride);
        // max_fds and the fd array pointer are adjacent on every supported kernel.
        assert_eq!(o.fdtable_fd, o.fdtable_max_fds + 8);
    }
}
