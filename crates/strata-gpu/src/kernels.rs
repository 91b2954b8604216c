//! The kernel registry: every WGSL file under `shaders/`, and a cache of compute
//! pipelines built from them.
//!
//! Bind-group layouts are derived from the shader itself with naga: binding 0 of group 0
//! is the kernel's uniform parameter block (bound with a dynamic offset into the
//! parameter arena), bindings 1..n are storage buffers, read-only ones declared `read`.
//! Only the globals an entry point uses enter its layout.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::{GpuError, Result};

/// One WGSL file: one kernel family.
#[derive(Clone, Copy, Debug)]
pub struct ShaderFile {
    /// File name under `shaders/`.
    pub name: &'static str,
    /// The WGSL source compiled into the binary.
    pub source: &'static str,
    /// Whether the kernels use subgroup operations (needs `Features::SUBGROUP`).
    pub subgroups: bool,
}

macro_rules! shader {
    ($name:literal, $subgroups:literal) => {
        ShaderFile {
            name: $name,
            source: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shaders/", $name)),
            subgroups: $subgroups,
        }
    };
}

/// Every shader file, one per kernel family.
pub static SHADERS: &[ShaderFile] = &[
    shader!("elementwise.wgsl", false),
    shader!("layout.wgsl", false),
    shader!("reduce.wgsl", false),
    shader!("gemm_subgroup.wgsl", true),
    shader!("gemm_tiled.wgsl", false),
    shader!("conv2d.wgsl", false),
    shader!("winograd.wgsl", false),
    shader!("pool.wgsl", false),
    shader!("loss.wgsl", false),
    shader!("optim.wgsl", false),
];

/// The `shaders/` folder of the source tree (for tests and the shader-override variable).
pub fn shader_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shaders")
}

/// Looks a shader up by file name.
pub fn shader(name: &str) -> Option<&'static ShaderFile> {
    SHADERS.iter().find(|s| s.name == name)
}

/// Parses and validates a WGSL source with naga, as the device would.
pub fn validate(name: &str, source: &str) -> Result<(naga::Module, naga::valid::ModuleInfo), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string_with_path(source, name))?;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string_with_path(source, name))?;
    Ok((module, info))
}

/// The kind of one binding of an entry point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingKind {
    /// The uniform parameter block (binding 0).
    Params,
    /// A storage buffer; `true` when read-only.
    Storage(bool),
}

/// The bindings an entry point uses, in binding order, checked against the house
/// convention (params at 0, storage at 1..n with no gaps).
pub fn entry_bindings(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
) -> Result<Vec<BindingKind>, String> {
    let idx =
        module.entry_points.iter().position(|e| e.name == entry).ok_or_else(|| format!("no entry point {entry:?}"))?;
    let fi = info.get_entry_point(idx);
    let mut found: Vec<(u32, BindingKind)> = Vec::new();
    for (handle, var) in module.global_variables.iter() {
        let Some(rb) = &var.binding else { continue };
        if fi[handle].is_empty() {
            continue;
        }
        if rb.group != 0 {
            return Err(format!("{entry}: binding {} is in group {}, kernels use group 0", rb.binding, rb.group));
        }
        let kind = match var.space {
            naga::AddressSpace::Uniform => BindingKind::Params,
            naga::AddressSpace::Storage { access } => {
                BindingKind::Storage(!access.contains(naga::StorageAccess::STORE))
            }
            other => {
                return Err(format!("{entry}: binding {} has unsupported address space {other:?}", rb.binding));
            }
        };
        found.push((rb.binding, kind));
    }
    found.sort_by_key(|(b, _)| *b);
    for (i, (b, kind)) in found.iter().enumerate() {
        let ok = *b as usize == i && ((i == 0) == (*kind == BindingKind::Params));
        if !ok {
            return Err(format!("{entry}: bindings must be params at 0 then storage at 1..n, found {found:?}"));
        }
    }
    if found.is_empty() {
        return Err(format!("{entry}: uses no parameter block"));
    }
    Ok(found.into_iter().map(|(_, k)| k).collect())
}

/// A compiled pipeline with its layout.
pub(crate) struct Pipeline {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
    /// Number of storage bindings (1..=n).
    pub(crate) storage_count: usize,
}

struct Module {
    module: wgpu::ShaderModule,
    naga: naga::Module,
    info: naga::valid::ModuleInfo,
    /// Whether the module declares the `WG` (lanes per workgroup) override.
    has_wg: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PipelineKey {
    file: &'static str,
    entry: &'static str,
    constants: Vec<(&'static str, u64)>,
}

/// Compiled modules and pipelines of one device.
#[derive(Default)]
pub(crate) struct Kernels {
    modules: HashMap<&'static str, Arc<Module>>,
    pipelines: HashMap<PipelineKey, Arc<Pipeline>>,
}

impl Kernels {
    fn module(&mut self, device: &wgpu::Device, file: &'static str) -> Result<Arc<Module>> {
        if let Some(m) = self.modules.get(file) {
            return Ok(m.clone());
        }
        let sf = shader(file).unwrap_or_else(|| panic!("kernel file {file} is not registered in SHADERS"));
        // STRATA_SHADER_DIR lets kernel developers edit WGSL without rebuilding.
        let source = match std::env::var_os("STRATA_SHADER_DIR") {
            Some(dir) => std::fs::read_to_string(PathBuf::from(dir).join(file))
                .map_err(|e| GpuError::Wgpu(format!("reading {file} from STRATA_SHADER_DIR: {e}")))?,
            None => sf.source.to_string(),
        };
        let (naga_module, info) = validate(file, &source).map_err(GpuError::Wgpu)?;
        let checks = if std::env::var_os("STRATA_SHADER_CHECKS").is_some() {
            wgpu::ShaderRuntimeChecks::checked()
        } else {
            wgpu::ShaderRuntimeChecks::unchecked()
        };
        // SAFETY: every kernel guards or clamps its indices against sizes passed in its
        // parameter block, and the host checks those sizes against the bound buffers
        // before each dispatch (see `Gpu::dispatch`). naga's own clamping costs 2.4x on
        // lavapipe (measured on the GEMM kernel) for no extra safety; set
        // STRATA_SHADER_CHECKS=1 to turn it back on while debugging a kernel.
        let module = unsafe {
            device.create_shader_module_trusted(
                wgpu::ShaderModuleDescriptor { label: Some(file), source: wgpu::ShaderSource::Wgsl(source.into()) },
                checks,
            )
        };
        let has_wg = naga_module.overrides.iter().any(|(_, o)| o.name.as_deref() == Some("WG"));
        let m = Arc::new(Module { module, naga: naga_module, info, has_wg });
        self.modules.insert(file, m.clone());
        Ok(m)
    }

    pub(crate) fn pipeline(
        &mut self,
        device: &wgpu::Device,
        file: &'static str,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        wg: u32,
    ) -> Result<Arc<Pipeline>> {
        let key = PipelineKey { file, entry, constants: constants.iter().map(|(k, v)| (*k, v.to_bits())).collect() };
        if let Some(p) = self.pipelines.get(&key) {
            return Ok(p.clone());
        }
        let m = self.module(device, file)?;
        let mut constants = constants.to_vec();
        if m.has_wg {
            constants.push(("WG", f64::from(wg)));
        }
        let constants = constants.as_slice();
        let kinds = entry_bindings(&m.naga, &m.info, entry).map_err(|e| GpuError::Wgpu(format!("{file}: {e}")))?;
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match k {
                        BindingKind::Params => wgpu::BufferBindingType::Uniform,
                        BindingKind::Storage(ro) => wgpu::BufferBindingType::Storage { read_only: *ro },
                    },
                    has_dynamic_offset: *k == BindingKind::Params,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let label = format!("{file}:{entry}");
        let layout = device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(&label), entries: &entries });
        let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pl),
            module: &m.module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        let p = Arc::new(Pipeline { pipeline, layout, storage_count: kinds.len() - 1 });
        self.pipelines.insert(key, p.clone());
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_shader_validates_and_follows_the_binding_convention() {
        assert!(!SHADERS.is_empty());
        for s in SHADERS {
            let (module, info) = validate(s.name, s.source).unwrap_or_else(|e| panic!("{e}"));
            assert!(!module.entry_points.is_empty(), "{} has no entry point", s.name);
            for ep in &module.entry_points {
                assert_eq!(ep.stage, naga::ShaderStage::Compute, "{}:{}", s.name, ep.name);
                entry_bindings(&module, &info, &ep.name).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            }
            let uses_subgroups = s.source.contains("subgroup");
            assert_eq!(uses_subgroups, s.subgroups, "{}: subgroup flag disagrees with the source", s.name);
        }
    }

    #[test]
    fn registered_shaders_equal_the_files_on_disk() {
        let dir = shader_dir();
        let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wgsl"))
            .collect();
        let registered: BTreeSet<String> = SHADERS.iter().map(|s| s.name.to_string()).collect();
        assert!(!on_disk.is_empty(), "no .wgsl files in {}", dir.display());
        assert_eq!(on_disk, registered);
        for s in SHADERS {
            let text = std::fs::read_to_string(dir.join(s.name)).expect("registered file is readable");
            assert_eq!(text, s.source, "{} on disk differs from the compiled-in copy", s.name);
        }
    }

    #[test]
    fn convention_violations_are_reported() {
        let src = "@group(0) @binding(1) var<storage, read_write> x: array<f32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1.0; }";
        let (m, i) = validate("bad.wgsl", src).unwrap();
        assert!(entry_bindings(&m, &i, "main").unwrap_err().contains("bindings must be params at 0"));
        assert!(validate("bad.wgsl", "fn main( {").is_err());
    }
}
