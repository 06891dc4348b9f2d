//! `Checkpoint::read_into` and `Checkpoint::load` are bit-identical to candle's `from_raw_buffer`
//! plus `to_dtype` for every stored and destination float dtype, at every alignment of the data,
//! NaN payloads, infinities and subnormals included; and misuse is a typed error.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use hidream_weights::{Checkpoint, ReadDType};
use proptest::prelude::*;

use super::util::{entry, raw_file};

/// The raw bits of a float, to compare NaN payloads too.
trait Bits: ReadDType + candle_core::WithDType {
    fn bits(self) -> u64;
}

impl Bits for f32 {
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
}
impl Bits for f64 {
    fn bits(self) -> u64 {
        self.to_bits()
    }
}
impl Bits for f16 {
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
}
impl Bits for bf16 {
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
}

/// A one-tensor file `t` of `dtype` holding `data`, its data section starting `misalign` bytes
/// past a multiple of 8 (the header is padded with spaces, as safetensors pads it).
fn file_with(dtype: &str, n_elements: usize, data: &[u8], misalign: usize) -> Vec<u8> {
    let mut header = format!("{{{}}}", entry("t", dtype, &[n_elements], (0, data.len())));
    while (8 + header.len()) % 8 != misalign % 8 {
        header.push(' ');
    }
    raw_file(&header, data)
}

/// Reads `t` into every destination dtype with `read_into` and with `load`, and compares the bits
/// with candle's own conversion of the same bytes.
#[track_caller]
fn check(dtype: &str, n_elements: usize, data: &[u8], misalign: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    std::fs::write(&path, file_with(dtype, n_elements, data, misalign)).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    assert_eq!(checkpoint.tensor_numel("t").unwrap(), n_elements);
    let stored = match dtype {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        other => panic!("not a float dtype: {other}"),
    };
    let reference = Tensor::from_raw_buffer(data, stored, &[n_elements], &Device::Cpu).unwrap();
    let case = Case { checkpoint: &checkpoint, reference: &reference, dtype, misalign };
    case.check_into::<f32>();
    case.check_into::<f64>();
    case.check_into::<f16>();
    case.check_into::<bf16>();
}

struct Case<'a> {
    checkpoint: &'a Checkpoint,
    /// The stored tensor as candle reads it, in its stored dtype.
    reference: &'a Tensor,
    dtype: &'a str,
    misalign: usize,
}

impl Case<'_> {
    #[track_caller]
    fn check_into<T: Bits>(&self) {
        let expected: Vec<T> = self.reference.to_dtype(T::DTYPE).unwrap().to_vec1().unwrap();
        // A dirty buffer, as a reused slot's would be.
        let mut got = vec![T::from_f64(7.0); expected.len()];
        self.checkpoint.read_into("t", &mut got).unwrap();
        let loaded: Vec<T> = self.checkpoint.load("t", T::DTYPE, &Device::Cpu).unwrap().to_vec1().unwrap();
        for (path, got) in [("read_into", &got), ("load", &loaded)] {
            assert_eq!(got.len(), expected.len(), "{path}");
            for (idx, (got, want)) in got.iter().zip(&expected).enumerate() {
                assert_eq!(
                    got.bits(),
                    want.bits(),
                    "{path}, {} -> {:?}, data at +{}: element {idx} is {got} ({:#x}), candle gives {want} ({:#x})",
                    self.dtype,
                    T::DTYPE,
                    self.misalign,
                    got.bits(),
                    want.bits()
                );
            }
        }
    }
}

fn bytes_of<const N: usize>(values: impl IntoIterator<Item = [u8; N]>) -> Vec<u8> {
    values.into_iter().flatten().collect()
}

/// Bits of the edge cases of a 16-bit float layout with `exponent_bits`: zeros, the smallest and
/// largest subnormals, the largest finite, infinities, quiet and signalling NaNs with payloads,
/// and a few ordinary values.
fn half_edge_bits(exponent_bits: u32) -> Vec<u16> {
    let mantissa_bits = 15 - exponent_bits;
    let inf = ((1u16 << exponent_bits) - 1) << mantissa_bits;
    let quiet = 1u16 << (mantissa_bits - 1);
    let mantissa_max = (1u16 << mantissa_bits) - 1;
    let values = [0, 1, mantissa_max, inf - 1, inf, inf | 1, inf | quiet, inf | quiet | 1, inf | mantissa_max];
    let mut all: Vec<u16> = values.iter().flat_map(|bits| [*bits, bits | 0x8000]).collect();
    all.extend([0x3c00, 0x3f80, 0x4049, 0x1234, 0xabcd]);
    all
}

#[test]
fn edge_values_convert_as_load_does() {
    for misalign in 0..8 {
        let bf16_bits = half_edge_bits(8);
        check("BF16", bf16_bits.len(), &bytes_of(bf16_bits.iter().map(|b| b.to_le_bytes())), misalign);
        let f16_bits = half_edge_bits(5);
        check("F16", f16_bits.len(), &bytes_of(f16_bits.iter().map(|b| b.to_le_bytes())), misalign);

        // f32: subnormals, NaN payloads, ties and near-ties of the bf16 rounding, values that
        // overflow or underflow f16.
        let f32_bits: Vec<u32> = [
            0,
            0x8000_0000,
            1,
            0x007f_ffff,
            0x7f7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0x7fc0_0000,
            0xffc0_1234,
            0x7fbf_ffff,
            0x3f80_8000,
            0x3f81_8000,
            0x3f80_8001,
            0x3f80_7fff,
            0x7f7f_8000,
            1e6f32.to_bits(),
            1e-7f32.to_bits(),
            6.1e-5f32.to_bits(),
            65520f32.to_bits(),
            65519f32.to_bits(),
        ]
        .to_vec();
        check("F32", f32_bits.len(), &bytes_of(f32_bits.iter().map(|b| b.to_le_bytes())), misalign);

        let f64_bits: Vec<u64> = [
            0,
            1 << 63,
            1,
            0x7ff0_0000_0000_0000,
            0x7ff0_0000_0000_0001,
            0x7ff8_0000_0000_0001,
            0xfff8_dead_beef_0000,
            1e300f64.to_bits(),
            1e-320f64.to_bits(),
            1e-40f64.to_bits(),
            0x3ff0_0000_1000_0000,
            0x3ff0_0001_0000_0000,
            65520f64.to_bits(),
            1.000_976_562_5f64.to_bits(),
        ]
        .to_vec();
        check("F64", f64_bits.len(), &bytes_of(f64_bits.iter().map(|b| b.to_le_bytes())), misalign);
    }
}

#[test]
fn every_16_bit_pattern_converts_as_candle_does() {
    let all = bytes_of((0..=u16::MAX).map(u16::to_le_bytes));
    check("BF16", 1 << 16, &all, 0);
    check("F16", 1 << 16, &all, 0);
    check("BF16", 1 << 16, &all, 3);
}

#[test]
fn long_tensors_convert_across_chunks_at_every_alignment() {
    // Longer than the unaligned path's staging chunk, and not a multiple of it.
    let n_elements = 10_007;
    for misalign in [0, 1, 2, 4, 6] {
        let bf16_data = bytes_of((0..n_elements).map(|idx| ((idx as u16).wrapping_mul(40503)).to_le_bytes()));
        check("BF16", n_elements, &bf16_data, misalign);
        let f32_data = bytes_of((0..n_elements).map(|idx| ((idx as u32).wrapping_mul(2_654_435_761)).to_le_bytes()));
        check("F32", n_elements, &f32_data, misalign);
    }
}

#[test]
fn empty_tensors_read_into_empty_buffers() {
    for dtype in ["F32", "F16", "BF16", "F64"] {
        check(dtype, 0, &[], 0);
    }
}

#[test]
fn misuse_is_a_typed_error_naming_the_file_and_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let header = format!("{{{},{}}}", entry("w", "BF16", &[2, 3], (0, 12)), entry("ids", "I64", &[1], (12, 20)));
    std::fs::write(&path, raw_file(&header, &[0; 20])).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let file = path.display().to_string();
    let message = |err: hidream_weights::WeightsError| format!("{err:?}\n{err}");

    let mut short = vec![0f32; 5];
    let got = message(checkpoint.read_into("w", &mut short).unwrap_err());
    for want in ["LengthMismatch", "tensor `w`", &file, "buffer of 5 elements", "it has 6", "[2, 3]", "tensor_numel"] {
        assert!(got.contains(want), "expected {want:?} in\n{got}");
    }
    let mut long = vec![bf16::ZERO; 7];
    assert!(message(checkpoint.read_into("w", &mut long).unwrap_err()).contains("LengthMismatch"));

    let got = message(checkpoint.read_into("nope", &mut short).unwrap_err());
    assert!(got.contains("MissingTensor") && got.contains("`nope`") && got.contains(&file), "{got}");
    let got = message(checkpoint.tensor_numel("nope").unwrap_err());
    assert!(got.contains("MissingTensor") && got.contains("`nope`"), "{got}");

    let mut one = vec![0f32; 1];
    let got = message(checkpoint.read_into("ids", &mut one).unwrap_err());
    assert!(got.contains("UnsupportedDtype") && got.contains("`ids`") && got.contains(&file), "{got}");
    assert_eq!(checkpoint.tensor_numel("ids").unwrap(), 1);
}

#[test]
fn a_reused_buffer_matches_a_fresh_load_of_a_synthetic_unit() {
    let dir = tempfile::tempdir().unwrap();
    let summary = super::util::tiny_checkpoint(dir.path(), "tiny", hidream_weights::SynthOptions::default());
    let checkpoint = Checkpoint::open(&summary.dir).unwrap();
    let mut buffer = Vec::new();
    for name in checkpoint.tensor_names() {
        buffer.resize(checkpoint.tensor_numel(name).unwrap(), f32::NAN);
        checkpoint.read_into(name, &mut buffer).unwrap();
        let loaded = checkpoint.load(name, DType::F32, &Device::Cpu).unwrap();
        let loaded: Vec<f32> = loaded.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(loaded.len(), buffer.len(), "{name}");
        assert!(loaded.iter().zip(&buffer).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}");
    }
}

/// A stored dtype, with its element size, for the property test.
fn stored_dtype() -> impl Strategy<Value = (&'static str, usize)> {
    prop_oneof![Just(("F32", 4)), Just(("F16", 2)), Just(("BF16", 2)), Just(("F64", 8))]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random bit patterns (so NaNs, infinities and subnormals of every kind) at random
    /// alignments convert exactly as `load` converts them.
    #[test]
    fn random_bits_convert_as_load_does(
        (dtype, size) in stored_dtype(),
        words in prop::collection::vec(any::<u64>(), 0..64),
        misalign in 0..8usize,
    ) {
        let data: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
        check(dtype, data.len() / size, &data, misalign);
    }
}
