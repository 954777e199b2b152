//! Every WGSL kernel parses and validates with naga: a shader error fails here on
//! any machine, GPU or not.

use wgpu_batchnorm::shader_sources::{full, fused_variants, COMMON, FLAGS, KERNELS, PIECES};

fn validate(name: &str, source: &str) -> naga::Module {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        // f16 for the modules of f16 tensors (`enable f16`, SHADER_F16 devices),
        // pack2x16float for f16 two per u32, subgroups for those merging within
        // subgroups (SUBGROUP devices).
        naga::valid::Capabilities::SHADER_FLOAT16
            | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32
            | naga::valid::Capabilities::SUBGROUP,
    )
    .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
    .subgroup_operations(naga::valid::SubgroupOperationSet::all())
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
    let pieces: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/flavor"))
        .expect("shaders/flavor/ exists")
        .map(|e| {
            e.expect("readable")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .collect();
    for piece in &pieces {
        assert!(
            PIECES.iter().any(|(p, _)| *p == format!("flavor/{piece}")),
            "shaders/flavor/{piece} is not built by the crate (missing from shader_sources::PIECES)"
        );
    }
    for (file, _) in KERNELS {
        let module = validate(file, &full(file));
        assert!(!module.entry_points.is_empty(), "{file} has no entry point");
        for ep in &module.entry_points {
            assert_eq!(ep.stage, naga::ShaderStage::Compute, "{file}::{}", ep.name);
        }
        println!("{file}: {} entry points valid", module.entry_points.len());
        // Every fused activation and residual: the same entry points.
        for (fusion, source) in fused_variants(file) {
            let fused = validate(&format!("{file} ({fusion})"), &source);
            assert_eq!(
                fused.entry_points.len(),
                module.entry_points.len(),
                "{file} ({fusion})"
            );
        }
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

#[test]
fn flag_bits_are_defined_by_the_host_only() {
    // Every flag a kernel tests comes from the host's constants (prepended by
    // `full`): no WGSL file declares a constant of its own or tests a literal bit.
    let mut names: Vec<&str> = FLAGS.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), FLAGS.len(), "a flag name is listed twice");
    for (name, value) in FLAGS {
        assert!(value.is_power_of_two(), "{name} = {value} is not one bit");
    }
    for (file, source) in [("common.wgsl", COMMON)]
        .iter()
        .chain(KERNELS)
        .chain(PIECES)
    {
        for line in source.lines().map(str::trim) {
            assert!(!line.starts_with("const "), "{file}: {line}");
            if let Some((_, tested)) = line.split_once("flags & ") {
                assert!(
                    FLAGS.iter().any(|(name, _)| tested.starts_with(name)),
                    "{file}: `{line}` tests a bit that is not one of the host's flags"
                );
            }
        }
    }
}
