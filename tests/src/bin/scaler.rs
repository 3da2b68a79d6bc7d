//! `blink-scaler`, built inside the test crate so tests can start it as a process
//! (`CARGO_BIN_EXE_scaler`): two scalers with their own credentials, kill -9, restarts.
/// The allocator `blink-scaler` has (see its `main.rs`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    blink_scaler::main_entry();
}
