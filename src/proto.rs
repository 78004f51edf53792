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
