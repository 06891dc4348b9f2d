//! Sets of units as people read them: `embedders + 49 caption projections [0-48] + 12 double
//! blocks [0-11]`.

use hidream_config::{Unit, UnitKind};

/// The units at `indices` of `units`, grouped by kind with their index ranges.
pub fn summarise(units: &[Unit], indices: &[usize]) -> String {
    let kinds = [
        (UnitKind::Embedders, "embedders", "embedders"),
        (UnitKind::CaptionProjection, "caption projection", "caption projections"),
        (UnitKind::DoubleBlock, "double block", "double blocks"),
        (UnitKind::SingleBlock, "single block", "single blocks"),
    ];
    let parts: Vec<String> = kinds
        .iter()
        .filter_map(|&(kind, one, many)| {
            let idxs: Vec<usize> = indices
                .iter()
                .filter_map(|&idx| units.get(idx).filter(|unit| unit.kind() == kind))
                .map(|unit| match *unit {
                    Unit::Embedders => 0,
                    Unit::CaptionProjection(idx) | Unit::DoubleBlock(idx) | Unit::SingleBlock(idx) => idx,
                })
                .collect();
            match (kind, idxs.as_slice()) {
                (_, []) => None,
                (UnitKind::Embedders, _) => Some(one.to_owned()),
                (_, [idx]) => Some(format!("{one} {idx}")),
                (_, _) => Some(format!("{} {many} [{}]", idxs.len(), ranges(&idxs))),
            }
        })
        .collect();
    if parts.is_empty() { "nothing".to_owned() } else { parts.join(" + ") }
}

/// Ascending indices as ranges: `0-11, 14, 16-17`.
fn ranges(idxs: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut start = 0;
    for position in 1..=idxs.len() {
        if position == idxs.len() || idxs[position] != idxs[position - 1] + 1 {
            let (first, last) = (idxs[start], idxs[position - 1]);
            parts.push(if first == last { first.to_string() } else { format!("{first}-{last}") });
            start = position;
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn summaries_group_by_kind() {
        let units = [Unit::Embedders, Unit::DoubleBlock(0), Unit::DoubleBlock(1), Unit::SingleBlock(0)];
        assert_eq!(summarise(&units, &[0, 1, 2, 3]), "embedders + 2 double blocks [0-1] + single block 0");
        assert_eq!(summarise(&units, &[]), "nothing");
    }
}
