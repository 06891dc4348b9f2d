//! Comparisons that the tests share: bit identity, and max differences that see NaN and name the
//! worst element.
//!
//! candle's CPU `max` skips NaN, so `(a - b).abs().max() == 0` proves neither closeness nor bit
//! identity: a NaN anywhere passes, and so do `+0` against `-0` and NaNs of different payloads.
//! Here:
//! - [`bits`] and [`ensure_bit_identical`] compare raw bits, NaN payloads and signed zeros included;
//! - [`compare`] and [`ensure_close`] give max |actual − expected| and where it is; a NaN on one
//!   side only is the worst difference there is (and fails every bound), a NaN on both sides at the
//!   same place is a match, as are equal infinities;
//! - [`max_abs`] and [`scale`] measure a reference for a relative bound, and refuse a NaN in it;
//!   [`max_abs_finite`] skips non-finite values, for references that hold them by design.
//!
//! Used by the tests only (a dev-dependency); errors are `anyhow` errors.

use std::fmt;

use anyhow::{Result, bail, ensure};
use candle_core::{DType, Tensor};

/// The raw bits of every element, flattened in row-major order and widened to `u64`.
pub fn bits(tensor: &Tensor) -> Result<Vec<u64>> {
    let flat = tensor.flatten_all()?;
    Ok(match tensor.dtype() {
        DType::F32 => flat.to_vec1::<f32>()?.into_iter().map(|value| u64::from(value.to_bits())).collect(),
        DType::F64 => flat.to_vec1::<f64>()?.into_iter().map(f64::to_bits).collect(),
        DType::BF16 => flat.to_vec1::<half::bf16>()?.into_iter().map(|value| u64::from(value.to_bits())).collect(),
        DType::F16 => flat.to_vec1::<half::f16>()?.into_iter().map(|value| u64::from(value.to_bits())).collect(),
        DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(u64::from).collect(),
        DType::U32 => flat.to_vec1::<u32>()?.into_iter().map(u64::from).collect(),
        DType::I64 => flat.to_vec1::<i64>()?.into_iter().map(|value| u64::from_ne_bytes(value.to_ne_bytes())).collect(),
        other => bail!("bits: no bit view of {other:?} tensors"),
    })
}

/// Succeeds when `actual` and `expected` have one dtype, one shape and the same bits everywhere;
/// otherwise the error counts the differing elements and names the first, with both values and bits.
pub fn ensure_bit_identical(label: &str, actual: &Tensor, expected: &Tensor) -> Result<()> {
    ensure!(actual.dtype() == expected.dtype(), "{label}: dtype {:?}, expected {:?}", actual.dtype(), expected.dtype());
    ensure!(actual.dims() == expected.dims(), "{label}: shape {:?}, expected {:?}", actual.dims(), expected.dims());
    let (actual_bits, expected_bits) = (bits(actual)?, bits(expected)?);
    let mut differing = actual_bits.iter().zip(&expected_bits).enumerate().filter(|(_, (a, e))| a != e);
    let Some((index, (a, e))) = differing.next() else {
        return Ok(());
    };
    let n_differing = 1 + differing.count();
    let value = |tensor: &Tensor| -> Result<f64> {
        Ok(tensor.flatten_all()?.get(index)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    };
    bail!(
        "{label}: not bit-identical: {n_differing} of {} elements differ; the first at {:?} of {:?}: {} (bits {a:#x}) vs expected {} (bits {e:#x})",
        actual_bits.len(),
        position(index, actual.dims()),
        actual.dims(),
        value(actual)?,
        value(expected)?,
    )
}

/// The largest element-wise difference between two tensors, and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Worst {
    diff: f32,
    element: Option<Element>,
}

#[derive(Debug, Clone, PartialEq)]
struct Element {
    index: usize,
    actual: f32,
    expected: f32,
    dims: Vec<usize>,
}

impl Worst {
    /// max |actual − expected|; NaN where one side is NaN and the other is not.
    pub fn diff(&self) -> f32 {
        self.diff
    }

    /// Whether the difference is at most `bound`; never for a NaN difference or a NaN bound.
    pub fn is_within(&self, bound: f32) -> bool {
        self.diff <= bound
    }

    /// The flat (row-major) index of the worst element; `None` for empty tensors.
    pub fn index(&self) -> Option<usize> {
        self.element.as_ref().map(|element| element.index)
    }
}

impl fmt::Display for Worst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.element {
            None => write!(f, "{:.3e} (no elements)", self.diff),
            Some(Element { index, actual, expected, dims }) => write!(
                f,
                "{:.3e} at {:?} of {dims:?}: {actual} vs expected {expected}",
                self.diff,
                position(*index, dims)
            ),
        }
    }
}

/// max |actual − expected| over two tensors of one shape, compared in f32, with its element.
///
/// A NaN on one side only is the worst difference (the first such element is named); NaNs on
/// both sides at one element match, and so do equal infinities.
pub fn compare(actual: &Tensor, expected: &Tensor) -> Result<Worst> {
    ensure!(actual.dims() == expected.dims(), "shape {:?}, expected {:?}", actual.dims(), expected.dims());
    let actual_values = f32_values(actual)?;
    let expected_values = f32_values(expected)?;
    let mut worst: Option<(usize, f32)> = None;
    for (index, (a, e)) in actual_values.iter().zip(&expected_values).enumerate() {
        let diff = element_diff(*a, *e);
        let replace = match worst {
            None => true,
            Some((_, worst_diff)) => !worst_diff.is_nan() && (diff.is_nan() || diff > worst_diff),
        };
        if replace {
            worst = Some((index, diff));
        }
    }
    Ok(match worst {
        None => Worst { diff: 0.0, element: None },
        Some((index, diff)) => Worst {
            diff,
            element: Some(Element {
                index,
                actual: actual_values[index],
                expected: expected_values[index],
                dims: expected.dims().to_vec(),
            }),
        },
    })
}

/// [`compare`], printed, and an error unless the difference is at most `bound`.
pub fn ensure_close(label: &str, actual: &Tensor, expected: &Tensor, bound: f32) -> Result<Worst> {
    let worst = compare(actual, expected).map_err(|err| err.context(label.to_owned()))?;
    println!("{label}: max |diff| {worst} (bound {bound:.3e})");
    ensure!(worst.is_within(bound), "{label}: max |actual - expected| {worst} exceeds the bound {bound:e}");
    Ok(worst)
}

/// max |x| over a tensor, in f32; a NaN is an error naming its element.
pub fn max_abs(tensor: &Tensor) -> Result<f32> {
    let values = f32_values(tensor)?;
    if let Some(index) = values.iter().position(|value| value.is_nan()) {
        bail!("max_abs: NaN at {:?} of {:?}", position(index, tensor.dims()), tensor.dims());
    }
    Ok(values.iter().fold(0.0, |max, value| max.max(value.abs())))
}

/// max |x| over the finite elements of a tensor (0 if there are none).
pub fn max_abs_finite(tensor: &Tensor) -> Result<f32> {
    Ok(f32_values(tensor)?.iter().filter(|value| value.is_finite()).fold(0.0, |max, value| max.max(value.abs())))
}

/// `max(1, max |x|)`: the scale a relative tolerance multiplies; a NaN is an error.
pub fn scale(tensor: &Tensor) -> Result<f32> {
    Ok(max_abs(tensor)?.max(1.0))
}

fn f32_values(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn element_diff(actual: f32, expected: f32) -> f32 {
    match (actual.is_nan(), expected.is_nan()) {
        (true, true) => 0.0,
        (false, false) if actual == expected => 0.0,
        (false, false) => (actual - expected).abs(),
        _ => f32::NAN,
    }
}

/// The row-major multi-index of flat `index` in `dims`.
fn position(index: usize, dims: &[usize]) -> Vec<usize> {
    let mut rest = index;
    let mut position = vec![0; dims.len()];
    for (axis, &len) in dims.iter().enumerate().rev() {
        position[axis] = rest % len.max(1);
        rest /= len.max(1);
    }
    position
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn tensor(values: &[f32], dims: &[usize]) -> Tensor {
        Tensor::new(values, &Device::Cpu).and_then(|t| t.reshape(dims)).expect("a small tensor")
    }

    /// What candle's own reduction says, for contrast: it skips the NaN.
    fn candle_max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()).expect("candle max")
    }

    #[test]
    fn a_nan_on_one_side_fails_and_is_named() -> Result<()> {
        let expected = tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
        let actual = tensor(&[1.0, 2.5, 3.0, 4.0, f32::NAN, 6.0], &[2, 3]);
        assert_eq!(candle_max_abs_diff(&actual, &expected), 0.5, "the premise: candle skips the NaN");
        for (a, e) in [(&actual, &expected), (&expected, &actual)] {
            let worst = compare(a, e)?;
            assert!(worst.diff().is_nan());
            assert_eq!(worst.index(), Some(4));
            assert!(!worst.is_within(f32::INFINITY));
            assert!(worst.to_string().contains("at [1, 1] of [2, 3]"), "{worst}");
            let err = ensure_close("nan", a, e, 1.0).expect_err("a NaN passed");
            assert!(err.to_string().contains("[1, 1]"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn matching_nans_and_infinities_are_equal() -> Result<()> {
        let values = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0];
        let worst = compare(&tensor(&values, &[4]), &tensor(&values, &[4]))?;
        assert_eq!(worst.diff(), 0.0);
        let other = compare(&tensor(&values, &[4]), &tensor(&[f32::NAN, f32::INFINITY, 0.0, 1.0], &[4]))?;
        assert_eq!((other.diff(), other.index()), (f32::INFINITY, Some(2)));
        Ok(())
    }

    #[test]
    fn the_largest_difference_is_found() -> Result<()> {
        let worst = compare(&tensor(&[0.0, 1.0, -3.0, 2.0], &[2, 2]), &tensor(&[0.0, 1.5, 1.0, 2.0], &[2, 2]))?;
        assert_eq!((worst.diff(), worst.index()), (4.0, Some(2)));
        assert!(worst.is_within(4.0) && !worst.is_within(3.9));
        assert!(compare(&tensor(&[1.0], &[1]), &tensor(&[1.0, 2.0], &[2])).is_err(), "shapes differ");
        let empty = compare(&tensor(&[], &[0]), &tensor(&[], &[0]))?;
        assert_eq!((empty.diff(), empty.index()), (0.0, None));
        Ok(())
    }

    #[test]
    fn bit_identity_sees_signed_zeros_and_nan_payloads() -> Result<()> {
        let quiet = f32::from_bits(0x7fc0_0000);
        let payload = f32::from_bits(0x7fc0_0001);
        let base = tensor(&[0.0, quiet, 1.0], &[3]);
        ensure_bit_identical("same", &base, &base.copy()?)?;
        for (what, other) in [("-0", [-0.0, quiet, 1.0]), ("payload", [0.0, payload, 1.0])] {
            let other = tensor(&other, &[3]);
            assert_eq!(compare(&other, &base)?.diff(), 0.0, "{what}: the values compare equal");
            let err = ensure_bit_identical(what, &other, &base).expect_err("different bits passed");
            assert!(err.to_string().contains("1 of 3 elements differ"), "{err}");
        }
        let bf16 = base.to_dtype(DType::BF16)?;
        assert_eq!(bits(&bf16)?, [0, 0x7fc0, 0x3f80]);
        assert!(ensure_bit_identical("dtype", &bf16, &base).is_err());
        assert_eq!(bits(&Tensor::new(&[-1i64], &Device::Cpu)?)?, [u64::MAX]);
        Ok(())
    }

    #[test]
    fn max_abs_refuses_nan() -> Result<()> {
        let values = tensor(&[1.0, -7.0, f32::NAN, f32::INFINITY], &[2, 2]);
        let err = max_abs(&values).expect_err("a NaN passed");
        assert!(err.to_string().contains("NaN at [1, 0]"), "{err}");
        assert_eq!(max_abs_finite(&values)?, 7.0);
        assert_eq!(scale(&tensor(&[0.25, -0.5], &[2]))?, 1.0);
        assert_eq!(scale(&tensor(&[0.25, -3.0], &[2]))?, 3.0);
        Ok(())
    }
}
