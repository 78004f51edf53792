# The production image: `idmap` without the `dev` feature (no embedded PostgreSQL, no Kratos
# emulator), on a base with no shell and no package manager. Needs BuildKit (Docker's default builder)
# for the cache mounts.
#
#   docker build -t idmap:0.1.0 .

# At least the workspace's needs (edition 2024: Rust 1.85) and the locked dependencies'; 1.95 is the
# toolchain the project is built and tested with. Debian 12, like the runtime image, so the binary
# asks for no newer glibc than the runtime has.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# No system packages needed: protox compiles the protos in Rust (no protoc), rustls uses ring (no
# cmake), and jemalloc and ring build with the cc and make this image has. The target directory is a
# cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p idmap --no-default-features \
    && install -D -m 0755 target/release/idmap /out/idmap

# `cc`, not `static`: a Rust binary links glibc and libgcc_s dynamically. The base also carries the
# CA certificates reqwest (rustls-platform-verifier) reads from the system store to check Ory's
# https certificate.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/idmap /usr/local/bin/idmap
# nonroot, numerically, so runAsNonRoot can check it without looking the name up.
USER 65532:65532
# IDMAP_GRPC_ADDR and IDMAP_HTTP_ADDR defaults.
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/idmap"]
CMD ["serve"]
