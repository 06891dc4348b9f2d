//! The residency planner: worked examples, the invariants as properties (with and without scratch
//! room, with prefetch depths past the units), and a brute-force oracle for small unit lists.

use hidream_memory::{MemoryError, Plan, UnitSpec};
use proptest::prelude::*;

/// Plans `units` (sizes, `r` marks an always-resident unit) with `scratch_bytes` of room and
/// compares a one-line summary.
fn check(units: &str, budget_bytes: u64, prefetch_depth: usize, scratch_bytes: u64, expected: &str) {
    let units = parse_units(units);
    let actual = match Plan::budget_with_scratch(&units, budget_bytes, prefetch_depth, scratch_bytes) {
        Ok(plan) => {
            assert_valid(&units, &plan, Some(budget_bytes), prefetch_depth, scratch_bytes);
            format!(
                "resident {:?} streamed {:?} slots {}x{}",
                plan.resident(),
                plan.streamed(),
                plan.n_slots(),
                plan.slot_bytes()
            )
        }
        Err(MemoryError::BudgetTooSmall { minimum, .. }) => format!("too small: minimum {minimum}"),
        Err(error) => panic!("unexpected error: {error}"),
    };
    assert_eq!(
        actual, expected,
        "units {units:?}, budget {budget_bytes}, depth {prefetch_depth}, scratch {scratch_bytes}"
    );
}

#[test]
fn budget_examples() {
    check("10 10 10 10", 40, 1, 0, "resident [0, 1, 2, 3] streamed [] slots 0x0");
    check("10 10 10 10", 39, 1, 0, "resident [0] streamed [1, 2, 3] slots 2x10");
    check("10 10 10 10", 20, 1, 0, "resident [] streamed [0, 1, 2, 3] slots 2x10");
    check("10 10 10 10", 19, 1, 0, "too small: minimum 20");
    check("10 10 10 10", 20, 0, 0, "resident [0] streamed [1, 2, 3] slots 1x10");
    check("10 10 10 10", 19, 0, 0, "resident [] streamed [0, 1, 2, 3] slots 1x10");
    check("10 10 10 10", 9, 0, 0, "too small: minimum 10");
    // A unit larger than the slot stays resident; the slots fit the smaller units.
    check("100 10 10 10", 125, 1, 0, "resident [0] streamed [1, 2, 3] slots 2x10");
    check("100 10 10 10", 119, 1, 0, "too small: minimum 120");
    // Two 6s fill a room of 12 better than one 8 (largest first would keep 8 and stream 36).
    check("8 8 8 8 6 6", 28, 1, 0, "resident [4, 5] streamed [0, 1, 2, 3] slots 2x8");
    // Always-resident units count against the budget; the minimum never exceeds the total.
    check("5r 10 10", 24, 1, 0, "too small: minimum 25");
    check("5r 10 10", 25, 1, 0, "resident [0, 1, 2] streamed [] slots 0x0");
    check("5r 5r", 9, 3, 0, "too small: minimum 10");
    // Empty units cost nothing, so they stay resident.
    check("0 10 10", 10, 0, 0, "resident [0] streamed [1, 2] slots 1x10");
    // A depth past the units streams nothing more than one slot per streamed unit would, which
    // never beats keeping them: the budget plan keeps everything, or needs the total.
    check("10 10 10 10", 40, 100_000, 0, "resident [0, 1, 2, 3] streamed [] slots 0x0");
    check("10 10 10 10", 39, 100_000, 0, "too small: minimum 40");
}

#[test]
fn scratch_examples() {
    // A budget of exactly the units' bytes leaves no scratch room beside them all, so the plan
    // streams some units and the scratch shares the slots' room while they are free.
    check("10 10 10 10", 40, 1, 5, "resident [0, 1] streamed [2, 3] slots 2x10");
    check("10 10 10 10", 40, 1, 30, "resident [0] streamed [1, 2, 3] slots 2x10");
    check("10 10 10 10", 40, 1, 40, "resident [] streamed [0, 1, 2, 3] slots 2x10");
    check("10 10 10 10", 40, 1, 41, "too small: minimum 41");
    check("10 10 10 10", 45, 1, 5, "resident [0, 1, 2, 3] streamed [] slots 0x0");
    check("5r 10 10", 25, 0, 5, "resident [0, 1] streamed [2] slots 1x10");
    check("5r 10 10", 14, 0, 5, "too small: minimum 15");
    // With every unit streamed, a huge depth gives one slot per unit.
    check("10 10 10 10", 40, 100_000, 5, "resident [] streamed [0, 1, 2, 3] slots 4x10");
    let units = parse_units("10 10 10 10");
    let plan = Plan::budget_with_scratch(&units, 40, 100_000, 5).unwrap();
    assert_eq!((plan.prefetch_depth(), plan.requested_prefetch_depth()), (3, Some(100_000)));
    assert_eq!((plan.scratch_bytes(), plan.peak_weight_bytes()), (5, 40));
    // The same placement with room noted afterwards: the peak counts the larger of slots and scratch.
    let stream = Plan::stream(&units, 1);
    assert_eq!(stream.clone().with_scratch(15).peak_weight_bytes(), 20);
    assert_eq!(stream.with_scratch(25).peak_weight_bytes(), 25);
    assert_eq!(Plan::all(&units).with_scratch(7).peak_weight_bytes(), 47);
}

#[test]
fn fixed_policies() {
    let units = parse_units("3r 10 20 10");
    let all = Plan::all(&units);
    assert_eq!((all.resident(), all.streamed(), all.n_slots()), (&[0, 1, 2, 3][..], &[][..], 0));
    assert_eq!(all.peak_weight_bytes(), 43);

    let sequential = Plan::sequential(&units);
    assert_eq!((sequential.resident(), sequential.streamed()), (&[0][..], &[1, 2, 3][..]));
    assert_eq!((sequential.n_slots(), sequential.slot_bytes(), sequential.peak_weight_bytes()), (1, 20, 23));
    assert_eq!(sequential.streamed_bytes_per_pass(), 40);

    let stream = Plan::stream(&units, 2);
    assert_eq!((stream.n_slots(), stream.slot_bytes(), stream.peak_weight_bytes()), (3, 20, 63));
    assert_eq!(stream.requested_prefetch_depth(), None);
    // Three streamed units have at most two to load ahead: a deeper prefetch is clamped, and noted.
    let deep = Plan::stream(&units, 100_000);
    assert_eq!((deep.n_slots(), deep.prefetch_depth(), deep.requested_prefetch_depth()), (3, 2, Some(100_000)));
    assert_eq!(deep.peak_weight_bytes(), 63, "three slots, not 100001");
    let single = Plan::stream(&parse_units("3r 10"), 5);
    assert_eq!((single.n_slots(), single.prefetch_depth(), single.requested_prefetch_depth()), (1, 0, Some(5)));
    assert_eq!(Plan::stream(&parse_units("3r 3r"), 5).requested_prefetch_depth(), None, "nothing streams");
    assert!(stream.is_resident(0) && !stream.is_resident(2));
    assert_eq!(
        stream.to_string(),
        "1 of 4 units resident (3 B), 3 streamed (40 B per pass) through 3 slots of 20 B; peak weights 63 B"
    );
    assert_eq!(all.to_string(), "all 4 units resident (43 B), nothing streamed");
}

#[test]
fn budget_too_small_says_how_much_and_what_to_do() {
    let units = vec![UnitSpec::streamable(809 << 20); 16];
    let error = Plan::budget(&units, 2 << 30, 2).unwrap_err();
    let message = error.to_string();
    let minimum = 3 * (809u64 << 20);
    for expected in [
        "2.00 GiB (2147483648 bytes)".to_owned(),
        format!("2.37 GiB ({minimum} bytes)"),
        "raise the budget".to_owned(),
        "lower the prefetch depth (depth 0, no overlap, needs 809.00 MiB (848297984 bytes))".to_owned(),
    ] {
        assert!(message.contains(&expected), "`{message}` should contain `{expected}`");
    }
}

fn parse_units(units: &str) -> Vec<UnitSpec> {
    units
        .split_whitespace()
        .map(|unit| match unit.strip_suffix('r') {
            Some(bytes) => UnitSpec::resident(bytes.parse().unwrap()),
            None => UnitSpec::streamable(unit.parse().unwrap()),
        })
        .collect()
}

/// Everything a plan promises, whatever the policy that made it.
fn assert_valid(units: &[UnitSpec], plan: &Plan, budget_bytes: Option<u64>, prefetch_depth: usize, scratch_bytes: u64) {
    let mut seen = vec![0; units.len()];
    for &unit_idx in plan.resident().iter().chain(plan.streamed()) {
        seen[unit_idx] += 1;
    }
    assert!(seen.iter().all(|&count| count == 1), "every unit is resident or streamed, once: {seen:?}");
    assert!(plan.resident().is_sorted() && plan.streamed().is_sorted(), "indices keep execution order");
    for (unit_idx, unit) in units.iter().enumerate() {
        assert!(!unit.always_resident || plan.is_resident(unit_idx), "unit {unit_idx} must stay resident");
    }
    let sum = |indices: &[usize]| indices.iter().map(|&idx| units[idx].bytes).sum::<u64>();
    assert_eq!(plan.resident_bytes(), sum(plan.resident()));
    assert_eq!(plan.streamed_bytes_per_pass(), sum(plan.streamed()));
    let largest_streamed = plan.streamed().iter().map(|&idx| units[idx].bytes).max();
    assert_eq!(plan.slot_bytes(), largest_streamed.unwrap_or(0));
    // A pass of n streamed units has at most n - 1 to load ahead.
    let n_streamed = plan.streamed().len();
    let usable_depth = prefetch_depth.min(n_streamed.saturating_sub(1));
    let n_slots = if n_streamed == 0 { 0 } else { usable_depth + 1 };
    assert_eq!((plan.n_slots(), plan.prefetch_depth()), (n_slots, usable_depth));
    let clamped = n_streamed > 0 && prefetch_depth > usable_depth;
    assert_eq!(plan.requested_prefetch_depth(), clamped.then_some(prefetch_depth));
    assert_eq!(plan.scratch_bytes(), scratch_bytes);
    let slots = n_slots as u64 * plan.slot_bytes();
    assert_eq!(plan.peak_weight_bytes(), plan.resident_bytes() + slots.max(scratch_bytes));
    if let Some(budget_bytes) = budget_bytes {
        assert!(plan.peak_weight_bytes() <= budget_bytes, "peak {} > budget {budget_bytes}", plan.peak_weight_bytes());
        let total: u64 = units.iter().map(|unit| unit.bytes).sum();
        assert_eq!(
            plan.streamed().is_empty(),
            total + scratch_bytes <= budget_bytes,
            "stream only when everything and the scratch do not fit"
        );
    }
}

/// Unit lists of 1..50 units of 1..1e6 bytes, some always resident, with few or many distinct sizes.
fn units(max_units: usize) -> impl Strategy<Value = Vec<UnitSpec>> {
    let size = prop_oneof![1u64..1_000_000, prop::sample::select(vec![1_000, 250_000, 583_000, 809_000])];
    prop::collection::vec((size, prop::bool::weighted(0.15)), 1..max_units).prop_map(|units| {
        units.into_iter().map(|(bytes, always_resident)| UnitSpec { bytes, always_resident }).collect()
    })
}

/// A budget from 0 to a quarter above the total.
fn budget(units: &[UnitSpec], fraction: f64) -> u64 {
    (units.iter().map(|unit| unit.bytes).sum::<u64>() as f64 * fraction) as u64
}

/// The least streamed bytes and the minimum budget, by trying every resident set.
fn brute_force(units: &[UnitSpec], budget_bytes: u64, prefetch_depth: usize) -> (Option<u64>, u64) {
    let total: u64 = units.iter().map(|unit| unit.bytes).sum();
    let all = (1u32 << units.len()) - 1;
    let (mut least_streamed, mut minimum) = (None::<u64>, u64::MAX);
    for mask in 0..=all {
        let resident = |idx: usize| mask & (1 << idx) != 0;
        if units.iter().enumerate().any(|(idx, unit)| unit.always_resident && !resident(idx)) {
            continue;
        }
        let resident_bytes: u64 = (0..units.len()).filter(|&idx| resident(idx)).map(|idx| units[idx].bytes).sum();
        let largest_streamed = (0..units.len()).filter(|&idx| !resident(idx)).map(|idx| units[idx].bytes).max();
        let cost = match largest_streamed {
            None => total,
            Some(slot_bytes) => {
                let n_streamed = (0..units.len()).filter(|&idx| !resident(idx)).count();
                resident_bytes + (prefetch_depth.min(n_streamed - 1) as u64 + 1) * slot_bytes
            }
        };
        minimum = minimum.min(cost);
        if cost <= budget_bytes {
            let streamed = total - resident_bytes;
            least_streamed = Some(least_streamed.map_or(streamed, |least| least.min(streamed)));
        }
    }
    (least_streamed, minimum)
}

/// Scratch room from none to a little more than the total.
fn scratch(units: &[UnitSpec], fraction: f64) -> u64 {
    budget(units, fraction * 1.1)
}

/// A prefetch depth: a few, or far past any unit list.
fn depth() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..=4, 1 => Just(100_000)]
}

/// How many units may stream.
fn streamable(units: &[UnitSpec]) -> usize {
    units.iter().filter(|unit| !unit.always_resident).count()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plans_keep_their_promises(
        units in units(50),
        fraction in 0.0..1.25f64,
        depth in depth(),
        scratch_fraction in prop_oneof![Just(0.0), 0.0..1.0f64],
    ) {
        let budget_bytes = budget(&units, fraction);
        let scratch_bytes = scratch(&units, scratch_fraction);
        match Plan::budget_with_scratch(&units, budget_bytes, depth, scratch_bytes) {
            Ok(plan) => assert_valid(&units, &plan, Some(budget_bytes), depth, scratch_bytes),
            Err(MemoryError::BudgetTooSmall { budget, minimum, prefetch_depth, minimum_sequential }) => {
                // The error reports the depth the planner can use: a pass of n units loads at most n - 1 ahead.
                let usable_depth = depth.min(streamable(&units).saturating_sub(1));
                prop_assert_eq!((budget, prefetch_depth), (budget_bytes, usable_depth));
                prop_assert!(minimum > budget_bytes);
                prop_assert_eq!(minimum, Plan::minimum_budget_with_scratch(&units, depth, scratch_bytes));
                prop_assert_eq!(minimum_sequential, Plan::minimum_budget_with_scratch(&units, 0, scratch_bytes));
            }
            Err(error) => prop_assert!(false, "unexpected error: {}", error),
        }
        assert_valid(&units, &Plan::all(&units), None, 0, 0);
        assert_valid(&units, &Plan::sequential(&units), None, 0, 0);
        assert_valid(&units, &Plan::stream(&units, depth), None, depth, 0);
        assert_valid(&units, &Plan::stream(&units, depth).with_scratch(scratch_bytes), None, depth, scratch_bytes);
    }

    #[test]
    fn the_minimum_budget_is_exact(
        units in units(50),
        depth in depth(),
        scratch_fraction in prop_oneof![Just(0.0), 0.0..1.0f64],
    ) {
        let scratch_bytes = scratch(&units, scratch_fraction);
        let minimum = Plan::minimum_budget_with_scratch(&units, depth, scratch_bytes);
        prop_assert!(Plan::budget_with_scratch(&units, minimum, depth, scratch_bytes).is_ok());
        let too_small = Plan::budget_with_scratch(&units, minimum - 1, depth, scratch_bytes);
        prop_assert!(
            matches!(too_small, Err(MemoryError::BudgetTooSmall { minimum: reported, .. }) if reported == minimum),
            "{:?}", too_small
        );
        // Scratch room costs at most its own bytes, and never saves any.
        let without = Plan::minimum_budget(&units, depth);
        prop_assert!(without <= minimum && minimum <= without + scratch_bytes);
    }

    #[test]
    fn no_scratch_is_a_plain_budget(units in units(50), fraction in 0.0..1.25f64, depth in depth()) {
        let budget_bytes = budget(&units, fraction);
        let plain = Plan::budget(&units, budget_bytes, depth).map_err(|error| error.to_string());
        let scratch = Plan::budget_with_scratch(&units, budget_bytes, depth, 0).map_err(|error| error.to_string());
        prop_assert_eq!(plain, scratch);
        prop_assert_eq!(Plan::minimum_budget(&units, depth), Plan::minimum_budget_with_scratch(&units, depth, 0));
    }

    #[test]
    fn a_budget_of_exactly_the_units_leaves_room_by_streaming(units in units(50), scratch_fraction in 0.0..1.0f64) {
        // Scratch up to the streamable bytes: one slot of the largest streamable unit fits beside
        // the pinned units, and the scratch shares its room.
        let streamable_bytes: u64 = units.iter().filter(|unit| !unit.always_resident).map(|unit| unit.bytes).sum();
        let scratch_bytes = 1 + (streamable_bytes.saturating_sub(1) as f64 * scratch_fraction) as u64;
        prop_assume!(streamable_bytes > 0);
        let total: u64 = units.iter().map(|unit| unit.bytes).sum();
        let plan = Plan::budget_with_scratch(&units, total, 0, scratch_bytes);
        prop_assert!(plan.is_ok(), "budget {} scratch {}: {:?}", total, scratch_bytes, plan);
        let plan = plan.unwrap();
        prop_assert!(!plan.streamed().is_empty(), "it streams something to make room");
        assert_valid(&units, &plan, Some(total), 0, scratch_bytes);
    }

    #[test]
    fn a_huge_depth_plans_as_the_deepest_useful_one(units in units(50), fraction in 0.0..1.25f64) {
        let budget_bytes = budget(&units, fraction);
        let deepest = streamable(&units).saturating_sub(1);
        let summary = |plan: Result<Plan, MemoryError>| {
            plan.map(|plan| (plan.resident().to_vec(), plan.n_slots(), plan.peak_weight_bytes())).map_err(|error| error.to_string())
        };
        prop_assert_eq!(summary(Plan::budget(&units, budget_bytes, 100_000)), summary(Plan::budget(&units, budget_bytes, deepest)));
        prop_assert_eq!(Plan::minimum_budget(&units, 100_000), Plan::minimum_budget(&units, deepest));
    }

    #[test]
    fn more_budget_never_streams_more(units in units(50), a in 0.0..1.25f64, b in 0.0..1.25f64, depth in depth()) {
        let (small, large) = (budget(&units, a.min(b)), budget(&units, a.max(b)));
        if let Ok(small_plan) = Plan::budget(&units, small, depth) {
            let large_plan = Plan::budget(&units, large, depth).expect("a larger budget also fits");
            prop_assert!(large_plan.streamed_bytes_per_pass() <= small_plan.streamed_bytes_per_pass());
        }
    }

    #[test]
    fn small_plans_are_optimal(units in units(11), fraction in 0.0..1.25f64, depth in depth()) {
        let budget_bytes = budget(&units, fraction);
        let (least_streamed, minimum) = brute_force(&units, budget_bytes, depth);
        prop_assert_eq!(Plan::minimum_budget(&units, depth), minimum);
        let plan = Plan::budget(&units, budget_bytes, depth).ok();
        prop_assert_eq!(plan.map(|plan| plan.streamed_bytes_per_pass()), least_streamed);
    }
}
