//! Wall-clock times for events: RFC 3339 in UTC with microseconds
//! (`2025-05-01T12:00:00.123456Z`), and the conversion of the kernel's
//! `CLOCK_MONOTONIC` nanoseconds into them (the offset between the two
//! clocks is read once).

use std::sync::OnceLock;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// ns to add to a `CLOCK_MONOTONIC` time for the Unix time.
fn offset_ns() -> i128 {
    static OFFSET: OnceLock<i128> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        i128::from(clock_ns(libc::CLOCK_REALTIME)) - i128::from(clock_ns(libc::CLOCK_MONOTONIC))
    })
}

/// Now, in RFC 3339.
pub fn now() -> String {
    rfc3339(clock_ns(libc::CLOCK_REALTIME))
}

/// A `CLOCK_MONOTONIC` time (ns) in RFC 3339.
pub fn from_monotonic(ns: u64) -> String {
    let unix = (i128::from(ns) + offset_ns()).max(0);
    rfc3339(u64::try_from(unix).unwrap_or(u64::MAX))
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Shift to a calendar whose years start on March 1st, in 400-year eras.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Unix time (ns) in RFC 3339, UTC, microseconds.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let micros = (unix_ns % 1_000_000_000) / 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (a leap day of a century year) 12:34:56.789012.
        assert_eq!(
            rfc3339(951_827_696_789_012_345),
            "2000-02-29T12:34:56.789012Z"
        );
        assert_eq!(
            rfc3339(1_735_689_599_000_000_000),
            "2024-12-31T23:59:59.000000Z"
        );
        assert_eq!(
            rfc3339(4_107_542_400_000_000_000),
            "2100-03-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn monotonic_times_land_near_now() {
        let now = now();
        let converted = from_monotonic(crate::collect::monotonic_ns());
        // Same second (give or take the turn of one).
        assert_eq!(now[..17], converted[..17], "{now} {converted}");
    }
}
