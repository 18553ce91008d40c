//! Generates the IAM gRPC client and server from `proto/` with protox, a pure-Rust protobuf
//! compiler, so a fresh machine needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/yandex/cloud/iam/v1/iam_token_service.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        // The server half backs the `dev` emulator and the fake IAM in the tests.
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
