//! Sizes and policies as users write them: parsing, printing and round trips.

use hidream_memory::{Budget, MemoryError, Plan, Policy, PolicyKind, UnitSpec, format_bytes, parse_bytes};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Parses `size` and compares with `expected`: a byte count, or the start of the error's problem.
fn check_size(size: &str, expected: Result<u64, &str>) {
    let actual = parse_bytes(size);
    match (&actual, expected) {
        (Ok(bytes), Ok(expected)) => assert_eq!(*bytes, expected, "`{size}`"),
        (Err(MemoryError::InvalidSize { given, problem }), Err(expected)) => {
            assert_eq!(given, size);
            assert!(problem.starts_with(expected), "`{size}`: `{problem}` should start with `{expected}`");
        }
        _ => panic!("`{size}`: got {actual:?}, expected {expected:?}"),
    }
}

#[test]
fn sizes() {
    check_size("1073741824", Ok(GIB));
    check_size("512MiB", Ok(512 * MIB));
    check_size("8GiB", Ok(8 * GIB));
    check_size(" 8 gib ", Ok(8 * GIB));
    check_size("8G", Ok(8 * GIB));
    check_size("1.5GB", Ok(1_500_000_000));
    check_size("1.5GiB", Ok(GIB + GIB / 2));
    check_size("0.1KiB", Ok(102)); // 102.4 bytes round down.
    check_size("64KB", Ok(64_000));
    check_size("2TiB", Ok(2 << 40));
    check_size("12B", Ok(12));
    check_size(".5K", Ok(512));
    check_size("0", Ok(0));
    check_size("18446744073709551615", Ok(u64::MAX));
    check_size("18446744073709551616", Err("too large"));
    check_size("17179869184GiB", Err("too large"));
    check_size("", Err("does not start with a number"));
    check_size("GiB", Err("does not start with a number"));
    check_size("-5", Err("does not start with a number"));
    check_size("1.2.3", Err("more than one decimal point"));
    check_size("8 gigs", Err("unknown unit"));
    check_size("8%", Err("unknown unit"));
}

#[test]
fn formatted_sizes() {
    assert_eq!(format_bytes(0), "0 B");
    assert_eq!(format_bytes(1023), "1023 B");
    assert_eq!(format_bytes(1024), "1.00 KiB");
    assert_eq!(format_bytes(583 * MIB), "583.00 MiB");
    assert_eq!(format_bytes(34_200_000_000), "31.85 GiB");
    assert_eq!(format_bytes(u64::MAX), "16.00 EiB");
}

#[test]
fn budgets() {
    assert_eq!(Budget::parse("8GiB").unwrap(), Budget::Bytes(8 * GIB));
    assert_eq!(Budget::parse("25%").unwrap(), Budget::FractionOfWeights(0.25));
    assert_eq!(Budget::parse("25%").unwrap().resolve(1000), 250);
    assert_eq!(Budget::parse("12.5 %").unwrap().resolve(1001), 125);
    assert_eq!(Budget::parse("100%").unwrap().resolve(34_200_000_000), 34_200_000_000);
    assert_eq!(Budget::parse("8GiB").unwrap().resolve(1000), 8 * GIB);
    assert_eq!(Budget::parse("25%").unwrap().to_string(), "25%");
    assert_eq!("512MiB".parse::<Budget>().unwrap().to_string(), "512MiB");
    for invalid in ["101%", "-1%", "x%", "%"] {
        assert!(matches!(Budget::parse(invalid), Err(MemoryError::InvalidSize { .. })), "`{invalid}`");
    }
}

#[test]
fn policies() {
    let parse = |policy: &str| policy.parse::<Policy>().map_err(|error| error.to_string());
    assert_eq!(parse("all"), Ok(Policy::All));
    assert_eq!(parse("Sequential"), Ok(Policy::Sequential));
    assert_eq!(parse("stream"), Ok(Policy::Stream { prefetch: 1 }));
    assert_eq!(parse("stream:3"), Ok(Policy::Stream { prefetch: 3 }));
    assert_eq!(parse("budget:8GiB"), Ok(Policy::Budget { budget_bytes: 8 * GIB, prefetch: 1 }));
    assert_eq!(parse("budget:1.5GB:0"), Ok(Policy::Budget { budget_bytes: 1_500_000_000, prefetch: 0 }));
    for (invalid, problem) in [
        ("everything", "unknown policy name"),
        ("budget", "a budget needs a size"),
        ("stream:x", "the prefetch depth must be a whole number"),
        ("all:2", "too many settings"),
        ("budget:8GiB:1:1", "too many settings"),
        ("budget:lots", "invalid size `lots`"),
    ] {
        let message = parse(invalid).unwrap_err();
        assert!(message.contains(problem), "`{invalid}`: `{message}` should mention `{problem}`");
    }
    let names: Vec<String> = PolicyKind::ALL.iter().map(ToString::to_string).collect();
    assert_eq!(names, ["all", "sequential", "stream", "budget"]);
    assert_eq!("BUDGET".parse::<PolicyKind>().unwrap(), PolicyKind::Budget);
    assert_eq!(Policy::Budget { budget_bytes: 8 * GIB + 1, prefetch: 2 }.to_string(), "budget:8589934593:2");
}

#[test]
fn policies_make_their_plans() {
    let units = [UnitSpec::resident(5), UnitSpec::streamable(10), UnitSpec::streamable(10), UnitSpec::streamable(10)];
    assert_eq!(Policy::All.plan(&units).unwrap(), Plan::all(&units));
    assert_eq!(Policy::Sequential.plan(&units).unwrap(), Plan::sequential(&units));
    assert_eq!(Policy::Stream { prefetch: 2 }.plan(&units).unwrap(), Plan::stream(&units, 2));
    let budget = Policy::Budget { budget_bytes: 30, prefetch: 1 };
    assert_eq!(budget.plan(&units).unwrap(), Plan::budget(&units, 30, 1).unwrap());
    assert_eq!(budget.kind(), PolicyKind::Budget);
}

/// Plans `units` by `policy` with `scratch_bytes` of room and compares the peak (or the error).
fn check_scratch(policy: &str, scratch_bytes: u64, expected: Result<(Plan, u64), &str>) {
    let units = [UnitSpec::resident(5), UnitSpec::streamable(10), UnitSpec::streamable(10), UnitSpec::streamable(10)];
    let policy: Policy = policy.parse().unwrap();
    let actual = policy.plan_with_scratch(&units, scratch_bytes);
    match (actual, expected) {
        (Ok(plan), Ok((expected_plan, peak))) => {
            assert_eq!(plan, expected_plan.with_scratch(scratch_bytes), "{policy} with scratch {scratch_bytes}");
            assert_eq!(plan.peak_weight_bytes(), peak, "{policy} with scratch {scratch_bytes}");
        }
        (Err(error), Err(expected)) => assert!(error.to_string().contains(expected), "{policy}: {error}"),
        (actual, expected) => panic!("{policy} with scratch {scratch_bytes}: got {actual:?}, expected {expected:?}"),
    }
}

#[test]
fn policies_keep_scratch_room() {
    let units = [UnitSpec::resident(5), UnitSpec::streamable(10), UnitSpec::streamable(10), UnitSpec::streamable(10)];
    // The fixed policies keep their placement and count the larger of the slots and the scratch.
    check_scratch("all", 7, Ok((Plan::all(&units), 35 + 7)));
    check_scratch("sequential", 7, Ok((Plan::sequential(&units), 5 + 10)));
    check_scratch("sequential", 25, Ok((Plan::sequential(&units), 5 + 25)));
    check_scratch("stream:1", 25, Ok((Plan::stream(&units, 1), 5 + 25)));
    check_scratch("stream:9", 0, Ok((Plan::stream(&units, 9), 5 + 30)));
    // A budget makes room: everything fits in 35 bytes, but not beside 10 bytes of scratch.
    check_scratch("budget:35:1", 0, Ok((Plan::all(&units), 35)));
    check_scratch("budget:35:1", 10, Ok((Plan::budget_with_scratch(&units, 35, 1, 10).unwrap(), 35)));
    check_scratch("budget:24:1", 10, Err("the smallest budget that works is 25 B"));
    assert_eq!(Policy::All.plan(&units).unwrap(), Policy::All.plan_with_scratch(&units, 0).unwrap());
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::All),
        Just(Policy::Sequential),
        (0usize..8).prop_map(|prefetch| Policy::Stream { prefetch }),
        (any::<u64>(), 0usize..8).prop_map(|(budget_bytes, prefetch)| Policy::Budget { budget_bytes, prefetch }),
        (0u64..1 << 20, 0usize..8).prop_map(|(gib, prefetch)| Policy::Budget { budget_bytes: gib << 30, prefetch }),
    ]
}

proptest! {
    #[test]
    fn policies_round_trip(policy in policy()) {
        prop_assert_eq!(policy.to_string().parse::<Policy>().unwrap(), policy);
    }

    #[test]
    fn sizes_round_trip(bytes in any::<u64>()) {
        prop_assert_eq!(parse_bytes(&bytes.to_string()).unwrap(), bytes);
        prop_assert_eq!(Budget::Bytes(bytes).to_string().parse::<Budget>().unwrap(), Budget::Bytes(bytes));
    }
}
