//! The `strata` node binary.

fn main() {
    println!("strata");
}
