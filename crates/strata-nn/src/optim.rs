//! Optimiser configuration, turned into per-parameter GPU operations.

use serde::{Deserialize, Serialize};
use strata_gpu::Op;
use strata_tensor::cpu::{AdamParams, SgdParams};

use crate::ParamSlot;

/// An optimiser and its hyperparameters (PyTorch's update rules).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Optimizer {
    /// Adam.
    Adam(AdamParams),
    /// SGD with momentum.
    Sgd(SgdParams),
}

impl Optimizer {
    /// Names of the state tensors, as in PyTorch's optimiser state dict.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Optimizer::Adam(_) => &["exp_avg", "exp_avg_sq"],
            Optimizer::Sgd(_) => &["momentum_buffer"],
        }
    }

    /// The learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            Optimizer::Adam(h) => h.lr,
            Optimizer::Sgd(h) => h.lr,
        }
    }

    pub(crate) fn op(&self, p: &ParamSlot, step: u32) -> Op {
        match *self {
            Optimizer::Adam(hyper) => {
                Op::AdamStep { param: p.value, grad: p.grad, m: p.state[0], v: p.state[1], hyper, step }
            }
            Optimizer::Sgd(hyper) => Op::SgdStep { param: p.value, grad: p.grad, buf: p.state[0], hyper, step },
        }
    }
}
