//! Helpers shared by the integration tests.

use strata_gpu::{GemmKernel, Gpu, GpuOptions};
use strata_tensor::HostTensor;

/// Opens the test device, or returns `None` after saying why the test is skipped.
/// Panics instead when `STRATA_REQUIRE_GPU=1`.
pub fn gpu_with(gemm: Option<GemmKernel>) -> Option<Gpu> {
    let mut opts = GpuOptions::from_env();
    if gemm.is_some() {
        opts.gemm = gemm;
    }
    match Gpu::new(&opts) {
        Ok(g) => Some(g),
        Err(e) => {
            if std::env::var("STRATA_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("STRATA_REQUIRE_GPU=1 but no usable GPU adapter: {e}");
            }
            eprintln!("SKIPPED: no usable GPU adapter ({e})");
            None
        }
    }
}

/// The default test device.
pub fn gpu() -> Option<Gpu> {
    gpu_with(None)
}

/// The GEMM kernels this machine's adapter can run (both on lavapipe).
pub fn gemm_kernels() -> Vec<GemmKernel> {
    let Some(g) = gpu() else { return Vec::new() };
    if g.info().subgroups && g.info().subgroup_sizes.0 >= 8 {
        vec![GemmKernel::Tiled, GemmKernel::Subgroup8]
    } else {
        vec![GemmKernel::Tiled]
    }
}

/// Opens the device or returns from the test.
#[macro_export]
macro_rules! gpu_or_skip {
    () => {
        match $crate::common::gpu() {
            Some(g) => g,
            None => return,
        }
    };
}

/// Asserts `|got - want| <= atol + rtol * |want|` elementwise, naming the first offender.
#[track_caller]
pub fn assert_close(what: &str, got: &HostTensor, want: &HostTensor, rtol: f32, atol: f32) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes differ");
    for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
        let ok = (g - w).abs() <= atol + rtol * w.abs() || (g.is_nan() && w.is_nan());
        assert!(ok, "{what}: element {i} is {g}, expected {w} (rtol {rtol}, atol {atol})");
    }
}

/// Largest magnitude in a tensor (for tolerances that scale with the data).
pub fn max_abs(t: &HostTensor) -> f32 {
    t.data().iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}
