//! Element types.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The element type of a tensor.
///
/// Kernels compute in `F32`; `U32` holds class labels and pooling indices. `F16` and
/// `BF16` are named so that wire headers and checkpoints can carry them; kernels reject
/// them with [`crate::TensorError::DType`] until they are implemented.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit unsigned integer.
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name, as in error messages and checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U32 => "u32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust element type that a host tensor can hold.
pub trait Element: bytemuck::Pod + Copy + Default + Send + Sync + fmt::Debug + 'static {
    /// The matching dtype.
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}

impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
