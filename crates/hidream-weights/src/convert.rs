//! One-pass conversion of a tensor's stored little-endian bytes into a caller's slice, for
//! [`Checkpoint::read_into`](crate::Checkpoint::read_into).
//!
//! Every conversion is the one candle's CPU `to_dtype` applies (same function, element by
//! element), so the result is bit-identical to `Tensor::from_raw_buffer(..).to_dtype(..)`, NaN
//! payloads, infinities and subnormals included; the half-precision ones go through `half`'s
//! slice conversions, which use F16C on x86 where the CPU has it, as `half`'s scalar ones do.
//!
//! The loops live in this crate's non-generic code (one instantiation per destination type, made
//! here), so they are compiled with this crate's `opt-level = 3` even when the caller is a dev
//! build at `opt-level = 0`.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use safetensors::Dtype;

/// A destination element type of [`Checkpoint::read_into`](crate::Checkpoint::read_into): `f32`,
/// `f64`, `half::f16` or `half::bf16`, the float dtypes candle computes in. It is sealed: the
/// conversions are this crate's.
pub trait ReadDType: candle_core::WithDType + sealed::Convert {}

impl ReadDType for f32 {}
impl ReadDType for f64 {}
impl ReadDType for f16 {}
impl ReadDType for bf16 {}

/// Converts `bytes`, the little-endian data of a tensor stored as `dtype`, into `dst`.
///
/// The caller guarantees that `dtype` is F32, F64, F16 or BF16 and that `bytes` holds exactly
/// `dst.len()` elements of it; the function never reads or writes past either slice either way.
pub(crate) fn convert_into<T: ReadDType>(dtype: Dtype, bytes: &[u8], dst: &mut [T]) {
    T::convert_bytes(dtype, bytes, dst);
}

/// `dst`'s memory as bytes: where the stored dtype is `T` itself (on a little-endian machine), the
/// stored bytes are read straight into it.
pub(crate) fn bytes_mut<T: ReadDType>(dst: &mut [T]) -> &mut [u8] {
    T::bytes_mut(dst)
}

/// `n` zeros of `T` in a new vector (for f32 and f64, without a pass over its memory).
pub(crate) fn zeroed_vec<T: ReadDType>(n: usize) -> Vec<T> {
    T::zeroed_vec(n)
}

/// The bytes per element of the dtypes [`convert_into`] reads, or `None` for the others.
pub(crate) fn element_bytes(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F16 | Dtype::BF16 => Some(2),
        Dtype::F32 => Some(4),
        Dtype::F64 => Some(8),
        _ => None,
    }
}

pub(crate) mod sealed {
    use super::*;

    /// A stored tensor, aligned and in native order, as the slice of its element type.
    #[derive(Clone, Copy)]
    pub enum Stored<'a> {
        F32(&'a [f32]),
        F64(&'a [f64]),
        F16(&'a [f16]),
        BF16(&'a [bf16]),
    }

    /// The conversions into one destination type. `convert` is candle's `to_dtype` for each
    /// stored dtype; `convert_bytes` reads the stored bytes (aligned or not) into `Stored`.
    pub trait Convert: Sized {
        fn convert(src: Stored<'_>, dst: &mut [Self]);
        fn convert_bytes(dtype: Dtype, bytes: &[u8], dst: &mut [Self]);
        /// The slice's memory as bytes, for a read straight into it in the stored dtype.
        fn bytes_mut(dst: &mut [Self]) -> &mut [u8];
        /// `n` zeros; for f32 and f64 allocated zeroed (for a large `n`, the kernel's fresh pages:
        /// no pass over the memory before the conversion writes it).
        fn zeroed_vec(n: usize) -> Vec<Self>;
    }

    macro_rules! zeroed_16 {
        ($ty:ty) => {
            fn zeroed_vec(n: usize) -> Vec<$ty> {
                // std allocates zeroed only for its own types: this is a fill, as cheap as the
                // conversion's own pass (a half-size write) and cheaper than a staging copy.
                vec![<$ty>::ZERO; n]
            }
        };
    }

    macro_rules! convert_bytes {
        ($ty:ty) => {
            fn convert_bytes(dtype: Dtype, bytes: &[u8], dst: &mut [$ty]) {
                match dtype {
                    Dtype::F32 => read_as::<f32, $ty>(bytes, dst, |src| Stored::F32(src)),
                    Dtype::F64 => read_as::<f64, $ty>(bytes, dst, |src| Stored::F64(src)),
                    Dtype::F16 => read_as::<u16, $ty>(bytes, dst, |bits| Stored::F16(bits.reinterpret_cast())),
                    Dtype::BF16 => read_as::<u16, $ty>(bytes, dst, |bits| Stored::BF16(bits.reinterpret_cast())),
                    // `Checkpoint::read_into` rejects every other stored dtype before calling.
                    _ => {}
                }
            }
        };
    }

    impl Convert for f32 {
        fn convert(src: Stored<'_>, dst: &mut [f32]) {
            match src {
                Stored::F32(src) => dst.copy_from_slice(src),
                Stored::F64(src) => dst.iter_mut().zip(src).for_each(|(out, value)| *out = *value as f32),
                Stored::F16(src) => src.convert_to_f32_slice(dst),
                Stored::BF16(src) => src.convert_to_f32_slice(dst),
            }
        }
        convert_bytes!(f32);
        fn bytes_mut(dst: &mut [f32]) -> &mut [u8] {
            bytemuck::cast_slice_mut(dst)
        }
        fn zeroed_vec(n: usize) -> Vec<f32> {
            vec![0.0; n]
        }
    }

    impl Convert for f64 {
        fn convert(src: Stored<'_>, dst: &mut [f64]) {
            match src {
                Stored::F32(src) => dst.iter_mut().zip(src).for_each(|(out, value)| *out = f64::from(*value)),
                Stored::F64(src) => dst.copy_from_slice(src),
                Stored::F16(src) => src.convert_to_f64_slice(dst),
                Stored::BF16(src) => src.convert_to_f64_slice(dst),
            }
        }
        convert_bytes!(f64);
        fn bytes_mut(dst: &mut [f64]) -> &mut [u8] {
            bytemuck::cast_slice_mut(dst)
        }
        fn zeroed_vec(n: usize) -> Vec<f64> {
            vec![0.0; n]
        }
    }

    impl Convert for f16 {
        fn convert(src: Stored<'_>, dst: &mut [f16]) {
            match src {
                Stored::F32(src) => dst.convert_from_f32_slice(src),
                Stored::F64(src) => dst.convert_from_f64_slice(src),
                Stored::F16(src) => dst.copy_from_slice(src),
                // candle: `f16::from_f32(v.to_f32())`.
                Stored::BF16(src) => {
                    dst.iter_mut().zip(src).for_each(|(out, value)| *out = f16::from_f32(value.to_f32()))
                }
            }
        }
        convert_bytes!(f16);
        fn bytes_mut(dst: &mut [f16]) -> &mut [u8] {
            bytemuck::cast_slice_mut(dst.reinterpret_cast_mut())
        }
        zeroed_16!(f16);
    }

    impl Convert for bf16 {
        fn convert(src: Stored<'_>, dst: &mut [bf16]) {
            match src {
                Stored::F32(src) => dst.convert_from_f32_slice(src),
                Stored::F64(src) => dst.convert_from_f64_slice(src),
                // candle: `bf16::from_f32(v.to_f32())`.
                Stored::F16(src) => {
                    dst.iter_mut().zip(src).for_each(|(out, value)| *out = bf16::from_f32(value.to_f32()))
                }
                Stored::BF16(src) => dst.copy_from_slice(src),
            }
        }
        convert_bytes!(bf16);
        fn bytes_mut(dst: &mut [bf16]) -> &mut [u8] {
            bytemuck::cast_slice_mut(dst.reinterpret_cast_mut())
        }
        zeroed_16!(bf16);
    }

    /// A stored element as it sits in the file: its bits, read from little-endian bytes.
    trait Raw: bytemuck::Pod {
        const BYTES: usize;
        fn from_le(bytes: &[u8]) -> Self;
    }

    macro_rules! raw {
        ($ty:ty, $n:literal) => {
            impl Raw for $ty {
                const BYTES: usize = $n;
                fn from_le(bytes: &[u8]) -> Self {
                    let mut array = [0u8; $n];
                    array.copy_from_slice(bytes);
                    <$ty>::from_le_bytes(array)
                }
            }
        };
    }
    raw!(u16, 2);
    raw!(f32, 4);
    raw!(f64, 8);

    /// Elements converted at a time when the stored bytes cannot be borrowed as `&[S]`: 16 KiB of
    /// f32, so that the staging copy stays in the L1 cache.
    const CHUNK: usize = 4096;

    /// Converts `bytes` (elements of `S`, little-endian) into `dst`. When the bytes are aligned for
    /// `S` and the machine is little-endian they are converted in place, in one pass; otherwise
    /// (an odd header length puts data at any offset) each chunk is first read into a small array
    /// on the stack.
    fn read_as<S: Raw, T: Convert>(bytes: &[u8], dst: &mut [T], stored: impl Fn(&[S]) -> Stored<'_>) {
        if cfg!(target_endian = "little")
            && let Ok(src) = bytemuck::try_cast_slice::<u8, S>(bytes)
            && src.len() == dst.len()
        {
            T::convert(stored(src), dst);
            return;
        }
        let mut staging = [S::zeroed(); CHUNK];
        for (chunk, out) in bytes.chunks(CHUNK * S::BYTES).zip(dst.chunks_mut(CHUNK)) {
            let staged = &mut staging[..out.len()];
            for (value, element) in staged.iter_mut().zip(chunk.chunks_exact(S::BYTES)) {
                *value = S::from_le(element);
            }
            T::convert(stored(staged), out);
        }
    }
}
