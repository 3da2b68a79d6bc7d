//! One full decision pass over 10,000 functions in memory.
fn main() {}
