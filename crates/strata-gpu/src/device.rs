//! Choosing an adapter and opening a device.
//!
//! By default the best hardware adapter wins (discrete, then integrated, then virtual),
//! and a software adapter such as Mesa's lavapipe is used when there is none. The
//! environment variables `STRATA_BACKEND` (`vulkan`, `metal`, `dx12`, `gl`) and
//! `STRATA_ADAPTER` (a case-insensitive substring of the adapter name) narrow the choice;
//! the `strata` binary maps its `--backend` and `--adapter` flags onto the same request.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{GpuError, Result};

/// Which adapter to open.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterRequest {
    /// Backend name (`vulkan`, `metal`, `dx12`, `gl`); `None` tries all.
    pub backend: Option<String>,
    /// Case-insensitive substring of the adapter name; `None` takes the best.
    pub adapter: Option<String>,
}

impl AdapterRequest {
    /// The request described by `STRATA_BACKEND` and `STRATA_ADAPTER`.
    pub fn from_env() -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Self { backend: var("STRATA_BACKEND"), adapter: var("STRATA_ADAPTER") }
    }

    fn backends(&self) -> Result<wgpu::Backends> {
        Ok(match self.backend.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("any") | Some("all") => wgpu::Backends::all(),
            Some("vulkan") | Some("vk") => wgpu::Backends::VULKAN,
            Some("metal") => wgpu::Backends::METAL,
            Some("dx12") | Some("d3d12") => wgpu::Backends::DX12,
            Some("gl") | Some("opengl") | Some("gles") => wgpu::Backends::GL,
            Some(other) => {
                return Err(GpuError::NoAdapter {
                    request: format!("backend {other:?}"),
                    available: "backends vulkan, metal, dx12, gl".into(),
                });
            }
        })
    }
}

impl fmt::Display for AdapterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "backend {} and adapter name {}",
            self.backend.as_deref().unwrap_or("any"),
            self.adapter.as_deref().map_or("any".to_string(), |a| format!("containing {a:?}"))
        )
    }
}

/// What an opened device is and the limits that matter to Strata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Adapter name, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// Backend, e.g. `vulkan`.
    pub backend: String,
    /// `discrete`, `integrated`, `virtual`, `cpu` or `other`.
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Largest storage buffer binding in bytes.
    pub max_storage_binding_bytes: u64,
    /// Largest buffer in bytes.
    pub max_buffer_bytes: u64,
    /// Most invocations in one workgroup.
    pub max_workgroup_invocations: u32,
    /// Workgroup shared memory in bytes.
    pub max_workgroup_storage_bytes: u32,
    /// Most workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
    /// Smallest and largest subgroup size; `(0, 0)` when subgroups are unsupported.
    pub subgroup_sizes: (u32, u32),
    /// Whether subgroup operations are enabled.
    pub subgroups: bool,
    /// Whether timestamp queries are enabled.
    pub timestamps: bool,
    /// Whether `f16` in shaders is enabled.
    pub shader_f16: bool,
}

impl DeviceInfo {
    /// Whether this is a software (CPU) adapter such as lavapipe.
    pub fn is_cpu(&self) -> bool {
        self.device_type == "cpu"
    }
}

impl fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "adapter        {}", self.name)?;
        writeln!(f, "backend        {} ({} device)", self.backend, self.device_type)?;
        writeln!(f, "driver         {}", self.driver)?;
        writeln!(
            f,
            "limits         storage binding {} MiB, buffer {} MiB, workgroup {} invocations / {} KiB shared, {} groups per dimension",
            self.max_storage_binding_bytes >> 20,
            self.max_buffer_bytes >> 20,
            self.max_workgroup_invocations,
            self.max_workgroup_storage_bytes >> 10,
            self.max_workgroups_per_dim
        )?;
        write!(
            f,
            "features       subgroups {} (size {}..{}), timestamps {}, f16 {}",
            self.subgroups, self.subgroup_sizes.0, self.subgroup_sizes.1, self.timestamps, self.shader_f16
        )
    }
}

fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

fn type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

/// Lists the adapters this machine offers for `request`'s backend, best first.
pub fn list_adapters(request: &AdapterRequest) -> Result<Vec<wgpu::AdapterInfo>> {
    let instance = instance(request)?;
    let mut adapters = pollster::block_on(instance.enumerate_adapters(request.backends()?));
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (type_rank(i.device_type), backend_rank(i.backend))
    });
    Ok(adapters.iter().map(|a| a.get_info()).collect())
}

fn instance(request: &AdapterRequest) -> Result<wgpu::Instance> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle().with_env();
    desc.backends = request.backends()?;
    Ok(wgpu::Instance::new(desc))
}

/// An opened device with its queue and description.
pub(crate) struct OpenDevice {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: DeviceInfo,
}

/// Opens the adapter that best matches `request`.
pub(crate) fn open(request: &AdapterRequest) -> Result<OpenDevice> {
    let instance = instance(request)?;
    let mut adapters = pollster::block_on(instance.enumerate_adapters(request.backends()?));
    let available = adapters
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?}, {})", i.name, i.backend, type_name(i.device_type))
        })
        .collect::<Vec<_>>()
        .join("; ");
    if let Some(want) = &request.adapter {
        let want = want.to_lowercase();
        adapters.retain(|a| a.get_info().name.to_lowercase().contains(&want));
    }
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        (type_rank(i.device_type), backend_rank(i.backend))
    });
    let adapter = adapters.into_iter().next().ok_or_else(|| GpuError::NoAdapter {
        request: request.to_string(),
        available: if available.is_empty() { "none".into() } else { available },
    })?;
    let ai = adapter.get_info();
    let wanted = wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SHADER_F16;
    let features = adapter.features() & wanted;
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("strata"),
        required_features: features,
        required_limits: limits.clone(),
        experimental_features: Default::default(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: Default::default(),
    }))
    .map_err(|e| GpuError::RequestDevice { adapter: ai.name.clone(), reason: e.to_string() })?;
    let subgroups = features.contains(wgpu::Features::SUBGROUP);
    let info = DeviceInfo {
        name: ai.name.clone(),
        backend: format!("{:?}", ai.backend).to_lowercase(),
        device_type: type_name(ai.device_type).into(),
        driver: format!("{} {}", ai.driver, ai.driver_info).trim().to_string(),
        max_storage_binding_bytes: limits.max_storage_buffer_binding_size,
        max_buffer_bytes: limits.max_buffer_size,
        max_workgroup_invocations: limits.max_compute_invocations_per_workgroup,
        max_workgroup_storage_bytes: limits.max_compute_workgroup_storage_size,
        max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
        subgroup_sizes: if subgroups { (ai.subgroup_min_size, ai.subgroup_max_size) } else { (0, 0) },
        subgroups,
        timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
    };
    Ok(OpenDevice { device, queue, info })
}
