//! The counting allocator, installed as this test binary's global allocator.

use std::hint::black_box;

use hidream_memory::CountingAllocator;

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const MIB: u64 = 1 << 20;

// One test only: the figures are process-wide, and a second test would allocate beside it.
#[test]
fn heap_bytes_are_counted() {
    CountingAllocator::reset_peak();
    let before = CountingAllocator::current_bytes();
    assert_eq!(CountingAllocator::peak_bytes(), before);

    let zeroed = black_box(vec![0u8; 64 << 20]);
    assert!(CountingAllocator::current_bytes() >= before + 64 * MIB);
    assert!(CountingAllocator::peak_bytes() >= before + 64 * MIB);
    drop(zeroed);
    let after_drop = CountingAllocator::current_bytes();
    assert!(after_drop < before + MIB, "dropping gives the bytes back: {after_drop} after, {before} before");
    assert!(CountingAllocator::peak_bytes() >= before + 64 * MIB, "the peak remembers");

    // Growing by reallocation counts the difference, and shrinking gives it back.
    let mut grown: Vec<u8> = Vec::with_capacity(MIB as usize);
    grown.resize(32 * MIB as usize, 1);
    assert!(CountingAllocator::current_bytes() >= before + 32 * MIB);
    grown.truncate(MIB as usize);
    grown.shrink_to_fit();
    assert!(CountingAllocator::current_bytes() < before + 2 * MIB);
    drop(black_box(grown));

    CountingAllocator::reset_peak();
    assert!(CountingAllocator::peak_bytes() < before + 2 * MIB, "a reset starts a new peak");
}
