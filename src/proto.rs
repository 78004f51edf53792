//! Generated protobuf and gRPC code (see build.rs), and the descriptor set reflection serves.

#![allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]

pub mod idmap {
    pub mod v1 {
        tonic::include_proto!("idmap.v1");
    }
}

/// The encoded `FileDescriptorSet` of `proto/`, dependencies included.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("idmap_descriptor");

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
