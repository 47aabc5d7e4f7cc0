//! The Tokio version a binary was built with, where it can be told: panic
//! locations keep the source path of the crate, `.../tokio-1.47.1/src/...`,
//! unless the build remapped its paths.

/// The version in the most `/tokio-X.Y.Z/` source paths inside `data`
/// (of equal counts, the one seen first last). Linear in the size of
/// `data`, however many distinct versions a hostile binary holds.
pub fn tokio_version(data: &[u8]) -> Option<String> {
    const NEEDLE: &[u8] = b"/tokio-";
    // Version -> (count, order first seen).
    let mut counts: std::collections::HashMap<String, (usize, usize)> =
        std::collections::HashMap::new();
    let mut at = 0;
    while let Some(found) = find(&data[at..], NEEDLE) {
        let start = at + found + NEEDLE.len();
        at = start;
        if let Some(version) = version_at(&data[start..]) {
            let seen = counts.len();
            counts.entry(version).or_insert((0, seen)).0 += 1;
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, (count, seen))| (*count, *seen))
        .map(|(version, _)| version)
}

/// Whether `data` names Tokio's worker threads (`tokio-runtime-worker`,
/// `tokio-rt-worker` since 1.5x): true of a stripped Tokio binary too.
pub fn mentions_tokio(data: &[u8]) -> bool {
    find(data, b"tokio-runtime-worker").is_some() || find(data, b"tokio-rt-worker").is_some()
}

/// Whether `data` looks like a Rust program, stripped or not: rustc signs
/// `.comment` (`rustc version 1.x`), and the standard library's panic
/// locations keep `/rustc/<commit>/library/` paths.
pub fn looks_like_rust(data: &[u8]) -> bool {
    find(data, b"rustc version ").is_some() || find(data, b"/rustc/").is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// `X.Y.Z` (digits, three parts) followed by `/`, at the start of `bytes`.
fn version_at(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().take(32).position(|&b| b == b'/')?;
    let version = std::str::from_utf8(&bytes[..end]).ok()?;
    let parts: Vec<&str> = version.split('.').collect();
    let numeric = |part: &&str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    (parts.len() == 3 && parts.iter().all(numeric)).then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_distinct_versions_take_linear_time() {
        let mut data = Vec::new();
        for minor in 0..100_000 {
            data.extend_from_slice(format!("/tokio-1.{minor}.0/src/x.rs ").as_bytes());
        }
        data.extend_from_slice(b"/tokio-1.7.0/src/y.rs");
        let started = std::time::Instant::now();
        assert_eq!(tokio_version(&data).as_deref(), Some("1.7.0"));
        let took = started.elapsed();
        assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn equal_counts_go_to_the_version_seen_first_last() {
        let data = b"/tokio-1.2.3/ /tokio-1.4.5/";
        assert_eq!(tokio_version(data).as_deref(), Some("1.4.5"));
    }

    #[test]
    fn rust_programs_are_told_from_others() {
        assert!(looks_like_rust(
            b"\0rustc version 1.95.0 (59807616e 2026-04-14)\0"
        ));
        assert!(looks_like_rust(
            b"/rustc/59807616e/library/core/src/panicking.rs"
        ));
        assert!(!looks_like_rust(
            b"GCC: (Debian 12.2.0-14) 12.2.0\0coreutils"
        ));
        // This test binary is one, the C library's `sleep` is not.
        assert!(looks_like_rust(&std::fs::read("/proc/self/exe").unwrap()));
        if let Ok(sleep) = std::fs::read("/usr/bin/sleep") {
            assert!(!looks_like_rust(&sleep));
        }
    }

    #[test]
    fn the_most_cited_version_wins() {
        let data = b"\0/root/.cargo/registry/src/index/tokio-1.47.1/src/runtime/task/raw.rs\0\
            /x/tokio-1.47.1/src/io.rs\0/x/tokio-util-0.7.1/src/a.rs\0/y/tokio-1.2.3/src/b.rs\0";
        assert_eq!(tokio_version(data), Some("1.47.1".to_owned()));
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(tokio_version(b"no paths here"), None);
        assert_eq!(tokio_version(b"/tokio-macros/x"), None);
        assert_eq!(tokio_version(b"/tokio-1.x.0/src"), None);
        assert_eq!(tokio_version(b"/tokio-1.47.1"), None, "no trailing slash");
    }
}
