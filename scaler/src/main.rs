//! The `blink-scaler` binary: all of it lives in the library.
fn main() {
    blink_scaler::main_entry();
}
