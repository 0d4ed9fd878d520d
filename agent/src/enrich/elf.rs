//! Executables, read the little that is needed: whether one is a Go program (its build info),
//! which ABI passes a function's arguments (registers since Go 1.17 on amd64, 1.18 on arm64 and
//! 1.19 on riscv64, the stack before), and the file offsets of the functions to probe. Only the headers, the
//! build info and the symbol and string tables are read, never the whole file, and never more
//! than [`READ_BUDGET`] bytes of one file: a huge or hostile executable costs the agent bounded
//! memory.

use std::{
    collections::HashSet,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

use object::{
    Endianness, Object as _, ObjectSection as _, ReadCache, ReadRef,
    read::{
        StringTable,
        elf::{ElfFile64, SectionHeader as _, Sym as _},
    },
};

/// Bytes read from one executable at most. A big Go binary's symbol and string tables are a
/// few tens of MB.
pub const READ_BUDGET: u64 = 96 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("opening: {0}")]
    Open(std::io::Error),
    #[error("not a 64-bit ELF file, or a malformed one: {0}")]
    Parse(object::read::Error),
    #[error("its string table is out of the file")]
    Strings,
    #[error("reading it would take more than {} MiB: not read", READ_BUDGET >> 20)]
    TooBig,
}

/// What an executable is, for the Go probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoBinary {
    /// `go1.19.8`, or empty when the build info does not say.
    pub version: String,
    /// Whether arguments come in registers.
    pub register_abi: bool,
    /// The wanted functions it has symbols for, with their file offsets.
    pub functions: Vec<(&'static str, u64)>,
}

/// A reader that fails once it has read `left` bytes more.
#[derive(Debug)]
struct Budget<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 && !buf.is_empty() {
            return Err(std::io::Error::other("read budget exhausted"));
        }
        let n = usize::try_from(self.left).map_or(buf.len(), |l| l.min(buf.len()));
        let read = self.inner.read(&mut buf[..n])?;
        self.left -= read as u64;
        Ok(read)
    }
}

impl<R: Seek> Seek for Budget<R> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Looks at the executable at `path` (e.g. `/proc/<pid>/exe`): `Ok(None)` when it is not a Go
/// program. `wanted` names the functions whose offsets to find.
pub fn inspect_file(path: &Path, wanted: &[&'static str]) -> Result<Option<GoBinary>, ElfError> {
    let file = std::fs::File::open(path).map_err(ElfError::Open)?;
    let cache = ReadCache::new(Budget {
        inner: file,
        left: READ_BUDGET,
    });
    let found = inspect(&cache, wanted);
    match found {
        Err(_) if cache.into_inner().left == 0 => Err(ElfError::TooBig),
        found => found,
    }
}

/// [`inspect_file`] on any readable data (a byte slice in tests).
pub fn inspect<'a, R: ReadRef<'a>>(
    data: R,
    wanted: &[&'static str],
) -> Result<Option<GoBinary>, ElfError> {
    // The symbol table is read whole here: the budget stops a huge one.
    let elf = ElfFile64::<Endianness, R>::parse(data).map_err(ElfError::Parse)?;
    let Some(buildinfo) = elf
        .section_by_name(".go.buildinfo")
        .and_then(|s| s.data().ok())
    else {
        return Ok(None);
    };
    let version = build_version(&elf, data, buildinfo).unwrap_or_default();
    let (major, minor) = go_version(&version).unwrap_or((1, 0));
    let register_abi = match elf.architecture() {
        object::Architecture::X86_64 => (major, minor) >= (1, 17),
        object::Architecture::Aarch64 => (major, minor) >= (1, 18),
        object::Architecture::Riscv64 => (major, minor) >= (1, 19),
        _ => false,
    };
    Ok(Some(GoBinary {
        version,
        register_abi,
        functions: symbol_offsets(&elf, data, wanted)?,
    }))
}

/// The file offsets of the `wanted` functions the symbol table names. The string table is read
/// once, whole (one read, not one per name).
pub fn symbol_offsets<'a, R: ReadRef<'a>>(
    elf: &ElfFile64<'a, Endianness, R>,
    data: R,
    wanted: &[&'static str],
) -> Result<Vec<(&'static str, u64)>, ElfError> {
    let endian = elf.endian();
    let table = elf.elf_symbol_table();
    let sections = elf.elf_section_table();
    let Ok(strings) = sections.section(table.string_section()) else {
        return Ok(Vec::new());
    };
    let Some((start, size)) = strings.file_range(endian) else {
        return Ok(Vec::new());
    };
    let bytes = data
        .read_bytes_at(start, size)
        .map_err(|()| ElfError::Strings)?;
    let strings = StringTable::new(bytes, 0, size);
    let mut left: HashSet<&'static str> = wanted.iter().copied().collect();
    let mut found = Vec::new();
    for sym in table.symbols() {
        if left.is_empty() {
            break;
        }
        let Ok(name) = sym.name(endian, strings) else {
            continue;
        };
        let Some(w) = left.iter().copied().find(|w| w.as_bytes() == name) else {
            continue;
        };
        // The symbol's address, within its section, to the same place in the file.
        let Ok(section) = sections.section(object::SectionIndex(sym.st_shndx(endian).into()))
        else {
            continue;
        };
        let Some((file_start, _)) = section.file_range(endian) else {
            continue;
        };
        // Both come from the file: a hostile one may put the sum past 64 bits.
        let Some(offset) = sym
            .st_value(endian)
            .checked_sub(section.sh_addr(endian))
            .and_then(|in_section| file_start.checked_add(in_section))
        else {
            continue;
        };
        left.remove(w);
        found.push((w, offset));
    }
    // In `wanted`'s order, whatever the table's.
    found.sort_by_key(|(w, _)| wanted.iter().position(|x| x == w));
    Ok(found)
}

/// The Go version in `.go.buildinfo`: inline after the 32-byte header since Go 1.18 (flag
/// bit 2), else behind a pointer to its string header (as Go's debug/buildinfo reads it).
fn build_version<'a, R: ReadRef<'a>>(
    elf: &ElfFile64<'a, Endianness, R>,
    data: R,
    info: &[u8],
) -> Option<String> {
    const MAGIC: &[u8] = b"\xff Go buildinf:";
    if !info.starts_with(MAGIC) || info.len() < 32 {
        return None;
    }
    let (ptr_size, flags) = (usize::from(info[14]), info[15]);
    if flags & 2 != 0 {
        let (len, used) = uvarint(&info[32..])?;
        let start = 32 + used;
        let bytes = info.get(start..start.checked_add(usize::try_from(len).ok()?)?)?;
        return String::from_utf8(bytes.to_vec()).ok();
    }
    // Before 1.18: a pointer to the version's string header (pointer, length).
    let little = flags & 1 == 0;
    let word = |b: &[u8]| -> Option<u64> {
        Some(match (ptr_size, little) {
            (8, true) => u64::from_le_bytes(b.get(..8)?.try_into().ok()?),
            (8, false) => u64::from_be_bytes(b.get(..8)?.try_into().ok()?),
            (4, true) => u64::from(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)),
            (4, false) => u64::from(u32::from_be_bytes(b.get(..4)?.try_into().ok()?)),
            _ => return None,
        })
    };
    // `len` bytes at virtual address `addr`, read from the file where its section lies.
    let at = |addr: u64, len: u64| -> Option<&'a [u8]> {
        elf.sections().find_map(|s| {
            let offset = addr.checked_sub(s.address())?;
            if offset >= s.size() {
                return None;
            }
            let (start, _) = s.file_range()?;
            data.read_bytes_at(start.checked_add(offset)?, len).ok()
        })
    };
    let header = at(word(&info[16..])?, ptr_size as u64 * 2)?;
    let (ptr, len) = (word(header)?, word(&header[ptr_size..])?);
    String::from_utf8(at(ptr, len.min(64))?.to_vec()).ok()
}

/// A Go unsigned varint and the bytes it took.
fn uvarint(b: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// `go1.19.8` to (1, 19); `devel go1.22-abc` to (1, 22).
fn go_version(v: &str) -> Option<(u32, u32)> {
    let rest = &v[v.find("go1.")? + 2..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_varints() {
        assert_eq!(go_version("go1.19.8"), Some((1, 19)));
        assert_eq!(go_version("devel go1.22-abc123"), Some((1, 22)));
        assert_eq!(go_version("rustc"), None);
        assert_eq!(uvarint(&[0x08]), Some((8, 1)));
        assert_eq!(uvarint(&[0x96, 0x01]), Some((150, 2)));
        assert_eq!(uvarint(&[0x80]), None);
    }

    #[test]
    fn this_test_binary_is_not_go_and_its_symbols_are_found() {
        let me = std::env::current_exe().expect("exe");
        assert_eq!(inspect_file(&me, &["main"]).expect("parses"), None);
        let data = std::fs::read(&me).expect("read");
        let elf = ElfFile64::<Endianness, &[u8]>::parse(&data[..]).expect("ELF");
        let found = symbol_offsets(&elf, &data[..], &["main", "no_such_function"]).expect("read");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].1 > 0);
    }

    /// A file larger than the budget whose first bytes are a small executable: read as far as
    /// its headers say, never to its end.
    #[test]
    fn a_huge_sparse_executable_costs_its_headers_only() {
        let small = std::fs::read("/bin/true").expect("/bin/true");
        let path = std::env::temp_dir().join(format!("nw-sparse-{}", std::process::id()));
        std::fs::write(&path, &small).expect("write");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        f.set_len(READ_BUDGET * 4).expect("sparse");
        let r = inspect_file(&path, &["runtime.fatal"]);
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(r, Ok(None)), "{r:?}");
    }
}
