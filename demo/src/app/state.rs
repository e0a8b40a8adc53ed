//! The application's read-only state: a lookup table, in the memory the run asks for.

/// The lookup table's entry `index`: a cheap hash, so filling the table costs CPU like loading
/// real application data, and the client can check every value.
pub fn table_value(index: u64) -> u64 {
    let mut z = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Entries in a table of `mib` MiB.
pub fn table_len(mib: usize) -> u64 {
    (mib * 1024 * 1024 / 8).max(1) as u64
}

/// Where the application's read-only state lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateMemory {
    /// A `Vec` on the heap, as most applications hold what they load: private memory that a
    /// fork shares copy-on-write, so `fork()` copies a page-table entry per 4 KiB page (5–8 ms
    /// for 256 MiB on the machines in the README) and a worker's exit tears them down again.
    Heap,
    /// Private memory like the heap's, in transparent huge pages (`madvise(MADV_HUGEPAGE)`):
    /// still shared copy-on-write, but a fork copies one entry per 2 MiB, 512 times fewer,
    /// and a worker's exit tears down as few.
    Huge,
    /// A shared anonymous mapping, made read-only once filled: a fork copies no page-table
    /// entries for it (a worker maps the pages it reads on first touch), so forking and
    /// reaping a worker cost the same whatever the state's size.
    Shared,
}

impl StateMemory {
    const ALL: [StateMemory; 3] = [StateMemory::Heap, StateMemory::Huge, StateMemory::Shared];

    pub fn name(self) -> &'static str {
        match self {
            StateMemory::Heap => "heap",
            StateMemory::Huge => "huge",
            StateMemory::Shared => "shared",
        }
    }

    pub fn parse(name: &str) -> Result<StateMemory, String> {
        StateMemory::ALL
            .into_iter()
            .find(|memory| memory.name() == name)
            .ok_or_else(|| format!("unknown state memory {name:?} (heap, huge or shared)"))
    }
}

/// The lookup table, in the memory the run asked for.
pub enum Table {
    Heap(Vec<u64>),
    Mapped(MappedTable),
}

impl Table {
    pub fn build(memory: StateMemory, len: u64) -> Result<Table, String> {
        Ok(match memory {
            StateMemory::Heap => Table::Heap((0..len).map(table_value).collect()),
            StateMemory::Huge => Table::Mapped(MappedTable::build(len as usize, Mapping::Huge)?),
            StateMemory::Shared => {
                Table::Mapped(MappedTable::build(len as usize, Mapping::Shared)?)
            }
        })
    }

    pub fn entries(&self) -> &[u64] {
        match self {
            Table::Heap(entries) => entries,
            Table::Mapped(table) => table.entries(),
        }
    }
}

/// `bytes` of fresh, zeroed, writable memory shared with every process later forked from this
/// one (`MAP_SHARED | MAP_ANONYMOUS`), page-aligned; never freed unless the caller unmaps it.
pub fn map_shared_anonymous(bytes: usize) -> Result<std::ptr::NonNull<libc::c_void>, String> {
    map_anonymous(bytes, libc::MAP_SHARED)
}

fn map_anonymous(
    bytes: usize,
    sharing: libc::c_int,
) -> Result<std::ptr::NonNull<libc::c_void>, String> {
    // SAFETY: an anonymous mapping with no address hint has no preconditions; the result is
    // checked against MAP_FAILED before use.
    let start = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            sharing | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if start == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    std::ptr::NonNull::new(start).ok_or_else(|| String::from("mmap returned null"))
}

/// The two mappings a [`MappedTable`] can live in.
#[derive(Clone, Copy)]
enum Mapping {
    /// `MAP_SHARED`: forks copy no page-table entries.
    Shared,
    /// `MAP_PRIVATE` with `MADV_HUGEPAGE`: forks copy one entry per 2 MiB.
    Huge,
}

/// `len` table entries in an anonymous mapping of their own, read-only once filled.
pub struct MappedTable {
    start: std::ptr::NonNull<u64>,
    len: usize,
}

// SAFETY: the mapping is read-only after `build` and only freed by `Drop`, so sharing `&[u64]`
// views of it between threads is sound, as for a `Vec<u64>` nobody mutates.
unsafe impl Send for MappedTable {}
// SAFETY: as above.
unsafe impl Sync for MappedTable {}

impl MappedTable {
    fn build(len: usize, mapping: Mapping) -> Result<MappedTable, String> {
        let bytes = (len * 8).max(1);
        let start = match mapping {
            Mapping::Shared => map_anonymous(bytes, libc::MAP_SHARED)?,
            Mapping::Huge => {
                let start = map_anonymous(bytes, libc::MAP_PRIVATE)?;
                // SAFETY: advice on the whole of the mapping just made; it changes how pages
                // are backed, never their contents.
                if unsafe { libc::madvise(start.as_ptr(), bytes, libc::MADV_HUGEPAGE) } != 0 {
                    return Err(format!(
                        "madvise(MADV_HUGEPAGE): {} (is /sys/kernel/mm/transparent_hugepage/enabled \"never\"?)",
                        std::io::Error::last_os_error()
                    ));
                }
                start
            }
        };
        let table = MappedTable {
            start: start.cast(),
            len,
        };
        // SAFETY: the mapping is `bytes` long, page-aligned, writable, and referenced by
        // nothing else yet; the slice lives only until `mprotect` below.
        let entries = unsafe { std::slice::from_raw_parts_mut(table.start.as_ptr(), len) };
        for (index, entry) in entries.iter_mut().enumerate() {
            *entry = table_value(index as u64);
        }
        // SAFETY: the same mapping; no `&mut` to it outlives this point.
        if unsafe { libc::mprotect(start.as_ptr().cast(), bytes, libc::PROT_READ) } != 0 {
            return Err(format!("mprotect: {}", std::io::Error::last_os_error()));
        }
        Ok(table)
    }

    fn entries(&self) -> &[u64] {
        // SAFETY: `len` initialised entries, read-only and mapped until `self` is dropped.
        unsafe { std::slice::from_raw_parts(self.start.as_ptr(), self.len) }
    }
}

impl Drop for MappedTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `build`, of that size; no borrow of it outlives `self`.
        unsafe { libc::munmap(self.start.as_ptr().cast(), (self.len * 8).max(1)) };
    }
}
