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
            if gpu_required() {
                panic!("STRATA_REQUIRE_GPU=1 but no usable GPU adapter: {e}");
            }
            eprintln!("SKIPPED: no usable GPU adapter ({e})");
            None
        }
    }
}

/// Whether `STRATA_REQUIRE_GPU=1`: a test that cannot run its GPU checks fails instead of
/// skipping.
pub fn gpu_required() -> bool {
    std::env::var("STRATA_REQUIRE_GPU").as_deref() == Ok("1")
}

/// Whether a test comparing both GEMM kernels can run with `kernels`: `Ok(false)` skips
/// it, and so would pass without checking anything, which `require` (from
/// [`gpu_required`]) turns into an error.
pub fn both_gemm_kernels(kernels: &[GemmKernel], require: bool) -> Result<bool, String> {
    if kernels.len() >= 2 {
        return Ok(true);
    }
    let why = format!("the adapter runs only {kernels:?} of the two GEMM kernels");
    if require {
        return Err(format!("STRATA_REQUIRE_GPU=1 but {why}"));
    }
    eprintln!("SKIPPED: {why}");
    Ok(false)
}

/// Options for tests that compare training runs bitwise or to tight tolerances: the
/// convolution algorithm is pinned to im2col, because `ConvAlgo::Auto` times each device
/// handle and batch size on its own and may choose Winograd for one run and not the
/// other (different rounding; Adam turns it into parameter differences up to its
/// learning rate). The kernel tests hold Winograd to the CPU reference.
pub fn pinned_gpu_options() -> GpuOptions {
    GpuOptions { conv_algo: Some(strata_gpu::ConvAlgo::Im2col), ..GpuOptions::from_env() }
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

/// Joins futures concurrently, preserving order.
pub async fn futures_join<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let futs: Vec<_> = futs.into_iter().collect();
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut outs: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    let mut pending: Vec<usize> = (0..set.len()).collect();
    std::future::poll_fn(|cx| {
        pending.retain(|&i| match set[i].as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                outs[i] = Some(v);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    outs.into_iter().map(|o| o.expect("all polled to completion")).collect()
}
