//! The `blink-activator` binary: all of it lives in the library.

/// jemalloc: a held request's connection carries hyper's 8 KiB write buffer, allocated
/// up front and untouched until a response is written; jemalloc leaves such pages
/// unbacked, where mimalloc made every one resident (a held request cost 20.3 KB of RSS
/// under mimalloc, BENCHMARKS.md). It also returns a burst's memory to the system
/// once it has been freed for a while (its decay), rather than keeping it in arenas.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    blink_activator::main_entry();
}
