//! Tensor shapes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The dimensions of a tensor, outermost first (row-major, NCHW for images).
///
/// A shape of rank 0 is a scalar and holds one element.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape with the given dimensions.
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Self(dims.into())
    }

    /// The scalar shape `[]`.
    pub fn scalar() -> Self {
        Self(Vec::new())
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for a scalar), or `None` when the product overflows `usize`.
    ///
    /// Shapes from outside (the network, files) go through this or a constructor that
    /// uses it ([`crate::HostTensor::new`]) before anything trusts their size.
    pub fn checked_numel(&self) -> Option<usize> {
        self.0.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Number of elements (1 for a scalar).
    ///
    /// Panics when the product overflows `usize`: a tensor that exists has a size that
    /// fits, and shapes from outside are checked with [`Shape::checked_numel`] first.
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or_else(|| panic!("shape {self} has more elements than usize can count"))
    }

    /// Dimension `i`; panics if `i >= rank` (a programmer error, callers check rank first).
    pub fn dim(&self, i: usize) -> usize {
        self.0[i]
    }

    /// Splits the shape around `axis` into `(outer, axis_len, inner)` element counts.
    pub fn split_at_axis(&self, axis: usize) -> (usize, usize, usize) {
        let outer = self.0[..axis].iter().product();
        let inner = self.0[axis + 1..].iter().product();
        (outer, self.0[axis], inner)
    }

    /// The shape with `axis` removed.
    pub fn without_axis(&self, axis: usize) -> Shape {
        let mut d = self.0.clone();
        d.remove(axis);
        Shape(d)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Self(d.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Self(d.to_vec())
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Self(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_counts() {
        let s = Shape::from([32, 3, 28, 28]);
        assert_eq!(s.to_string(), "[32,3,28,28]");
        assert_eq!(s.numel(), 32 * 3 * 28 * 28);
        assert_eq!(Shape::scalar().numel(), 1);
        assert_eq!(s.split_at_axis(1), (32, 3, 784));
        assert_eq!(s.without_axis(0), Shape::from([3, 28, 28]));
    }

    #[test]
    fn an_overflowing_shape_has_no_element_count() {
        // 2^32 * 2^32 wraps to 0 in unchecked release arithmetic.
        let huge = Shape::from([1usize << 32, 1 << 32]);
        assert_eq!(huge.checked_numel(), None);
        assert_eq!(Shape::from([usize::MAX, 0]).checked_numel(), Some(0));
        assert_eq!(Shape::from([3, 4]).checked_numel(), Some(12));
        assert_eq!(Shape::scalar().checked_numel(), Some(1));
    }
}
