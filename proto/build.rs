//! Compiles `proto/wset/v1/*.proto` with protox (pure Rust, no system protoc)
//! and writes the descriptor set that feeds server reflection.

use std::path::PathBuf;

fn main() {
    let files = [
        "proto/wset/v1/agent.proto",
        "proto/wset/v1/controller.proto",
        "proto/wset/v1/scheduler.proto",
        "proto/wset/v1/replica.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"]).expect("compile wset.v1 protos");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("wset_descriptor.bin"), bytes).expect("write descriptor set");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generate wset.v1 code");
}
