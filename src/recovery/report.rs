//! What a reconciliation did, as `recover` prints it: a table for people, JSON for scripts.

use serde::Serialize;

use super::plan::{Action, Row};

/// The outcome of one reconciliation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Nothing was changed; the rows say what would be done.
    pub dry_run: bool,
    pub rows: Vec<Row>,
    /// A line for the reader (e.g. the agent holds the lock during a dry run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Report {
    /// Whether any action failed.
    pub fn failed(&self) -> bool {
        self.rows.iter().any(|r| r.failed.is_some())
    }
}

fn word(action: Action) -> &'static str {
    match action {
        Action::Adopted => "adopted",
        Action::Kept => "kept",
        Action::Stopped => "stopped",
        Action::Removed => "removed",
        Action::Returned => "returned",
        Action::Rebooted => "rebooted",
        Action::Error => "error",
        Action::Quarantined => "quarantined",
    }
}

fn subject(row: &Row) -> &'static str {
    match row.subject {
        super::plan::Subject::Instance => "instance",
        super::plan::Subject::Process => "process",
        super::plan::Subject::File => "file",
        super::plan::Subject::Gpu => "gpu",
        super::plan::Subject::Network => "network",
    }
}

/// The table: one line per thing found, columns aligned.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    if report.dry_run {
        out.push_str("Dry run: nothing was changed; ACTION is what recover would do.\n");
    }
    if let Some(note) = &report.note {
        out.push_str(note);
        out.push('\n');
    }
    if report.rows.is_empty() {
        out.push_str(
            "Nothing to recover: no instance record, no process, file or GPU of the agent.\n",
        );
        return out;
    }
    let lines: Vec<[String; 4]> = report
        .rows
        .iter()
        .map(|r| {
            let action = match &r.failed {
                Some(_) => format!("FAILED ({})", word(r.action)),
                None => word(r.action).to_owned(),
            };
            let why = match &r.failed {
                Some(e) => format!("{}: {e}", r.why),
                None => r.why.clone(),
            };
            [subject(r).to_owned(), r.name.clone(), action, why]
        })
        .collect();
    let header = ["WHAT", "NAME", "ACTION", "WHY"].map(str::to_owned);
    let width = |col: usize| {
        lines.iter().chain([&header]).map(|l| l[col].chars().count()).max().unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    for line in [&header].into_iter().chain(&lines) {
        for (col, w) in widths.iter().enumerate() {
            out.push_str(&format!("{:<w$}  ", line[col], w = *w));
        }
        out.push_str(&line[3]);
        out.push('\n');
    }
    out
}

pub fn render_json(report: &Report) -> String {
    serde_json::to_string_pretty(report).expect("a report always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::plan::Subject;

    fn rows() -> Vec<Row> {
        vec![
            Row {
                subject: Subject::Instance,
                name: "instance ab".into(),
                action: Action::Adopted,
                why: "its process is alive (running)".into(),
                failed: None,
            },
            Row {
                subject: Subject::Process,
                name: "QEMU pid 200".into(),
                action: Action::Stopped,
                why: "carries the marker of x, which has no record".into(),
                failed: Some("stop the orphan QEMU failed: still runs".into()),
            },
        ]
    }

    #[test]
    fn golden_table_and_json() {
        let report = Report { dry_run: true, rows: rows(), note: None };
        assert_eq!(
            render_text(&report),
            "Dry run: nothing was changed; ACTION is what recover would do.\n\
             WHAT      NAME          ACTION            WHY\n\
             instance  instance ab   adopted           its process is alive (running)\n\
             process   QEMU pid 200  FAILED (stopped)  carries the marker of x, which has no record: stop the orphan QEMU failed: still runs\n"
        );
        assert!(report.failed());
        let json: serde_json::Value = serde_json::from_str(&render_json(&report)).unwrap();
        assert_eq!(json["dry_run"], true);
        assert_eq!(json["rows"][0]["subject"], "instance");
        assert_eq!(json["rows"][0]["action"], "adopted");
        assert!(json["rows"][0].get("failed").is_none());
        assert_eq!(json["rows"][1]["failed"], "stop the orphan QEMU failed: still runs");
    }

    #[test]
    fn an_empty_host_says_so() {
        let report = Report { dry_run: false, rows: vec![], note: None };
        assert!(render_text(&report).starts_with("Nothing to recover"));
        assert!(!report.failed());
    }
}
