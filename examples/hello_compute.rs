//! Hello, compute: start a GPU actor, upload two matrices, run a program of kernels
//! that never leaves the device, and read one number back.
//!
//! `cargo run --release -p strata-examples --example hello_compute`

use anyhow::Result;
use strata_gpu::{GpuHandle, GpuOptions, Op};
use strata_tensor::HostTensor;
use strata_tensor::cpu::ReduceOp;

#[actix::main]
async fn main() -> Result<()> {
    let gpu = GpuHandle::start(&GpuOptions::from_env())?;
    println!("running on {} ({})", gpu.info().name, gpu.info().backend);

    let a = gpu.upload(HostTensor::random([256, 512], 1)).await?;
    let b = gpu.upload(HostTensor::random([512, 128], 2)).await?;
    let (c, r, s) = (gpu.new_id(), gpu.new_id(), gpu.new_id());
    gpu.run(vec![
        Op::MatMul { a, b, trans_a: false, trans_b: false, out: c },
        Op::Relu { x: c, out: r },
        Op::Reduce { x: r, op: ReduceOp::Mean, axis: None, out: s },
    ])
    .await?;
    let mean = gpu.download::<f32>(s).await?;
    println!("mean of relu(a @ b) = {:.6}", mean.data()[0]);

    // A mistake is an error value, and the actor keeps serving.
    let err = gpu.run(vec![Op::MatMul { a, b: a, trans_a: false, trans_b: false, out: c }]).await.unwrap_err();
    println!("a wrong shape is refused: {err}");
    // Release the device before the process exits.
    gpu.shutdown().await;
    Ok(())
}
