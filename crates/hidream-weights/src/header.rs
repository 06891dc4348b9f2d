//! Checking one safetensors header, so that a malformed file becomes a typed error naming the
//! tensor, and never a panic or an out-of-range read later.
//!
//! The header is parsed twice: once here into safetensors' own `TensorInfo`, to check every
//! tensor's offsets in our own words, and then by `SafeTensors::read_metadata` itself, so that we
//! accept exactly the files that the safetensors crate (and so diffusers) accepts.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorInfo as RawInfo};
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::{Result, WeightsError};

/// safetensors' own limit on the header size.
pub(crate) const MAX_HEADER_BYTES: u64 = 100_000_000;
/// The little-endian `u64` header length that starts every safetensors file.
const LEN_BYTES: usize = 8;

/// Where one tensor lives in its file.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The tensor's bytes, as a range of the whole file (header included).
    pub range: Range<usize>,
}

#[derive(Deserialize)]
struct RawHeader {
    #[serde(rename = "__metadata__", default)]
    _metadata: Option<IgnoredAny>,
    #[serde(flatten)]
    tensors: HashMap<String, RawInfo>,
}

/// Parses and checks the header of the safetensors file `file`, whose whole content is `bytes`.
/// On success every returned range lies inside `bytes` and holds exactly its tensor.
pub(crate) fn parse_header(file: &Path, bytes: &[u8]) -> Result<HashMap<String, Entry>> {
    let Some(len_bytes) = bytes.first_chunk::<LEN_BYTES>() else {
        let problem = format!("the file has {} bytes, fewer than the 8 of the header length", bytes.len());
        return Err(WeightsError::MalformedHeader { file: file.to_owned(), problem });
    };
    let declared = u64::from_le_bytes(*len_bytes);
    let available = ((bytes.len() - LEN_BYTES) as u64).min(MAX_HEADER_BYTES);
    if declared > available {
        return Err(WeightsError::HeaderTooLarge { file: file.to_owned(), declared, available });
    }
    // `declared` fits: it is at most the file length.
    let data_start = LEN_BYTES + declared as usize;
    let header: RawHeader =
        serde_json::from_slice(&bytes[LEN_BYTES..data_start]).map_err(|err| WeightsError::MalformedHeader {
            file: file.to_owned(),
            problem: format!("not a safetensors JSON header ({err})"),
        })?;

    let mut tensors: Vec<(String, RawInfo)> = header.tensors.into_iter().collect();
    tensors.sort_by(|(a_name, a), (b_name, b)| a.data_offsets.cmp(&b.data_offsets).then_with(|| a_name.cmp(b_name)));
    let mut previous: Option<(&str, usize)> = None;
    for (name, info) in &tensors {
        check_tensor(file, name, info, previous)?;
        previous = Some((name, info.data_offsets.1));
    }
    let data_len = bytes.len() - data_start;
    check_data_len(file, &tensors, data_len)?;

    // Our checks bound every offset by the file length, so the safetensors crate's own arithmetic
    // cannot overflow here; it rejects what we did not look at (such as a non-string metadata map).
    SafeTensors::read_metadata(bytes).map_err(|source| WeightsError::Safetensors { file: file.to_owned(), source })?;

    let entries = tensors.into_iter().map(|(name, info)| {
        let (start, end) = info.data_offsets;
        let entry = Entry { dtype: info.dtype, shape: info.shape, range: data_start + start..data_start + end };
        (name, entry)
    });
    Ok(entries.collect())
}

/// Checks one tensor's offsets against its dtype and shape and against the tensor before it.
fn check_tensor(file: &Path, name: &str, info: &RawInfo, previous: Option<(&str, usize)>) -> Result<()> {
    let bad = |problem: String| WeightsError::BadOffsets { file: file.to_owned(), tensor: name.to_owned(), problem };
    let (start, end) = info.data_offsets;
    if end < start {
        return Err(bad(format!("[{start}, {end}] ends before it starts")));
    }
    let n_bytes = byte_size(info.dtype, &info.shape).ok_or_else(|| {
        bad(format!("a {} tensor of shape {:?} has no valid size in whole bytes", info.dtype, info.shape))
    })?;
    if end - start != n_bytes {
        return Err(bad(format!(
            "[{start}, {end}] holds {} bytes, but {} × {:?} needs {n_bytes}",
            end - start,
            info.dtype,
            info.shape
        )));
    }
    let (before, previous_end) = match previous {
        Some((previous_name, previous_end)) => (format!("`{previous_name}`, which ends"), previous_end),
        None => ("the start of the data section,".to_owned(), 0),
    };
    match start.cmp(&previous_end) {
        Ordering::Equal => Ok(()),
        Ordering::Less => Err(bad(format!("it starts at data byte {start}, overlapping {before} at {previous_end}"))),
        Ordering::Greater => {
            Err(bad(format!("it starts at data byte {start}, leaving a gap after {before} at {previous_end}")))
        }
    }
}

/// Checks that the tensors, already known to be contiguous, cover the data section exactly.
fn check_data_len(file: &Path, tensors: &[(String, RawInfo)], data_len: usize) -> Result<()> {
    // The first tensor that crosses the end of the file is the one that was cut.
    if let Some((name, info)) = tensors.iter().find(|(_, info)| info.data_offsets.1 > data_len) {
        return Err(WeightsError::Truncated {
            file: file.to_owned(),
            tensor: name.clone(),
            needed: info.data_offsets.1 as u64,
            actual: data_len as u64,
        });
    }
    let end = tensors.last().map_or(0, |(_, info)| info.data_offsets.1);
    if end == data_len {
        return Ok(());
    }
    let extra = data_len - end;
    Err(match tensors.last() {
        Some((name, _)) => WeightsError::BadOffsets {
            file: file.to_owned(),
            tensor: name.clone(),
            problem: format!("{extra} bytes of data follow this last tensor"),
        },
        None => WeightsError::MalformedHeader {
            file: file.to_owned(),
            problem: format!("the header lists no tensor, but {extra} bytes of data follow it"),
        },
    })
}

/// Bytes of a tensor, or `None` when the element count overflows or is not a whole number of bytes.
pub(crate) fn byte_size(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let n_elements = shape.iter().try_fold(1usize, |acc, dim| acc.checked_mul(*dim))?;
    let n_bits = n_elements.checked_mul(dtype.bitsize())?;
    (n_bits % 8 == 0).then_some(n_bits / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file from a header (given as JSON) and `n_data` bytes of data.
    fn file_bytes(header: &str, n_data: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + n_data, 0);
        bytes
    }

    /// Parses a crafted file and returns the error, or `"ok"` with the tensors sorted by offset.
    fn check(header: &str, n_data: usize) -> String {
        match parse_header(Path::new("x.safetensors"), &file_bytes(header, n_data)) {
            Ok(entries) => {
                let mut ranges: Vec<_> = entries.into_iter().map(|(name, entry)| (entry.range.start, name)).collect();
                ranges.sort();
                format!("ok {:?}", ranges.into_iter().map(|(_, name)| name).collect::<Vec<_>>())
            }
            Err(err) => format!("{err:?}"),
        }
    }

    #[test]
    fn headers() {
        let a = r#""a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}"#;
        let b = r#""b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}"#;
        let cases: &[(String, usize, &str)] = &[
            (format!("{{{a},{b}}}"), 16, r#"ok ["a", "b"]"#),
            (format!(r#"{{"__metadata__":{{"format":"pt"}},{b},{a}}}"#), 16, r#"ok ["a", "b"]"#),
            ("{}".into(), 0, "ok []"),
            (format!("{{{a},{b}}}"), 12, r#"Truncated { file: "x.safetensors", tensor: "b", needed: 16, actual: 12"#),
            (format!("{{{a},{b}}}"), 20, "BadOffsets { file: \"x.safetensors\", tensor: \"b\", problem: \"4 bytes"),
            ("{}".into(), 3, "MalformedHeader"),
            (format!("{{{a},{}}}", b.replace("[8,16]", "[4,12]")), 16, "overlapping `a`"),
            (format!("{{{a},{}}}", b.replace("[8,16]", "[9,17]")), 17, "leaving a gap after `a`"),
            (format!("{{{}}}", a.replace("[0,8]", "[4,12]")), 12, "gap after the start of the data section"),
            (format!("{{{}}}", a.replace("[0,8]", "[8,0]")), 8, "ends before it starts"),
            (format!("{{{}}}", a.replace("[2]", "[3]")), 8, "holds 8 bytes, but F32 × [3] needs 12"),
            (format!("{{{}}}", a.replace("[2]", "[4294967296,4294967296]")), 8, "no valid size"),
            (format!("{{{}}}", a.replace("[0,8]", "[18446744073709551615,0]")), 8, "ends before it starts"),
            (format!("{{{}}}", a.replace("F32", "F4").replace("[2]", "[3]")), 8, "no valid size"),
            (format!("{{{}}}", a.replace("F32", "I64").replace("[2]", "[1]")), 8, r#"ok ["a"]"#),
            (format!("{{{a}"), 8, "MalformedHeader"),
            (format!("{{{}}}", a.replace("F32", "F33")), 8, "MalformedHeader"),
            (r#"{"__metadata__":{"n":1}}"#.into(), 0, "Safetensors"),
        ];
        for (header, n_data, expected) in cases {
            let got = check(header, *n_data);
            assert!(got.contains(expected), "header {header} with {n_data} data bytes:\n got {got}\nwant {expected}");
        }
    }

    /// Offsets that add up to nearly `usize::MAX` overflow the safetensors crate's own arithmetic
    /// (`SafeTensors::read_metadata` panics on this header in debug builds, checked by hand with
    /// safetensors 0.8.0); our checks must stop them first.
    #[test]
    fn offsets_near_the_end_of_the_address_space_are_an_error() {
        let size = 1usize << 60;
        let entries: Vec<String> = (0..16)
            .map(|idx| {
                let end = if idx == 15 { idx * size + (size - 16) } else { (idx + 1) * size };
                let shape = end - idx * size;
                format!(r#""t{idx}":{{"dtype":"U8","shape":[{shape}],"data_offsets":[{},{end}]}}"#, idx * size)
            })
            .collect();
        let header = format!("{{{}}}", entries.join(","));
        let got = check(&header, 0);
        assert!(got.contains(r#"Truncated { file: "x.safetensors", tensor: "t0""#), "{got}");
    }

    #[test]
    fn header_length_is_bounded_by_the_file_and_the_limit() {
        let check_len = |declared: u64, file_len: usize| {
            let mut bytes = declared.to_le_bytes().to_vec();
            bytes.resize(file_len, b' ');
            parse_header(Path::new("x"), &bytes).unwrap_err()
        };
        for (declared, file_len, available) in [(u64::MAX, 8, 0), (100, 50, 42), (MAX_HEADER_BYTES + 1, 20, 12)] {
            match check_len(declared, file_len) {
                WeightsError::HeaderTooLarge { declared: d, available: a, .. } => {
                    assert_eq!((d, a), (declared, available))
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(parse_header(Path::new("x"), &[1, 2, 3]), Err(WeightsError::MalformedHeader { .. })));
    }
}
