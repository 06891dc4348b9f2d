//! The residency planner: worked examples, the invariants as properties, and a brute-force
//! oracle for small unit lists.

use hidream_memory::{MemoryError, Plan, UnitSpec};
use proptest::prelude::*;

/// Plans `units` (sizes, `r` marks an always-resident unit) and compares a one-line summary.
fn check(units: &str, budget_bytes: u64, prefetch_depth: usize, expected: &str) {
    let units = parse_units(units);
    let actual = match Plan::budget(&units, budget_bytes, prefetch_depth) {
        Ok(plan) => {
            assert_valid(&units, &plan, Some(budget_bytes), prefetch_depth);
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
    assert_eq!(actual, expected, "units {units:?}, budget {budget_bytes}, depth {prefetch_depth}");
}

#[test]
fn budget_examples() {
    check("10 10 10 10", 40, 1, "resident [0, 1, 2, 3] streamed [] slots 0x0");
    check("10 10 10 10", 39, 1, "resident [0] streamed [1, 2, 3] slots 2x10");
    check("10 10 10 10", 20, 1, "resident [] streamed [0, 1, 2, 3] slots 2x10");
    check("10 10 10 10", 19, 1, "too small: minimum 20");
    check("10 10 10 10", 20, 0, "resident [0] streamed [1, 2, 3] slots 1x10");
    check("10 10 10 10", 19, 0, "resident [] streamed [0, 1, 2, 3] slots 1x10");
    check("10 10 10 10", 9, 0, "too small: minimum 10");
    // A unit larger than the slot stays resident; the slots fit the smaller units.
    check("100 10 10 10", 125, 1, "resident [0] streamed [1, 2, 3] slots 2x10");
    check("100 10 10 10", 119, 1, "too small: minimum 120");
    // Two 6s fill a room of 12 better than one 8 (largest first would keep 8 and stream 36).
    check("8 8 8 8 6 6", 28, 1, "resident [4, 5] streamed [0, 1, 2, 3] slots 2x8");
    // Always-resident units count against the budget; the minimum never exceeds the total.
    check("5r 10 10", 24, 1, "too small: minimum 25");
    check("5r 10 10", 25, 1, "resident [0, 1, 2] streamed [] slots 0x0");
    check("5r 5r", 9, 3, "too small: minimum 10");
    // Empty units cost nothing, so they stay resident.
    check("0 10 10", 10, 0, "resident [0] streamed [1, 2] slots 1x10");
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
fn assert_valid(units: &[UnitSpec], plan: &Plan, budget_bytes: Option<u64>, prefetch_depth: usize) {
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
    let n_slots = if plan.streamed().is_empty() { 0 } else { prefetch_depth + 1 };
    assert_eq!(plan.n_slots(), n_slots);
    assert_eq!(plan.peak_weight_bytes(), plan.resident_bytes() + n_slots as u64 * plan.slot_bytes());
    if let Some(budget_bytes) = budget_bytes {
        assert!(plan.peak_weight_bytes() <= budget_bytes, "peak {} > budget {budget_bytes}", plan.peak_weight_bytes());
        let total: u64 = units.iter().map(|unit| unit.bytes).sum();
        assert_eq!(plan.streamed().is_empty(), total <= budget_bytes, "stream only when everything does not fit");
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
            Some(slot_bytes) => resident_bytes + (prefetch_depth as u64 + 1) * slot_bytes,
        };
        minimum = minimum.min(cost);
        if cost <= budget_bytes {
            let streamed = total - resident_bytes;
            least_streamed = Some(least_streamed.map_or(streamed, |least| least.min(streamed)));
        }
    }
    (least_streamed, minimum)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plans_keep_their_promises(units in units(50), fraction in 0.0..1.25f64, depth in 0usize..=4) {
        let budget_bytes = budget(&units, fraction);
        match Plan::budget(&units, budget_bytes, depth) {
            Ok(plan) => assert_valid(&units, &plan, Some(budget_bytes), depth),
            Err(MemoryError::BudgetTooSmall { budget, minimum, prefetch_depth, minimum_sequential }) => {
                prop_assert_eq!((budget, prefetch_depth), (budget_bytes, depth));
                prop_assert!(minimum > budget_bytes);
                prop_assert_eq!(minimum, Plan::minimum_budget(&units, depth));
                prop_assert_eq!(minimum_sequential, Plan::minimum_budget(&units, 0));
            }
            Err(error) => prop_assert!(false, "unexpected error: {}", error),
        }
        assert_valid(&units, &Plan::all(&units), None, 0);
        assert_valid(&units, &Plan::sequential(&units), None, 0);
        assert_valid(&units, &Plan::stream(&units, depth), None, depth);
    }

    #[test]
    fn one_byte_more_than_the_minimum_succeeds(units in units(50), depth in 0usize..=4) {
        let minimum = Plan::minimum_budget(&units, depth);
        prop_assert!(Plan::budget(&units, minimum, depth).is_ok());
        let too_small = Plan::budget(&units, minimum - 1, depth);
        prop_assert!(
            matches!(too_small, Err(MemoryError::BudgetTooSmall { minimum: reported, .. }) if reported == minimum),
            "{:?}", too_small
        );
    }

    #[test]
    fn more_budget_never_streams_more(units in units(50), a in 0.0..1.25f64, b in 0.0..1.25f64, depth in 0usize..=4) {
        let (small, large) = (budget(&units, a.min(b)), budget(&units, a.max(b)));
        if let Ok(small_plan) = Plan::budget(&units, small, depth) {
            let large_plan = Plan::budget(&units, large, depth).expect("a larger budget also fits");
            prop_assert!(large_plan.streamed_bytes_per_pass() <= small_plan.streamed_bytes_per_pass());
        }
    }

    #[test]
    fn small_plans_are_optimal(units in units(11), fraction in 0.0..1.25f64, depth in 0usize..=4) {
        let budget_bytes = budget(&units, fraction);
        let (least_streamed, minimum) = brute_force(&units, budget_bytes, depth);
        prop_assert_eq!(Plan::minimum_budget(&units, depth), minimum);
        let plan = Plan::budget(&units, budget_bytes, depth).ok();
        prop_assert_eq!(plan.map(|plan| plan.streamed_bytes_per_pass()), least_streamed);
    }
}
