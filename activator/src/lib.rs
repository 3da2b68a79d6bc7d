//! Blink's data plane.
#![forbid(unsafe_code)]
