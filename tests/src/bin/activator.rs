//! `blink-activator`, built inside the test crate so tests can start it as a process
//! on the pod IPs of an activator Deployment (`CARGO_BIN_EXE_activator`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    blink_activator::main_entry();
}
