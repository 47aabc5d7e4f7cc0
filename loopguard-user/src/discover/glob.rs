//! Glob patterns over the names a target gives (routes, executables):
//! `*` matches any run of characters, `/` included; `?` matches one
//! character; anything else matches itself.

/// Iterative glob match with one backtrack point per `*` (linear in practice).
pub fn glob_match(pattern: &[char], text: &[char]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == '?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    glob_match(&pattern, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stars_questions_and_literals() {
        assert!(matches("stall-*", "stall-server"));
        assert!(matches("python3*", "python3.11"));
        assert!(matches("*", ""));
        assert!(!matches("node", "nodejs"));
        assert!(matches("n?de", "node"));
    }
}
