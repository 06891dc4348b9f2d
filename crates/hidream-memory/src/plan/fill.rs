//! Filling the room a budget leaves with resident units: a knapsack where weight equals value.
//!
//! Models have few distinct unit sizes (a transformer has one or two block sizes), so the
//! knapsack is solved exactly by trying every count per size class. When the classes are too
//! many for that, units are taken largest first. Both are monotone: more room never keeps fewer
//! bytes resident, so a larger budget never streams more.

/// The most count combinations tried exactly before falling back to largest first.
const EXACT_COMBINATIONS: u64 = 1 << 16;

/// Which units to keep resident, given their sizes (largest first) and the room left.
///
/// Returns one flag per size; the chosen sizes sum to at most `room_bytes`. Within a size class
/// the first units are chosen, which keeps the choice deterministic.
pub(super) fn fill(sizes: &[u64], room_bytes: u64) -> Vec<bool> {
    debug_assert!(sizes.is_sorted_by(|a, b| a >= b), "sizes must be sorted largest first");
    let classes = SizeClass::group(sizes);
    let combinations =
        classes.iter().try_fold(1u64, |product, class| product.checked_mul(class.count as u64 + 1)).unwrap_or(u64::MAX);
    let mut counts = if combinations <= EXACT_COMBINATIONS {
        exact_counts(&classes, room_bytes)
    } else {
        largest_first_counts(&classes, room_bytes)
    };
    // Empty units cost nothing to keep.
    for (class, chosen) in classes.iter().zip(&mut counts) {
        if class.bytes == 0 {
            *chosen = class.count;
        }
    }
    classes.iter().zip(counts).flat_map(|(class, chosen)| (0..class.count).map(move |idx| idx < chosen)).collect()
}

/// `count` units of `bytes` each.
#[derive(Debug, Clone, Copy)]
struct SizeClass {
    bytes: u64,
    count: usize,
}

impl SizeClass {
    fn group(sizes: &[u64]) -> Vec<SizeClass> {
        sizes.chunk_by(|a, b| a == b).map(|run| SizeClass { bytes: run[0], count: run.len() }).collect()
    }

    fn total(self) -> u64 {
        self.bytes.saturating_mul(self.count as u64)
    }

    /// How many units of this class fit in `room_bytes`.
    fn fitting(self, room_bytes: u64) -> usize {
        match room_bytes.checked_div(self.bytes) {
            Some(fit) => usize::try_from(fit).unwrap_or(usize::MAX).min(self.count),
            None => self.count,
        }
    }
}

fn largest_first_counts(classes: &[SizeClass], mut room_bytes: u64) -> Vec<usize> {
    classes
        .iter()
        .map(|&class| {
            let chosen = class.fitting(room_bytes);
            room_bytes -= class.bytes * chosen as u64;
            chosen
        })
        .collect()
}

/// The counts per class that fill the most of `room_bytes`, by depth-first search with the
/// bound "what is left cannot beat the best". Larger classes take the larger counts first.
fn exact_counts(classes: &[SizeClass], room_bytes: u64) -> Vec<usize> {
    let mut remaining_after = vec![0u64; classes.len() + 1];
    for (class_idx, class) in classes.iter().enumerate().rev() {
        remaining_after[class_idx] = remaining_after[class_idx + 1].saturating_add(class.total());
    }
    let mut search =
        Search { classes, remaining_after, counts: vec![0; classes.len()], best: (0, vec![0; classes.len()]) };
    search.visit(0, room_bytes, 0);
    search.best.1
}

struct Search<'a> {
    classes: &'a [SizeClass],
    /// Bytes of every class from an index on.
    remaining_after: Vec<u64>,
    counts: Vec<usize>,
    best: (u64, Vec<usize>),
}

impl Search<'_> {
    fn visit(&mut self, class_idx: usize, room_bytes: u64, filled: u64) {
        if filled > self.best.0 {
            self.best = (filled, self.counts.clone());
        }
        let perfect = room_bytes == 0;
        let cannot_beat = filled.saturating_add(self.remaining_after[class_idx].min(room_bytes)) <= self.best.0;
        if class_idx == self.classes.len() || perfect || cannot_beat {
            return;
        }
        let class = self.classes[class_idx];
        for chosen in (0..=class.fitting(room_bytes)).rev() {
            let bytes = class.bytes * chosen as u64;
            self.counts[class_idx] = chosen;
            self.visit(class_idx + 1, room_bytes - bytes, filled + bytes);
        }
        self.counts[class_idx] = 0;
    }
}
