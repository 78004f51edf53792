//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and writes the descriptor sets that
//! gRPC server reflection serves: idmap's own API, and Envoy's ext_authz service, whose Rust types
//! come from the `envoy-types` crate and whose .proto files ship inside that crate's package.

use std::{env, path::PathBuf};

/// The `envoy-types` version Cargo.toml pins; its package holds the .proto files compiled here.
const ENVOY_TYPES: &str = "envoy-types-0.7.7";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/idmap/v1/identity.proto"];
    println!("cargo:rerun-if-changed=proto");

    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("idmap_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    tonic_prost_build::configure()
        // Written by hand in src/proto/resolve.rs, so the server can send a cached session pre-encoded.
        .extern_path(
            ".idmap.v1.ResolveSessionResponse",
            "crate::proto::ResolveSessionResponse",
        )
        .compile_fds(fds)?;

    let envoy = envoy_types_protos()?;
    let includes: Vec<PathBuf> = [
        "data-plane-api",
        "xds",
        "protoc-gen-validate",
        "googleapis",
        "cel-spec/proto",
        "opentelemetry-proto",
        "client_model",
    ]
    .iter()
    .map(|dir| envoy.join(dir))
    .filter(|dir| dir.is_dir())
    .collect();
    let envoy_fds = protox::compile(["envoy/service/auth/v3/external_auth.proto"], &includes)?;
    std::fs::write(
        out.join("envoy_ext_authz_descriptor.bin"),
        prost::Message::encode_to_vec(&envoy_fds),
    )?;

    // The ext_authz server stub, generated from the one file that declares the service. Its
    // messages are envoy-types', except Check's request and response, written by hand in
    // src/proto/ext_authz.rs so that the server decodes only the client's headers and sends an
    // allowed request's headers encoded once per cached session.
    let mut service = envoy_fds;
    service
        .file
        .retain(|file| file.name() == "envoy/service/auth/v3/external_auth.proto");
    tonic_prost_build::configure()
        .build_client(false)
        .extern_path(
            ".envoy.service.auth.v3.CheckRequest",
            "crate::proto::ext_authz::CheckRequest",
        )
        .extern_path(
            ".envoy.service.auth.v3.CheckResponse",
            "crate::proto::ext_authz::CheckResponse",
        )
        .extern_path(".envoy", "::envoy_types::pb::envoy")
        .compile_fds(service)?;
    Ok(())
}

/// The `proto/` directory of the `envoy-types` package: `ENVOY_TYPES_PROTO_DIR` when set, else the
/// package in a vendored tree (`cargo vendor`) or in Cargo's registry sources.
fn envoy_types_protos() -> Result<PathBuf, Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=ENVOY_TYPES_PROTO_DIR");
    if let Ok(dir) = env::var("ENVOY_TYPES_PROTO_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let mut candidates = vec![manifest.join("vendor").join("envoy-types").join("proto")];
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    if let Some(registry) = cargo_home.map(|home| home.join("registry").join("src"))
        && let Ok(indexes) = std::fs::read_dir(&registry)
    {
        for index in indexes.flatten() {
            candidates.push(index.path().join(ENVOY_TYPES).join("proto"));
        }
    }
    candidates
        .into_iter()
        .find(|dir| dir.join("data-plane-api").is_dir())
        .ok_or_else(|| {
            format!(
                "cannot find the .proto files of {ENVOY_TYPES} (looked in vendor/ and Cargo's registry); \
                 set ENVOY_TYPES_PROTO_DIR to that package's proto/ directory"
            )
            .into()
        })
}
