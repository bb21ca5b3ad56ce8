//! The kernel's CPU list format (`0-3,8,10-11`), read and written.

/// The CPUs of a list, sorted, without duplicates; `None` when it is not a CPU list.
pub fn parse(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
            None => {
                let one: u32 = part.parse().ok()?;
                (one, one)
            }
        };
        // A list longer than any machine's is a typo, not a request.
        if first > last || last >= 1 << 16 {
            return None;
        }
        cpus.extend(first..=last);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// `cpus` (sorted) in the kernel's format, runs joined with `-`, parts with `sep`.
pub fn format(cpus: &[u32], sep: &str) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        while i + 1 < cpus.len() && cpus[i + 1] == cpus[i] + 1 {
            i += 1;
        }
        let end = cpus[i];
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(sep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_round_trip() {
        assert_eq!(parse("0-3,8,10-11\n"), Some(vec![0, 1, 2, 3, 8, 10, 11]));
        assert_eq!(format(&[0, 1, 2, 3, 8, 10, 11], ","), "0-3,8,10-11");
        assert_eq!(parse(""), Some(vec![]));
        assert_eq!(parse("3,1,1-2"), Some(vec![1, 2, 3]));
        assert_eq!(format(&[], ","), "");
        assert_eq!(format(&[4, 5], ":"), "4-5");
        for bad in ["a", "3-1", "1-", "0-70000", "1,,x"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
