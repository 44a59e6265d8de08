//! A tour of the living image (filled in as batos-store lands).

fn main() {
    println!("batos living image example");
}
