//! Filters of kernel task pointers: an array of counts, one per bucket of
//! task pointers, beside a hash map keyed by task pointer. A program that
//! runs for every task on the host (every context switch, every runtime
//! update) reads its task's bucket, one array read, and looks the hash map
//! up only when the count there is not 0. Each insert into the hash map
//! adds 1 to its bucket and each remove takes 1 away, so a task that has an
//! entry is never filtered out. Keys may be thread ids too.

/// Buckets of a task filter.
pub const BUCKETS: u32 = 256;

/// The bucket of task pointer `task` among [`BUCKETS`].
#[must_use]
pub const fn bucket_of(task: u64) -> u32 {
    index_of(task, 8)
}

/// The index of task pointer `task` in a table of `2^bits` entries
/// (Fibonacci hashing: task structs are slab objects, so their low bits
/// say little). `bits` is 1 to 32.
#[must_use]
pub const fn index_of(task: u64, bits: u32) -> u32 {
    (task.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as u32
}

const _: () = assert!(BUCKETS == 1 << (64 - 56));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bucket_is_in_range_and_neighbouring_slab_objects_spread() {
        // task_structs of one slab are a fixed size apart.
        let mut seen = [0u32; BUCKETS as usize];
        for i in 0..1024u64 {
            let bucket = bucket_of(0xffff_8880_0400_0000 + i * 0x2c40);
            assert!(bucket < BUCKETS);
            seen[bucket as usize] += 1;
        }
        // 1024 tasks over 256 buckets: none empty, none crowded.
        assert!(seen.iter().all(|&n| (1..=16).contains(&n)), "{seen:?}");
        assert_eq!(bucket_of(0), 0);
    }

    #[test]
    fn an_index_stays_in_its_table_and_its_top_bits_are_the_bucket() {
        for i in 0..4096u64 {
            let task = 0xffff_8880_0400_0000 + i * 0x2c40;
            let index = index_of(task, 12);
            assert!(index < 1 << 12);
            assert_eq!(index >> 4, bucket_of(task));
        }
    }
}
