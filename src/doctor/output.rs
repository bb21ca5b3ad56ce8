//! The report: aligned text for people, a JSON array for programs.

use super::Check;

/// Width of the check-name column (the longest name is `qemu-img`).
const NAME_WIDTH: usize = 10;

/// One line per check: `ok    kvm        /dev/kvm opens, API version 12`, then `[fix: …]`.
pub fn render_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let mut line =
            format!("{:<5} {:<NAME_WIDTH$} {}", c.status.as_str(), c.check, one_line(&c.detail));
        if let Some(fix) = &c.fix {
            line.push_str(&format!("  [fix: {}]", one_line(fix)));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `[{"check","status","detail","fix"}, …]`.
pub fn render_json(checks: &[Check]) -> String {
    serde_json::to_string_pretty(checks).expect("checks serialize")
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn sample() -> Vec<Check> {
        vec![
            Check::ok("kvm", "/dev/kvm opens, API version 12"),
            Check::new(
                "qemu-img",
                Status::Fail,
                "qemu-img is not on\nPATH",
                "apt-get install qemu-utils",
            ),
        ]
    }

    #[test]
    fn text_is_aligned_one_line_per_check() {
        assert_eq!(
            render_text(&sample()),
            "ok    kvm        /dev/kvm opens, API version 12\n\
             fail  qemu-img   qemu-img is not on PATH  [fix: apt-get install qemu-utils]\n"
        );
    }

    #[test]
    fn json_is_an_array_of_check_status_detail_fix() {
        let value: serde_json::Value = serde_json::from_str(&render_json(&sample())).unwrap();
        assert_eq!(
            value,
            serde_json::json!([
                {"check": "kvm", "status": "ok", "detail": "/dev/kvm opens, API version 12",
                 "fix": null},
                {"check": "qemu-img", "status": "fail", "detail": "qemu-img is not on\nPATH",
                 "fix": "apt-get install qemu-utils"},
            ])
        );
    }
}
