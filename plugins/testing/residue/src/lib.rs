//! Looks for anything an earlier run left in its linear memory, then leaves
//! marks of its own for the next run to find: in static data (the same
//! addresses every run) and in pages it grows the memory by. Reports
//! `{"static_dirty": n, "grown_dirty": n}`, the non-zero bytes it found;
//! a fresh instance finds none.
//!
//! The marks cover 4 MiB, more than the host keeps resident per memory, so
//! both ways the host resets a memory between runs (zeroing pages in place,
//! and decommitting them) are exercised.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};

const MARKED: usize = 2 << 20;
const MARK: u8 = 0xA5;

/// Zero-initialized static data (`.bss`): every fresh instance starts with
/// it all zero.
static mut STATIC_MARKS: [u8; MARKED] = [0; MARKED];

/// Counts the non-zero bytes of `bytes`, then marks them all.
fn inspect_and_mark(bytes: &mut [u8]) -> usize {
    let dirty = bytes.iter().filter(|&&b| b != 0).count();
    bytes.fill(MARK);
    dirty
}

/// `bytes` of pages newly added to the linear memory.
#[cfg(target_arch = "wasm32")]
fn grown_pages(bytes: usize) -> Option<&'static mut [u8]> {
    const WASM_PAGE: usize = 64 << 10;
    let first_page = std::arch::wasm32::memory_grow(0, bytes.div_ceil(WASM_PAGE));
    // SAFETY: the pages were just added to the memory, and nothing else
    // (the allocator included) knows of them.
    (first_page != usize::MAX).then(|| unsafe {
        std::slice::from_raw_parts_mut((first_page * WASM_PAGE) as *mut u8, bytes)
    })
}

/// Only a wasm guest has a linear memory to grow (native builds exist for
/// the workspace's tests and lints).
#[cfg(not(target_arch = "wasm32"))]
fn grown_pages(_: usize) -> Option<&'static mut [u8]> {
    None
}

struct Residue;

impl Phase for Residue {
    fn run(_: &Context, _: &Input) -> Result<Value, PhaseError> {
        // SAFETY: a run is single-threaded and nothing else touches the
        // static; the slice covers exactly its bytes.
        let statics =
            unsafe { std::slice::from_raw_parts_mut((&raw mut STATIC_MARKS).cast::<u8>(), MARKED) };
        let static_dirty = inspect_and_mark(statics);

        let grown = grown_pages(MARKED).ok_or_else(|| PhaseError::fail("memory.grow failed"))?;
        let grown_dirty = inspect_and_mark(grown);

        Ok(json!({ "static_dirty": static_dirty, "grown_dirty": grown_dirty }))
    }
}

export_phase!(Residue);
