//! `gatevm-guest`: the init and agent of a gatevm guest. All the work lives in the library.

fn main() {
    std::process::exit(gatevm_guest::main_entry());
}
