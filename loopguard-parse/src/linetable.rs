//! The line of an instruction, from a 3.11+ code object's location table
//! (`co_linetable`, `CPython`'s `Objects/locations.md` format).
//!
//! Entries run in instruction order. Each starts with a byte whose top bit
//! is set: bits 3-6 are the entry's form, bits 0-2 its length in code units
//! minus one. Form 15 has no location, 14 is the long form (signed line
//! delta, end line, columns), 13 has a line delta and no columns, 10-12
//! move the line by 0-2 with two column bytes, 0-9 keep the line with one
//! column byte. Numbers are 6-bit groups, the 0x40 bit saying another
//! group follows; signed ones keep the sign in their lowest bit.

/// Groups read at most for one number (6 bits each: 64 bits and more).
const MAX_GROUPS: usize = 11;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for group in 0..MAX_GROUPS {
            let byte = self.byte()?;
            value |= u64::from(byte & 63).checked_shl(6 * group as u32)?;
            if byte & 64 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn svarint(&mut self) -> Option<i64> {
        let raw = self.varint()?;
        let magnitude = i64::try_from(raw >> 1).ok()?;
        Some(if raw & 1 == 1 { -magnitude } else { magnitude })
    }
}

/// The source line of code unit `unit` (instruction index, 2 bytes each)
/// of a code object whose first line is `first_line`; `None` when the
/// table gives that instruction no line, or is cut short or malformed.
pub fn line_of(table: &[u8], first_line: i64, unit: u64) -> Option<u32> {
    let mut reader = Reader {
        bytes: table,
        at: 0,
    };
    let mut line = first_line;
    let mut start = 0u64;
    while let Some(head) = reader.byte() {
        if head & 0x80 == 0 {
            // Not an entry's first byte: the table is not what it seems.
            return None;
        }
        let form = (head >> 3) & 15;
        let length = u64::from(head & 7) + 1;
        let mut has_line = true;
        match form {
            15 => has_line = false,
            // A table that moves the line past what an i64 holds is
            // malformed: no line, rather than one wrapped around.
            14 => {
                line = line.checked_add(reader.svarint()?)?;
                reader.varint()?;
                reader.varint()?;
                reader.varint()?;
            }
            13 => line = line.checked_add(reader.svarint()?)?,
            10..=12 => {
                line = line.checked_add(i64::from(form - 10))?;
                reader.byte()?;
                reader.byte()?;
            }
            _ => {
                reader.byte()?;
            }
        }
        let end = start + length;
        if (start..end).contains(&unit) {
            return if has_line {
                u32::try_from(line).ok().filter(|&line| line > 0)
            } else {
                None
            };
        }
        start = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(form: u8, units: u8) -> u8 {
        0x80 | (form << 3) | (units - 1)
    }

    #[test]
    fn forms_move_the_line_as_cpython_writes_them() {
        let table = [
            // Units 0-1: no location (RESUME before the first line).
            head(15, 2),
            // Units 2-4: long form, line +2 (first_line 10 -> 12).
            head(14, 3),
            4, // +2, signed
            0,
            1,
            5,
            // Units 5-6: short form, same line.
            head(3, 2),
            0x12,
            // Units 7-7: one-line form, line +1 -> 13.
            head(11, 1),
            4,
            9,
            // Units 8-10: no columns, line -3 -> 10.
            head(13, 3),
            7, // -3, signed
            // Units 11-12: long form with a two-group delta: +40 -> 50.
            head(14, 2),
            0x50 | 0x40, // low 6 bits 0x10 and more follow
            0x01,        // raw 0x50 = 80 -> +40
            0,
            0,
            0,
        ];
        let at = |unit| line_of(&table, 10, unit);
        assert_eq!(at(0), None);
        assert_eq!(at(1), None);
        assert_eq!(at(2), Some(12));
        assert_eq!(at(4), Some(12));
        assert_eq!(at(6), Some(12));
        assert_eq!(at(7), Some(13));
        assert_eq!(at(9), Some(10));
        assert_eq!(at(12), Some(50));
        assert_eq!(at(13), None);
    }

    #[test]
    fn truncated_or_garbage_tables_give_no_line() {
        assert_eq!(line_of(&[], 1, 0), None);
        assert_eq!(line_of(&[head(14, 1)], 1, 0), None);
        assert_eq!(line_of(&[0x12, 0x34], 1, 0), None);
        // Endless continuation groups stop.
        let mut endless = vec![head(13, 1)];
        endless.extend([0x7f; 40]);
        assert_eq!(line_of(&endless, 1, 0), None);
        // A delta below line 1 is no line.
        assert_eq!(line_of(&[head(13, 1), 7], 1, 0), None);
        // Nor one past what an i64 holds (+1, then +1 more).
        assert_eq!(line_of(&[head(13, 1), 2], i64::MAX, 0), None);
        assert_eq!(line_of(&[head(11, 1), 0, 0], i64::MAX, 0), None);
        assert_eq!(line_of(&[head(13, 1), 3], i64::MIN, 0), None);
    }

    #[test]
    fn every_byte_string_terminates() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = line_of(&bytes, 1, seed % 100);
        }
    }
}
