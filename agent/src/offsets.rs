//! Kernel struct offsets for the eBPF programs, read from the running kernel's BTF.
//!
//! Rust eBPF programs cannot carry CO-RE relocations, so the loader resolves each field here and
//! hands the table to the programs as a global before loading them.

use std::path::Path;

use agent_common::{KernelOffsets, OFFSET_UNKNOWN};
use btf_rs::{Btf, BtfType as _, Type};

/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A field the programs need, with the names it has had across kernel versions.
#[derive(Debug)]
struct Field {
    strukt: &'static str,
    names: &'static [&'static str],
}

/// Offsets found, and the fields that were not (as `struct.field`).
#[derive(Debug)]
pub struct Resolved {
    pub offsets: KernelOffsets,
    pub missing: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    #[error("reading kernel BTF {path}: {source}")]
    Btf { path: String, source: btf_rs::Error },
}

/// Resolves every offset from the BTF at `path`; missing fields are listed, not fatal.
pub fn resolve(path: &Path) -> Result<Resolved, OffsetsError> {
    let btf = Btf::from_file(path).map_err(|source| OffsetsError::Btf {
        path: path.display().to_string(),
        source,
    })?;
    let mut missing = Vec::new();
    let (mm_rss_counters, mm_rss_stride) = rss_counters(&btf).unwrap_or_else(|| {
        missing.push("mm_struct.rss_stat".to_owned());
        (OFFSET_UNKNOWN, OFFSET_UNKNOWN)
    });
    let mut find = |strukt: &'static str, names: &'static [&'static str]| {
        let field = Field { strukt, names };
        field_offset(&btf, &field).unwrap_or_else(|| {
            missing.push(format!("{strukt}.{}", names.join("|")));
            OFFSET_UNKNOWN
        })
    };
    let css = find("mem_cgroup", &["css"]);
    let css_cgroup = find("cgroup_subsys_state", &["cgroup"]);
    let memory = find("mem_cgroup", &["memory"]);
    let usage = find("page_counter", &["usage"]);
    let max = find("page_counter", &["max"]);
    let offsets = KernelOffsets {
        mm_rss_counters,
        mm_rss_stride,
        mem_cgroup_css_cgroup: nested(css, css_cgroup),
        mem_cgroup_usage: nested(memory, usage),
        mem_cgroup_max: nested(memory, max),
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
    };
    Ok(Resolved { offsets, missing })
}

/// The offset of a field of an embedded struct: `outer` plus `inner`, unless either is unknown.
fn nested(outer: u32, inner: u32) -> u32 {
    if outer == OFFSET_UNKNOWN || inner == OFFSET_UNKNOWN {
        OFFSET_UNKNOWN
    } else {
        outer + inner
    }
}

/// Where `mm_struct`'s RSS counters are: the first counter's value and the distance between
/// counters. Before 6.2 `rss_stat` is a `struct mm_rss_stat { atomic_long_t count[4]; }`; since
/// then an array of `struct percpu_counter`, whose `count` is the (approximate) total, the same
/// figure the kernel's own OOM report prints.
fn rss_counters(btf: &Btf) -> Option<(u32, u32)> {
    let mm = struct_named(btf, "mm_struct")?;
    let (bits, member) = member_with_offset(btf, &mm, "rss_stat", 0)?;
    let base = bits / 8;
    match btf.resolve_chained_type(&member).ok()? {
        Type::Struct(stat) => {
            let count = member_bit_offset(btf, &stat, "count", 0)? / 8;
            Some((base + count, 8))
        }
        Type::Array(array) => {
            let Type::Struct(counter) = btf.resolve_chained_type(&array).ok()? else {
                return None;
            };
            let count = member_bit_offset(btf, &counter, "count", 0)? / 8;
            Some((base + count, u32::try_from(counter.size()).ok()?))
        }
        _ => None,
    }
}

/// The struct called `name` that has members (not a forward declaration).
fn struct_named(btf: &Btf, name: &str) -> Option<btf_rs::Struct> {
    btf.resolve_types_by_name(name)
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
}

/// The byte offset of the first of `field.names` found in `field.strukt` (looking into anonymous
/// structs and unions), or `None`.
fn field_offset(btf: &Btf, field: &Field) -> Option<u32> {
    let types = btf.resolve_types_by_name(field.strukt).ok()?;
    types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => field
                .names
                .iter()
                .find_map(|name| member_bit_offset(btf, s, name, 0)),
            _ => None,
        })
        .map(|bits| bits / 8)
}

/// Searches `s` for a member called `name`, descending into anonymous members.
fn member_bit_offset(btf: &Btf, s: &btf_rs::Struct, name: &str, base: u32) -> Option<u32> {
    member_with_offset(btf, s, name, base).map(|(bits, _)| bits)
}

/// The member called `name` in `s` (descending into anonymous members) and its bit offset.
fn member_with_offset(
    btf: &Btf,
    s: &btf_rs::Struct,
    name: &str,
    base: u32,
) -> Option<(u32, btf_rs::Member)> {
    for m in &s.members {
        let m_name = btf.resolve_name(m).unwrap_or_default();
        if m_name == name {
            return Some((base + m.bit_offset(), m.clone()));
        }
        if m_name.is_empty()
            && m.get_type_id().is_some()
            && let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
            && let Some(found) = member_with_offset(btf, &inner, name, base + m.bit_offset())
        {
            return Some(found);
        }
    }
    None
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
        // comm is an array of 16 bytes somewhere after pid and tgid, which are adjacent ints.
        assert_eq!(r.offsets.task_tgid, r.offsets.task_pid + 4);
        assert!(r.offsets.task_comm > r.offsets.task_tgid);
    }
}
