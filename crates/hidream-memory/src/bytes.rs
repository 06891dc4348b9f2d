//! Byte sizes as people write them (`512MiB`, `8GiB`, `1.5GB`, `25%`) and as reports print them.

use std::fmt;
use std::str::FromStr;

use crate::MemoryError;

/// Parses a byte size: a plain number of bytes (`1073741824`) or a number with a unit.
///
/// Units are case-insensitive. `KiB`, `MiB`, `GiB` and `TiB` (and the shorthands `K`, `M`, `G`,
/// `T`) are binary; `KB`, `MB`, `GB` and `TB` are decimal; `B` is bytes. A fraction such as
/// `1.5GB` is exact; a fraction of a byte is rounded down, so a budget never grows by parsing.
pub fn parse_bytes(s: &str) -> Result<u64, MemoryError> {
    let invalid = |problem| MemoryError::InvalidSize { given: s.to_owned(), problem };
    let trimmed = s.trim();
    let number_len = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(invalid("does not start with a number"));
    }
    if fraction.contains('.') {
        return Err(invalid("more than one decimal point"));
    }
    let multiplier = unit_multiplier(unit.trim()).ok_or_else(|| invalid("unknown unit"))?;
    let too_large = || invalid("too large");
    let mut mantissa: u128 = 0;
    for digit in whole.bytes().chain(fraction.bytes()) {
        mantissa =
            mantissa.checked_mul(10).and_then(|m| m.checked_add(u128::from(digit - b'0'))).ok_or_else(too_large)?;
    }
    let denominator =
        u32::try_from(fraction.len()).ok().and_then(|len| 10u128.checked_pow(len)).ok_or_else(too_large)?;
    let bytes = mantissa.checked_mul(u128::from(multiplier)).ok_or_else(too_large)? / denominator;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Formats a byte count for people: `512 B`, `583.00 MiB`, `31.86 GiB` (binary units).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit_idx = 0;
    while value >= 1024.0 && unit_idx + 1 < UNITS.len() {
        value /= 1024.0;
        unit_idx += 1;
    }
    format!("{value:.2} {}", UNITS[unit_idx])
}

/// A memory budget as a user gives it: bytes, or a share of the model's weights.
///
/// A share such as `25%` is resolved by the caller, which knows the total weight bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A fraction of the total weight bytes, in `0.0..=1.0` (`25%` is `0.25`).
    FractionOfWeights(f64),
}

impl Budget {
    /// Parses `25%` as a fraction of the weights and anything else with [`parse_bytes`].
    pub fn parse(s: &str) -> Result<Self, MemoryError> {
        let Some(percent) = s.trim().strip_suffix('%') else {
            return parse_bytes(s).map(Budget::Bytes);
        };
        let invalid = |problem| MemoryError::InvalidSize { given: s.to_owned(), problem };
        let percent: f64 = percent.trim().parse().map_err(|_| invalid("not a percentage"))?;
        if !(0.0..=100.0).contains(&percent) {
            return Err(invalid("a percentage must lie between 0% and 100%"));
        }
        Ok(Budget::FractionOfWeights(percent / 100.0))
    }

    /// The budget in bytes for a model of `total_weight_bytes`, rounded down.
    pub fn resolve(self, total_weight_bytes: u64) -> u64 {
        match self {
            Budget::Bytes(bytes) => bytes,
            Budget::FractionOfWeights(fraction) => (total_weight_bytes as f64 * fraction).floor() as u64,
        }
    }
}

impl FromStr for Budget {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Budget::parse(s)
    }
}

impl fmt::Display for Budget {
    /// Writes a form that [`Budget::parse`] reads back: `8GiB`, `1000`, `25%`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Budget::Bytes(bytes) => f.write_str(&format_bytes_parseable(bytes)),
            Budget::FractionOfWeights(fraction) => write!(f, "{}%", fraction * 100.0),
        }
    }
}

/// The largest binary unit that divides `bytes` exactly, in the form [`parse_bytes`] reads: `8GiB`.
pub(crate) fn format_bytes_parseable(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    UNITS
        .iter()
        .find(|(_, shift)| bytes != 0 && bytes.trailing_zeros() >= *shift)
        .map_or_else(|| bytes.to_string(), |(unit, shift)| format!("{}{unit}", bytes >> shift))
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    Some(multiplier)
}
