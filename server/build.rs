//! `sqlx::migrate!` embeds `migrations/` at compile time; a new file there must rebuild the
//! crate, which Cargo only knows if told.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
