//! The `blink-scaler` binary: all of it lives in the library.

/// jemalloc: at 10,000 functions the scaler holds ~130 MB of live data in ~800,000
/// small allocations, freed and made again every second; jemalloc keeps its RSS within
/// ~40 MB of that (175 MB under steady demand), where mimalloc's grew to 200–208 MB
/// (BENCHMARKS.md, the 10,000-function runs).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    blink_scaler::main_entry();
}
