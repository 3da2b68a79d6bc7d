//! `blink-scaler`, built inside the test crate so tests can start it as a process
//! (`CARGO_BIN_EXE_scaler`): two scalers with their own credentials, kill -9, restarts.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    blink_scaler::main_entry();
}
