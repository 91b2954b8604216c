//! The GPU actor: typed errors for a caller's mistakes, atomic programs, and service
//! that continues after every error.

use strata_gpu::{GpuError, GpuHandle, GpuOptions, Op, TensorId};
use strata_tensor::HostTensor;
use strata_tensor::geometry::Conv2dParams;

use crate::common;

#[actix_rt::test]
async fn errors_are_typed_and_the_actor_keeps_serving() {
    if common::gpu().is_none() {
        return;
    }
    let gpu = GpuHandle::start(&GpuOptions::from_env()).unwrap();
    let a = gpu.upload(HostTensor::random([2, 3], 1)).await.unwrap();
    let b = gpu.upload(HostTensor::random([3, 4], 2)).await.unwrap();
    let c = gpu.new_id();

    // Unknown handle.
    let ghost = TensorId(999_999);
    let e = gpu.run(vec![Op::Add { a, b: ghost, out: c }]).await.unwrap_err();
    assert_eq!(e, GpuError::UnknownTensor { op: "add", id: ghost });
    assert!(matches!(gpu.download::<f32>(ghost).await, Err(GpuError::UnknownTensor { .. })));

    // Shape mismatch, after a valid first op: the whole program leaves no trace.
    let e = gpu
        .run(vec![Op::MatMul { a, b, trans_a: false, trans_b: false, out: c }, Op::Add { a, b, out: gpu.new_id() }])
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "add: operands [2,3] and [3,4] differ in shape");
    assert!(gpu.download::<f32>(c).await.is_err(), "a failed program must not commit its outputs");

    // Wrong dtype and a bad convolution.
    let e = gpu
        .run(vec![Op::Conv2d {
            x: a,
            w: b,
            bias: None,
            params: Conv2dParams::new(1, 1),
            out: c,
            relu: false,
            col: None,
        }])
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "conv2d: input [2,3] must have rank 4 (NCHW)");

    // Out of memory under a budget.
    gpu.with(|ex| ex.gpu().set_memory_budget(64 << 10)).await.unwrap();
    let e = gpu.upload(HostTensor::random([1 << 16], 3)).await.unwrap_err();
    assert!(matches!(e, GpuError::OutOfMemory { .. }), "{e:?}");
    gpu.with(|ex| ex.gpu().set_memory_budget(u64::MAX)).await.unwrap();

    // Still serving: a valid program gives the right answer.
    gpu.run(vec![Op::MatMul { a, b, trans_a: false, trans_b: false, out: c }]).await.unwrap();
    let got = gpu.download::<f32>(c).await.unwrap();
    let want =
        strata_tensor::cpu::matmul(&gpu.download(a).await.unwrap(), &gpu.download(b).await.unwrap(), false, false)
            .unwrap();
    common::assert_close("matmul via actor", &got, &want, 1e-5, 1e-6);
    let stats = gpu.stats().await.unwrap();
    assert!(stats.dispatches > 0 && stats.submits > 0);
    gpu.shutdown().await;
    assert_eq!(gpu.download::<f32>(c).await.unwrap_err(), GpuError::ActorGone);
}

/// A device that does not finish within the limit fails the waiting call with a
/// timeout instead of hanging it, and later work still runs.
#[actix_rt::test]
async fn device_waits_and_actor_calls_are_bounded() {
    let Some(mut gpu) = common::gpu() else { return };
    // 2 x 2048^3 multiply-adds take far longer than a microsecond on any device.
    let n = 2048;
    let a = gpu.upload(&HostTensor::<f32>::random([n, n], 1)).unwrap();
    let b = gpu.upload(&HostTensor::<f32>::random([n, n], 2)).unwrap();
    let default_timeout = gpu.timeout();
    gpu.set_timeout(std::time::Duration::from_micros(1));
    let _c = gpu.matmul(&a, &b, false, false).unwrap();
    let e = gpu.sync().unwrap_err();
    assert_eq!(e, GpuError::Timeout { op: "sync", millis: 0 });
    gpu.set_timeout(default_timeout);
    gpu.sync().unwrap();

    let handle = GpuHandle::from_gpu(gpu);
    let x = handle.upload(HostTensor::random([n, n], 3)).await.unwrap();
    let hasty = handle.with_timeout(std::time::Duration::from_millis(1));
    let out = handle.new_id();
    let e = hasty
        .with(move |ex| {
            ex.run(&[Op::MatMul { a: x, b: x, trans_a: false, trans_b: false, out }])?;
            ex.gpu().sync()
        })
        .await
        .unwrap_err();
    assert_eq!(e, GpuError::Timeout { op: "with", millis: 1 });
    // The actor finishes that work and keeps serving callers with a sane limit.
    let y = handle.download::<f32>(out).await.unwrap();
    assert_eq!(y.shape().dims(), &[n, n]);
    handle.shutdown().await;
}

#[actix_rt::test]
async fn ranges_read_and_write_part_of_a_tensor_and_refuse_what_lies_outside() {
    if common::gpu().is_none() {
        return;
    }
    let gpu = GpuHandle::start(&GpuOptions::from_env()).unwrap();
    let x = HostTensor::random([7, 11], 5);
    let id = gpu.upload(x.clone()).await.unwrap();
    // Odd offsets and lengths, into a reused buffer of another size.
    let got = gpu.read_range::<f32>(id, 13..50, vec![0.0; 3]).await.unwrap();
    assert_eq!(got, x.data()[13..50]);
    let got = gpu.read_range::<f32>(id, 76..77, got).await.unwrap();
    assert_eq!(got, x.data()[76..77]);
    assert!(gpu.read_range::<f32>(id, 5..5, Vec::new()).await.unwrap().is_empty());

    let back = gpu.write_range(id, 3, vec![-1.0f32, -2.0, -3.0]).await.unwrap();
    assert_eq!(back, vec![-1.0, -2.0, -3.0]);
    let mut want = x.data().to_vec();
    want[3..6].copy_from_slice(&[-1.0, -2.0, -3.0]);
    assert_eq!(gpu.download::<f32>(id).await.unwrap().data(), &want[..]);

    let e = gpu.read_range::<f32>(id, 70..78, Vec::new()).await.unwrap_err();
    assert_eq!(e, GpuError::Range { op: "read_range", start: 70, end: 78, len: 77 });
    assert_eq!(e.to_string(), "read_range: elements 70..78 are not within a tensor of 77 elements");
    // A range far beyond the tensor is refused before the buffer grows to it.
    let e = gpu.read_range::<f32>(id, 0..usize::MAX, Vec::new()).await.unwrap_err();
    assert_eq!(e, GpuError::Range { op: "read_range", start: 0, end: usize::MAX, len: 77 });
    let e = gpu.write_range(id, 76, vec![0.0f32; 2]).await.unwrap_err();
    assert_eq!(e, GpuError::Range { op: "write_range", start: 76, end: 78, len: 77 });
    assert!(matches!(gpu.read_range::<u32>(id, 0..1, Vec::new()).await, Err(GpuError::DType { .. })));
    let ghost = TensorId(999_999);
    assert!(matches!(gpu.write_range(ghost, 0, vec![1.0f32]).await, Err(GpuError::UnknownTensor { .. })));
    // Nothing refused changed the tensor.
    assert_eq!(gpu.download::<f32>(id).await.unwrap().data(), &want[..]);
    gpu.shutdown().await;
}
