//! Device-resident tensors.

use std::fmt;
use std::sync::Arc;

use strata_tensor::{DType, Shape, TensorError};

use crate::pool::Pool;

/// A buffer owned by one or more tensors; returned to the pool when the last one drops.
pub(crate) struct Storage {
    buffer: Option<wgpu::Buffer>,
    class_bytes: u64,
    pool: Pool,
}

impl Storage {
    pub(crate) fn new(buffer: wgpu::Buffer, class_bytes: u64, pool: Pool) -> Self {
        Self { buffer: Some(buffer), class_bytes, pool }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        if let Some(b) = self.buffer.take() {
            self.pool.release(b, self.class_bytes);
        }
    }
}

/// A tensor that lives in GPU memory.
///
/// Cloning is cheap and shares the buffer (like a PyTorch view); in-place operations
/// such as optimiser steps are visible through every clone. The buffer goes back to the
/// device's pool when the last clone is dropped.
#[derive(Clone)]
pub struct GpuTensor {
    storage: Arc<Storage>,
    shape: Shape,
    dtype: DType,
}

impl GpuTensor {
    pub(crate) fn new(storage: Storage, shape: Shape, dtype: DType) -> Self {
        Self { storage: Arc::new(storage), shape, dtype }
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Bytes of data (not counting the pool's rounding).
    pub fn size_bytes(&self) -> u64 {
        (self.numel() * self.dtype.size_bytes()) as u64
    }

    /// The same buffer under another shape with the same element count.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<GpuTensor, TensorError> {
        let shape = shape.into();
        let Some(n) = shape.checked_numel() else {
            return Err(TensorError::TooLarge { shape: shape.to_string() });
        };
        if n != self.numel() {
            return Err(TensorError::shape(
                "reshape",
                format!("cannot view {} ({} elements) as {shape} ({n} elements)", self.shape, self.numel()),
            ));
        }
        Ok(Self { storage: self.storage.clone(), shape, dtype: self.dtype })
    }

    /// Whether two tensors share a buffer.
    pub fn same_storage(&self, other: &GpuTensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    pub(crate) fn buffer(&self) -> &wgpu::Buffer {
        self.storage.buffer.as_ref().expect("storage holds its buffer until dropped")
    }

    /// Bytes the buffer really has (the size class).
    pub(crate) fn capacity_bytes(&self) -> u64 {
        self.storage.class_bytes
    }
}

impl fmt::Debug for GpuTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GpuTensor({} {})", self.dtype, self.shape)
    }
}
