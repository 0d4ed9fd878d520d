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

/// Offsets found, the fields that were not (as `struct.field`), and the kernel functions fentry
/// and fexit programs may attach to.
#[derive(Debug)]
pub struct Resolved {
    pub offsets: KernelOffsets,
    pub missing: Vec<String>,
    pub functions: Functions,
}

/// The kernel functions of interest the BTF has, with their parameter counts: an fexit program
/// reads the result after the parameters, so one attached to a function whose parameters
/// changed would read an argument as the result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Functions(HashMap<&'static str, usize>);

impl Functions {
    /// The kernel functions the programs may attach to by BTF.
    const WANTED: [&'static [&'static str]; 4] = [
        agent_common::programs::FUTEX_FUNCTIONS[0].kernel,
        agent_common::programs::FUTEX_FUNCTIONS[1].kernel,
        agent_common::programs::FUTEX_FUNCTIONS[2].kernel,
        agent_common::programs::FUTEX_FUNCTIONS[3].kernel,
    ];

    /// `name`'s parameter count, if the kernel's BTF has the function.
    #[must_use]
    pub fn params(&self, name: &str) -> Option<usize> {
        self.0.get(name).copied()
    }
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

/// The kernel's types, its structs by name, and the wanted functions' prototypes.
struct Types {
    info: TypeInformation,
    structs: HashMap<&'static str, u32>,
    functions: HashMap<&'static str, u32>,
}

impl Types {
    fn new(info: TypeInformation) -> Self {
        let mut structs = HashMap::new();
        let mut functions = HashMap::new();
        for (id, t) in info.get() {
            match t {
                TypeVariant::Struct(s) => {
                    if !s.member_list().is_empty()
                        && let Some(name) = s.name()
                        && let Some(wanted) = STRUCTS.iter().find(|w| **w == name.as_str())
                    {
                        structs.entry(*wanted).or_insert(*id);
                    }
                }
                TypeVariant::Func(f) => {
                    if let Some(name) = f.name()
                        && let Some(wanted) = Functions::WANTED
                            .iter()
                            .flat_map(|names| names.iter())
                            .find(|w| **w == name.as_str())
                    {
                        functions.entry(*wanted).or_insert(*f.prototype_tid());
                    }
                }
                _ => {}
            }
        }
        Self {
            info,
            structs,
            functions,
        }
    }

    /// The parameter counts of the wanted functions the kernel has.
    fn functions(&self) -> Functions {
        Functions(
            self.functions
                .iter()
                .filter_map(|(name, proto)| match self.info.from_id(*proto)? {
                    TypeVariant::FuncProto(p) => Some((*name, p.parameter_list().len())),
                    _ => None,
                })
                .collect(),
        )
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
    let types = Types::new(info);
    let (offsets, missing) = offsets(&types);
    Ok(Resolved {
        offsets,
        missing,
        functions: types.functions(),
    })
}

fn offsets(types: &Types) -> (KernelOffsets, Vec<String>) {
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
    (offsets, missing)
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
        // Every futex wait function the programs expect, with the parameters they expect.
        for f in agent_common::programs::FUTEX_FUNCTIONS {
            let found = f.kernel.iter().find_map(|k| r.functions.params(k));
            assert!(
                found == Some(f.params) || (found.is_none() && !f.required),
                "{:?}: {found:?} parameters",
                f.kernel
            );
        }
    }
}
