//! `blink-activator`, built inside the test crate so tests can start it as a process
//! on the pod IPs of an activator Deployment (`CARGO_BIN_EXE_activator`), with the
//! same allocator as the shipped binary (`activator/src/main.rs` says why).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    blink_activator::main_entry();
}
