//! The `qomu` command.

fn main() {
    let tree = qom::Tree::new();
    println!(
        "qomu {}: object tree with {} objects; the VM is not built yet",
        env!("CARGO_PKG_VERSION"),
        tree.object_count()
    );
}
