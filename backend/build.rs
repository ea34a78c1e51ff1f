// Compile the artifact schema with protox (pure Rust), so no `protoc` is needed.
fn main() {
    println!("cargo:rerun-if-changed=proto/veil.proto");
    let fds = protox::compile(["proto/veil.proto"], ["proto"]).expect("proto/veil.proto compiles");
    prost_build::Config::new().compile_fds(fds).expect("prost code generation");
}
