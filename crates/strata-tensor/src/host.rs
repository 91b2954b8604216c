//! Tensors in host memory.

use crate::{Element, Result, Shape, TensorError};

/// A dense row-major tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor<T: Element = f32> {
    shape: Shape,
    data: Vec<T>,
}

impl<T: Element> HostTensor<T> {
    /// A tensor of `shape` over `data`; fails if the element counts differ or the shape's
    /// element count overflows.
    pub fn new(shape: impl Into<Shape>, data: Vec<T>) -> Result<Self> {
        let shape = shape.into();
        let Some(expected) = shape.checked_numel() else {
            return Err(TensorError::TooLarge { shape: shape.to_string() });
        };
        if expected != data.len() {
            return Err(TensorError::DataLength { shape: shape.to_string(), expected, got: data.len() });
        }
        Ok(Self { shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let data = vec![T::default(); shape.numel()];
        Self { shape, data }
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The elements, row-major.
    pub fn data(&self) -> &[T] {
        &self.data
    }

    /// The elements, mutable.
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// Consumes the tensor, returning its elements.
    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    /// The same elements under another shape with the same element count.
    pub fn reshape(self, shape: impl Into<Shape>) -> Result<Self> {
        Self::new(shape, self.data)
    }
}

impl HostTensor<f32> {
    /// A tensor filled by a small deterministic generator (uniform in `[-1, 1)`), for tests
    /// and benchmarks that must be reproducible without a random-number crate.
    pub fn random(shape: impl Into<Shape>, seed: u64) -> Self {
        let shape = shape.into();
        let mut rng = SplitMix64(seed);
        let data = (0..shape.numel()).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        Self { shape, data }
    }

    /// The largest absolute difference to `other`, or `None` if the shapes differ.
    pub fn max_abs_diff(&self, other: &Self) -> Option<f32> {
        (self.shape == other.shape)
            .then(|| self.data.iter().zip(&other.data).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max))
    }
}

/// SplitMix64, a tiny well-distributed generator for reproducible test data.
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniform in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// An integer uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_length() {
        let err = HostTensor::new([2, 3], vec![0.0f32; 5]).unwrap_err();
        assert_eq!(err.to_string(), "tensor of shape [2,3] holds 6 elements, data has 5");
        assert!(HostTensor::new([2, 3], vec![0u32; 6]).is_ok());
        // A shape whose element count wraps to 0 must not pass as an empty tensor.
        let err = HostTensor::<f32>::new([1usize << 32, 1 << 32], Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor of shape [4294967296,4294967296] has more elements than memory can address"
        );
    }

    #[test]
    fn random_is_reproducible_and_bounded() {
        let a = HostTensor::random([100], 7);
        assert_eq!(a, HostTensor::random([100], 7));
        assert_ne!(a, HostTensor::random([100], 8));
        assert!(a.data().iter().all(|x| (-1.0..1.0).contains(x)));
    }
}
