//! Device limits: tensors larger than one storage binding, the memory budget, and a
//! steady step that allocates no buffers after warm-up.

use strata_gpu::{Executor, GpuError, Op, TensorId};
use strata_tensor::cpu::{AdamParams, ReduceOp};
use strata_tensor::geometry::Conv2dParams;
use strata_tensor::{DType, HostTensor, SplitMix64};

use crate::gpu_or_skip;

#[test]
fn reductions_of_64m_elements_span_bindings() {
    let mut g = gpu_or_skip!();
    let n = 64 << 20;
    let mut x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 1e-3 - 0.25).collect();
    let peak = 50_000_000;
    x[peak] = 7.0;
    x[peak + 1] = -9.0;
    let want_sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
    let host = HostTensor::new([n], x).unwrap();
    let gx = g.upload(&host).unwrap();
    let binding = g.info().max_storage_binding_bytes;
    if (n as u64) * 4 <= binding {
        eprintln!("note: this adapter binds {binding} bytes at once; the 64M-element tensor fits one binding");
    }
    drop(host);
    let s = g.reduce(&gx, ReduceOp::Sum, None).unwrap();
    let got = f64::from(g.read_scalar(&s).unwrap());
    assert!((got - want_sum).abs() <= 1e-6 * want_sum.abs().max(1.0) + 1.0, "sum {got} vs {want_sum}");
    let m = g.reduce(&gx, ReduceOp::Mean, None).unwrap();
    let got = f64::from(g.read_scalar(&m).unwrap());
    assert!((got - want_sum / n as f64).abs() <= 1e-6, "mean {got}");
    let mx = g.reduce(&gx, ReduceOp::Max, None).unwrap();
    assert_eq!(g.read_scalar(&mx).unwrap(), 7.0);
    let am = g.reduce(&gx, ReduceOp::ArgMax, None).unwrap();
    assert_eq!(g.download::<u32>(&am).unwrap().data(), &[peak as u32]);
    let am = g.reduce(&gx, ReduceOp::ArgMin, None).unwrap();
    assert_eq!(g.download::<u32>(&am).unwrap().data(), &[peak as u32 + 1]);
}

#[test]
fn elementwise_and_optimiser_steps_span_bindings() {
    let mut g = gpu_or_skip!();
    let n = (g.info().max_storage_binding_bytes / 4) as usize + 1000;
    let x = g.zeros([n], DType::F32).unwrap();
    let y = g.zeros([n], DType::F32).unwrap();
    g.fill(&x, 2.0).unwrap();
    g.fill(&y, 1.0).unwrap();
    g.axpy(0.5, &x, &y).unwrap();
    let s = g.sum_to_host(&y).unwrap();
    assert!((f64::from(s) - 2.0 * n as f64).abs() < 1e-6 * n as f64, "axpy sum {s}");
    let m = g.zeros([n], DType::F32).unwrap();
    let v = g.zeros([n], DType::F32).unwrap();
    // First Adam step moves every parameter by -lr * sign(grad).
    g.adam_step(&y, &x, &m, &v, &AdamParams { lr: 0.5, ..AdamParams::default() }, 1).unwrap();
    let tail = g.download::<f32>(&y).unwrap();
    assert!(tail.data()[n - 1] == 1.5 && tail.data()[0] == 1.5, "{} {}", tail.data()[0], tail.data()[n - 1]);
}

#[test]
fn operands_beyond_one_binding_are_refused_with_the_limit_named() {
    let mut g = gpu_or_skip!();
    let limit = g.info().max_storage_binding_bytes;
    let rows = (limit / 4 / 8) as usize + 1;
    let a = g.zeros([rows, 8], DType::F32).unwrap();
    let b = g.zeros([8, 4], DType::F32).unwrap();
    let e = g.matmul(&a, &b, false, false).unwrap_err();
    assert!(matches!(e, GpuError::BindingTooLarge { .. }), "{e:?}");
    assert!(e.to_string().contains(&format!("storage binding limit of {limit} bytes")), "{e}");
    // The device keeps working.
    let small = g.zeros([2, 8], DType::F32).unwrap();
    assert!(g.matmul(&small, &b, false, false).is_ok());
}

#[test]
fn shapes_whose_size_overflows_are_refused_not_wrapped() {
    let mut g = gpu_or_skip!();
    // 2^32 * 2^32 elements wrap to an empty tensor in unchecked arithmetic.
    let e = g.empty([1usize << 32, 1 << 32], DType::F32).unwrap_err();
    assert_eq!(e.to_string(), "tensor of shape [4294967296,4294967296] has more elements than memory can address");
    // 2^62 elements fit a usize, their bytes do not.
    assert!(g.empty([1usize << 62], DType::F32).unwrap_err().to_string().contains("more elements than memory"));
    let t = g.zeros([4], DType::F32).unwrap();
    let e = t.reshape([1usize << 32, 1 << 32, 4]).unwrap_err();
    assert!(e.to_string().contains("has more elements than memory can address"), "{e}");
}

#[test]
fn memory_budget_gives_out_of_memory_errors_and_the_device_keeps_working() {
    let mut g = gpu_or_skip!();
    g.set_memory_budget(1 << 20);
    let e = g.zeros([1 << 19], DType::F32).unwrap_err();
    assert!(matches!(e, GpuError::OutOfMemory { .. }), "{e:?}");
    assert!(e.to_string().starts_with("out of GPU memory: allocating 2097152 bytes"), "{e}");
    let t = g.upload(&HostTensor::random([1000], 1)).unwrap();
    assert_eq!(g.download::<f32>(&t).unwrap().data().len(), 1000);
}

/// One training step of a small CNN as a program: forward, loss, backward, Adam.
fn step_program(step: u32) -> Vec<Op> {
    let t = TensorId;
    let p = Conv2dParams::new(1, 1);
    let pool = Conv2dParams::new(2, 0);
    let h = AdamParams::default();
    vec![
        Op::Conv2d { x: t(1), w: t(2), bias: Some(t(3)), params: p, out: t(20), relu: false, col: Some(t(50)) },
        Op::Relu { x: t(20), out: t(21) },
        Op::MaxPool2d { x: t(21), kernel: (2, 2), params: pool, out: t(22), indices: t(23) },
        Op::Reshape { x: t(22), shape: [8, 4 * 7 * 7].into(), out: t(24) },
        Op::Linear { x: t(24), w: t(4), bias: Some(t(5)), out: t(25), relu: false },
        Op::LogSoftmax { x: t(25), out: t(26) },
        Op::NllLoss { logp: t(26), targets: t(6), out: t(27) },
        Op::NllLossBackward { logp: t(26), targets: t(6), out: t(28) },
        Op::LogSoftmaxBackward { y: t(26), dy: t(28), out: t(29) },
        Op::LinearBackward { x: t(24), w: t(4), dy: t(29), dx: Some(t(30)), dw: Some(t(31)), db: Some(t(32)) },
        Op::Reshape { x: t(30), shape: [8, 4, 7, 7].into(), out: t(33) },
        Op::MaxPool2dBackward {
            dy: t(33),
            indices: t(23),
            input_shape: [8, 4, 14, 14].into(),
            kernel: (2, 2),
            params: pool,
            out: t(34),
            relu_output: None,
        },
        Op::ReluBackward { x: t(20), dy: t(34), out: t(35) },
        Op::Conv2dBackward {
            x: t(1),
            w: t(2),
            dy: t(35),
            params: p,
            dx: None,
            dw: Some(t(36)),
            db: Some(t(37)),
            col: Some(t(50)),
        },
        Op::AdamStep { param: t(2), grad: t(36), m: t(40), v: t(41), hyper: h, step },
        Op::AdamStep { param: t(3), grad: t(37), m: t(42), v: t(43), hyper: h, step },
        Op::AdamStep { param: t(4), grad: t(31), m: t(44), v: t(45), hyper: h, step },
        Op::AdamStep { param: t(5), grad: t(32), m: t(46), v: t(47), hyper: h, step },
    ]
}

#[test]
fn a_steady_training_step_allocates_no_buffers_after_warm_up() {
    let g = gpu_or_skip!();
    let mut ex = Executor::new(g);
    let t = TensorId;
    let mut rng = SplitMix64(3);
    ex.upload(t(1), &HostTensor::random([8, 1, 14, 14], 1)).unwrap();
    for (id, shape) in [(2, vec![4, 1, 3, 3]), (3, vec![4]), (4, vec![10, 196]), (5, vec![10])] {
        ex.upload(t(id), &HostTensor::random(shape.clone(), id)).unwrap();
        ex.upload(t(36 + 2 * id), &HostTensor::<f32>::zeros(shape.clone())).unwrap();
        ex.upload(t(37 + 2 * id), &HostTensor::<f32>::zeros(shape)).unwrap();
    }
    ex.upload(t(6), &HostTensor::new([8], (0..8).map(|_| rng.below(10) as u32).collect()).unwrap()).unwrap();
    let mut losses = Vec::new();
    let mut allocations = Vec::new();
    for step in 1..=6 {
        ex.run(&step_program(step)).unwrap();
        losses.push(ex.download::<f32>(t(27)).unwrap().data()[0]);
        allocations.push(ex.gpu().stats().pool.allocations);
    }
    assert!(losses[5] < losses[0], "the loss should fall on a fixed batch: {losses:?}");
    assert_eq!(allocations[2], allocations[5], "buffers allocated after warm-up: {allocations:?}");
}
