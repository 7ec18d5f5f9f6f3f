//! Regenerates `graphs/src/onnx.rs`, the Rust types for the ONNX protobuf schema, from the
//! vendored `graphs/protos/onnx.proto`.
//!
//! Why this exists: the `narx-graphs` crate needs the ONNX protobuf messages, but a `build.rs`
//! running prost-build would need `protoc` (or this whole compiler stack) on every machine that
//! builds narx. Instead, like tract does, the generated code is committed and this small
//! standalone crate (outside the main workspace) is run by hand when the `.proto` changes. It uses
//! `protox`, a pure-Rust protobuf compiler, so no `protoc` is needed here either.
//!
//! Run from the workspace root:
//!
//! ```text
//! cargo run --manifest-path graphs/protogen/Cargo.toml
//! ```
//!
//! Only message and enum types are generated (onnx.proto declares no services, and no service
//! generator is configured).

use std::path::{Path, PathBuf};

const HEADER: &str = "\
// @generated from graphs/protos/onnx.proto by graphs/protogen (protox + prost-build 0.14).
// Do not edit by hand. To regenerate, from the workspace root run:
//
//     cargo run --manifest-path graphs/protogen/Cargo.toml
//
";

fn main() {
    if let Err(err) = run() {
        eprintln!("protogen: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // graphs/protogen -> graphs
    let graphs_dir: PathBuf = manifest_dir
        .parent()
        .ok_or("CARGO_MANIFEST_DIR has no parent")?
        .to_path_buf();
    let proto_dir = graphs_dir.join("protos");
    let out_path = graphs_dir.join("src").join("onnx.rs");

    // Parse and type-check onnx.proto in pure Rust (with source info, so the proto comments
    // become doc comments).
    let fds = protox::compile(["onnx.proto"], [&proto_dir])?;

    let requests: Vec<_> = fds
        .file
        .into_iter()
        .map(|file| {
            let module = prost_build::Module::from_protobuf_package_name(file.package());
            (module, file)
        })
        .collect();

    let mut modules = prost_build::Config::new().generate(requests)?;
    if modules.len() != 1 {
        return Err(format!(
            "expected exactly one generated module, got {}",
            modules.len()
        )
        .into());
    }
    let onnx = prost_build::Module::from_protobuf_package_name("onnx");
    let code = modules
        .remove(&onnx)
        .ok_or("no code generated for package `onnx`")?;

    let contents = format!("{HEADER}{code}");
    let unchanged = std::fs::read_to_string(&out_path).is_ok_and(|old| old == contents);
    if unchanged {
        println!("{} is up to date", out_path.display());
    } else {
        std::fs::write(&out_path, contents)?;
        println!("wrote {}", out_path.display());
    }
    Ok(())
}
