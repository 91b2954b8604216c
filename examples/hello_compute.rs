//! Hello compute.
fn main() {}
