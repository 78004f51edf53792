//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and writes the descriptor set that
//! gRPC server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/idmap/v1/identity.proto"];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("idmap_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        // Written by hand in src/proto.rs, so the server can send a cached session pre-encoded.
        .extern_path(
            ".idmap.v1.ResolveSessionResponse",
            "crate::proto::ResolveSessionResponse",
        )
        .compile_fds(fds)?;
    Ok(())
}
