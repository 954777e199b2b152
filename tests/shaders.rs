//! Every WGSL kernel parses and validates with naga: a shader error fails here on
//! any machine, GPU or not.

use wgpu_batchnorm::shader_sources::{full, COMMON, KERNELS};

fn validate(name: &str, source: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    module
}

#[test]
fn every_kernel_validates_with_naga() {
    let files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders"))
        .expect("shaders/ exists")
        .map(|e| {
            e.expect("readable")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .filter(|n| n.ends_with(".wgsl") && n != "common.wgsl")
        .collect();
    for file in &files {
        assert!(
            KERNELS.iter().any(|(f, _)| f == file),
            "shaders/{file} is not built by the crate (missing from shader_sources::KERNELS)"
        );
    }
    for (file, source) in KERNELS {
        let module = validate(file, &full(source));
        assert!(!module.entry_points.is_empty(), "{file} has no entry point");
        for ep in &module.entry_points {
            assert_eq!(ep.stage, naga::ShaderStage::Compute, "{file}::{}", ep.name);
        }
        println!("{file}: {} entry points valid", module.entry_points.len());
    }
}

#[test]
fn workgroup_size_is_a_pipeline_constant() {
    // The size reaches WGSL only through the `WG` override, so it is kept in one
    // place (the host) and no file may set a default for it.
    assert!(COMMON.contains("override WG: u32;"));
    for (file, source) in KERNELS {
        for line in source.lines().filter(|l| l.contains("@workgroup_size")) {
            assert!(line.contains("@workgroup_size(WG)"), "{file}: {line}");
        }
    }
}
