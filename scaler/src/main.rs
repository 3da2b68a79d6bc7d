//! The `blink-scaler` binary: all of it lives in the library.

/// mimalloc returns memory after the start-up burst (thousands of workers, each with
/// its first reads and writes) that glibc's per-thread arenas keep.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    blink_scaler::main_entry();
}
