//! `/proc/net/dev`: bytes received and sent by the host's interfaces, as deltas between samples.

use std::collections::BTreeMap;

/// Cumulative byte counters of one interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Parses `/proc/net/dev` into counters per interface, loopback excluded (traffic between the
/// agent and its own tunnels and guests' forwarded ports is not host traffic).
pub fn parse(text: &str) -> BTreeMap<String, Counters> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        // The two header lines have no `name:` prefix before the numbers.
        let Some((name, rest)) = line.split_once(':') else { continue };
        let name = name.trim();
        if name.is_empty() || name == "lo" || name.contains('|') {
            continue;
        }
        let fields: Vec<u64> = rest.split_whitespace().map_while(|f| f.parse().ok()).collect();
        // Receive has 8 columns, then transmit starts with bytes.
        if fields.len() < 9 {
            continue;
        }
        out.insert(name.to_owned(), Counters { rx_bytes: fields[0], tx_bytes: fields[8] });
    }
    out
}

/// Turns cumulative counters into bytes since the previous sample.
#[derive(Debug, Default)]
pub struct Delta {
    previous: Option<BTreeMap<String, Counters>>,
}

impl Delta {
    /// Bytes (in, out) since the previous call; (0, 0) on the first call. A counter that went
    /// backwards (interface re-created, driver reset) counts from zero; an interface that
    /// appeared since the previous sample counts whole, because it started after it.
    pub fn next(&mut self, now: BTreeMap<String, Counters>) -> (u64, u64) {
        let Some(prev) = self.previous.replace(now) else { return (0, 0) };
        let now = self.previous.as_ref().expect("just set");
        let (mut rx, mut tx) = (0u64, 0u64);
        for (name, cur) in now {
            let before = prev.get(name).copied().unwrap_or_default();
            rx = rx.saturating_add(since(before.rx_bytes, cur.rx_bytes));
            tx = tx.saturating_add(since(before.tx_bytes, cur.tx_bytes));
        }
        (rx, tx)
    }
}

fn since(before: u64, now: u64) -> u64 {
    if now >= before { now - before } else { now }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 9999999   100    0    0    0     0          0         0  9999999     100    0    0    0     0       0          0
  eth0: 1000      10     0    0    0     0          0         0  2000        20    0    0    0     0       0          0
docker0:  50       1     0    0    0     0          0         0    70         1    0    0    0     0       0          0
";

    #[test]
    fn parses_every_interface_but_loopback() {
        let got = parse(SAMPLE);
        assert_eq!(got.len(), 2);
        assert_eq!(got["eth0"], Counters { rx_bytes: 1000, tx_bytes: 2000 });
        assert_eq!(got["docker0"], Counters { rx_bytes: 50, tx_bytes: 70 });
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse("nothing here\nx: 1 2\n").is_empty());
    }

    fn counters(pairs: &[(&str, u64, u64)]) -> BTreeMap<String, Counters> {
        pairs
            .iter()
            .map(|(n, rx, tx)| (n.to_string(), Counters { rx_bytes: *rx, tx_bytes: *tx }))
            .collect()
    }

    #[test]
    fn deltas_between_samples() {
        let mut d = Delta::default();
        assert_eq!(d.next(counters(&[("eth0", 100, 200)])), (0, 0));
        assert_eq!(d.next(counters(&[("eth0", 150, 260)])), (50, 60));
        assert_eq!(d.next(counters(&[("eth0", 150, 260)])), (0, 0));
    }

    #[test]
    fn counter_reset_counts_from_zero() {
        let mut d = Delta::default();
        d.next(counters(&[("eth0", 1000, 1000), ("eth1", 10, 10)]));
        assert_eq!(d.next(counters(&[("eth0", 30, 1100), ("eth1", 15, 12)])), (35, 102));
    }

    #[test]
    fn new_interface_counts_whole_and_gone_one_counts_nothing() {
        let mut d = Delta::default();
        d.next(counters(&[("eth0", 100, 100)]));
        assert_eq!(d.next(counters(&[("eth0", 110, 100), ("tap0", 5, 7)])), (15, 7));
        assert_eq!(d.next(counters(&[("tap0", 6, 7)])), (1, 0));
    }
}
