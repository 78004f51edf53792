//! Generated protobuf and gRPC code (see build.rs), and the descriptor set reflection serves.

pub mod ext_authz;
mod resolve;

pub use resolve::ResolveSessionResponse;

/// The ext_authz service stub (build.rs); its messages are envoy-types' and [`ext_authz`]'s.
#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
mod envoy_service_auth_v3 {
    tonic::include_proto!("envoy.service.auth.v3");
}

#[allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod idmap {
    pub mod v1 {
        tonic::include_proto!("idmap.v1");
        pub use crate::proto::ResolveSessionResponse;
    }
}

/// The encoded `FileDescriptorSet` of `proto/`, dependencies included.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("idmap_descriptor");

/// Envoy's ext_authz service (`envoy.service.auth.v3`) and everything it imports, compiled by
/// build.rs from the `envoy-types` package's .proto files; the Rust types are that crate's, but for
/// the two of [`ext_authz`].
pub const ENVOY_EXT_AUTHZ_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("envoy_ext_authz_descriptor");

pub use idmap::v1 as api;

#[cfg(test)]
mod tests {
    use prost::Message;

    /// Reflection clients (grpcurl) resolve every import through the server, so the descriptor set
    /// must carry the well-known types the API uses, not just our own file.
    #[test]
    fn descriptor_set_carries_every_import() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        for needed in [
            "idmap/v1/identity.proto",
            "google/protobuf/struct.proto",
            "google/protobuf/timestamp.proto",
        ] {
            assert!(names.contains(&needed), "{needed} missing from {names:?}");
        }
    }
}
