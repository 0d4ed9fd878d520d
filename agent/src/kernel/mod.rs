//! Everything that touches BPF: the loader (typed capabilities and modes), the kernel struct
//! offsets from BTF, decoding of the programs' records, the rings, the Go uprobes, and the
//! inotify fallback for limit writes without BPF.

pub mod bpf_stats;
pub mod btf;
pub mod decode;
pub mod go;
pub mod guard;
pub mod inotify;
pub mod loader;
pub mod privileges;
pub mod rings;
