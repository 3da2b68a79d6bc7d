//! The `blink-activator` binary: all of it lives in the library.

/// mimalloc returns the memory of a burst (thousands of held requests) to the system
/// instead of keeping it in per-thread arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    blink_activator::main_entry();
}
