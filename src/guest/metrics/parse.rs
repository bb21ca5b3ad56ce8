//! `nvidia-smi --query-gpu=… --format=csv,noheader,nounits` lines, parsed (pure).
//!
//! One line per GPU per interval, fields separated by `", "`, in the order of [`QUERY`]:
//! `0, NVIDIA H100 80GB HBM3, 97, 71, 40000, 81559, 612.53`. A value the GPU cannot give
//! reads `[N/A]`, `[Not Supported]`, `[Unknown Error]`, … (any bracketed text): it becomes 0
//! in `/stats`, never a dropped sample.

use crate::gpu::GpuStats;

/// The fields asked for, in order (real `nvidia-smi` property names, `--help-query-gpu`).
pub const QUERY: &str =
    "index,name,utilization.gpu,temperature.gpu,memory.used,memory.total,power.draw";

/// A line that is not one of ours.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("expected 7 comma-separated fields, found {found}")]
    Fields { found: usize },
    #[error("field {field} is {value:?}, not a number")]
    Number { field: &'static str, value: String },
}

/// One GPU line; `None` where the GPU did not give a value.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuLine {
    pub index: u32,
    pub name: String,
    pub util: Option<f64>,
    pub temp: Option<f64>,
    pub mem_used_mib: Option<f64>,
    pub mem_total_mib: Option<f64>,
    pub power_w: Option<f64>,
}

impl GpuLine {
    /// The `/stats` entry: missing values are 0.
    pub fn stats(&self) -> GpuStats {
        let whole = |v: Option<f64>| v.filter(|v| *v >= 0.0).map(|v| v.round() as u64).unwrap_or(0);
        GpuStats {
            index: self.index,
            util: self.util.unwrap_or(0.0),
            temp: self.temp.map(|t| t.round() as i64).unwrap_or(0),
            mem_used_mib: whole(self.mem_used_mib),
            mem_total_mib: whole(self.mem_total_mib),
            power_w: self.power_w.map(crate::gpu::round2).unwrap_or(0.0),
        }
    }
}

/// Parses one line. The name is whatever lies between the index and the five numbers, so a
/// name with a comma in it still parses.
pub fn parse_line(line: &str) -> Result<GpuLine, ParseError> {
    let fields: Vec<&str> = line.trim_end_matches(['\r', '\n']).split(',').map(str::trim).collect();
    if fields.len() < 7 {
        return Err(ParseError::Fields { found: fields.len() });
    }
    let n = fields.len();
    let index = match number("index", fields[0])? {
        Some(i) if i >= 0.0 && i.fract() == 0.0 && i <= f64::from(u32::MAX) => i as u32,
        _ => return Err(ParseError::Number { field: "index", value: fields[0].to_owned() }),
    };
    Ok(GpuLine {
        index,
        name: fields[1..n - 5].join(", "),
        util: number("utilization.gpu", fields[n - 5])?,
        temp: number("temperature.gpu", fields[n - 4])?,
        mem_used_mib: number("memory.used", fields[n - 3])?,
        mem_total_mib: number("memory.total", fields[n - 2])?,
        power_w: number("power.draw", fields[n - 1])?,
    })
}

/// A number, or `None` for nvidia-smi's bracketed "no value" markers.
fn number(field: &'static str, value: &str) -> Result<Option<f64>, ParseError> {
    if value.starts_with('[') && value.ends_with(']') {
        return Ok(None);
    }
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(Some(v)),
        _ => Err(ParseError::Number { field, value: value.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_real_h100_line() {
        let line = parse_line("0, NVIDIA H100 80GB HBM3, 97, 71, 40000, 81559, 612.53").unwrap();
        assert_eq!(line.name, "NVIDIA H100 80GB HBM3");
        assert_eq!(
            line.stats(),
            GpuStats {
                index: 0,
                util: 97.0,
                temp: 71,
                mem_used_mib: 40000,
                mem_total_mib: 81559,
                power_w: 612.53
            }
        );
    }

    #[test]
    fn markers_become_zero_and_keep_the_rest() {
        let line = parse_line("1, Tesla T4, 0, 38, 0, 15360, [N/A]\r\n").unwrap();
        assert_eq!((line.index, line.power_w, line.mem_total_mib), (1, None, Some(15360.0)));
        assert_eq!(line.stats().power_w, 0.0);
        let line = parse_line(
            "2, NVIDIA GeForce RTX 3090, [Not Supported], [Unknown Error], 5, 24576, 30.1",
        )
        .unwrap();
        assert_eq!((line.util, line.temp), (None, None));
        assert_eq!((line.stats().util, line.stats().temp, line.stats().mem_used_mib), (0.0, 0, 5));
    }

    #[test]
    fn a_name_with_a_comma_still_parses() {
        let line = parse_line("3, Board, rev 2, 1, 2, 3, 4, 5.5").unwrap();
        assert_eq!((line.index, line.name.as_str(), line.power_w), (3, "Board, rev 2", Some(5.5)));
    }

    #[test]
    fn other_lines_are_refused() {
        assert_eq!(parse_line(""), Err(ParseError::Fields { found: 1 }));
        assert_eq!(parse_line("index, name"), Err(ParseError::Fields { found: 2 }));
        assert!(matches!(
            parse_line(
                "Failed to initialize NVML: Driver/library version mismatch, a, b, c, d, e, f"
            ),
            Err(ParseError::Number { field: "index", .. })
        ));
        assert!(matches!(
            parse_line("0, X, 97 %, 71, 1, 2, 3"),
            Err(ParseError::Number { field: "utilization.gpu", .. })
        ));
        assert!(parse_line("-1, X, 1, 2, 3, 4, 5").is_err());
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzz::{config, hostile_text};

    /// A line in nvidia-smi's shape with hostile fields.
    fn near_line() -> impl Strategy<Value = String> {
        let field = prop_oneof![
            hostile_text(),
            Just("[N/A]".to_owned()),
            Just("NaN".to_owned()),
            Just("inf".to_owned()),
            "-?[0-9]{0,6}(\\.[0-9]{0,3})?",
        ];
        proptest::collection::vec(field, 0..10).prop_map(|fields| fields.join(", "))
    }

    proptest! {
        #![proptest_config(config())]

        /// The guest writes these lines: any of them is parsed or refused, and a parsed one
        /// carries finite numbers only.
        #[test]
        fn nvidia_smi_lines(line in prop_oneof![hostile_text(), near_line()]) {
            if let Ok(gpu) = parse_line(&line) {
                let values = [gpu.util, gpu.temp, gpu.mem_used_mib, gpu.mem_total_mib, gpu.power_w];
                prop_assert!(values.iter().flatten().all(|v| v.is_finite()));
                let _ = gpu.stats();
            }
        }
    }
}
