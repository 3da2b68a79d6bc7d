//! The `blink-scaler` binary.
fn main() {}
