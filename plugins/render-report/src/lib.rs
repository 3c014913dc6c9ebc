//! `render-report`: the last phase of the sample pipeline.
//!
//! Reads the previous phase's output (as `aggregate` makes it) and renders a
//! Markdown report. Config: `{"title": "..."}` (optional). Output:
//! `{"format": "markdown", "report": "<text>"}`.

use std::collections::BTreeMap;
use std::fmt::Write;

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Config {
    title: Option<String>,
}

#[derive(Deserialize)]
struct Aggregated {
    group_by: String,
    groups: Vec<Group>,
    totals: BTreeMap<String, f64>,
    valid: u64,
    invalid: Vec<Invalid>,
}

#[derive(Deserialize)]
struct Group {
    key: String,
    count: u64,
    sums: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
struct Invalid {
    record: u64,
    reason: String,
}

struct RenderReport;

impl Phase for RenderReport {
    fn run(ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let data: Aggregated = input.previous_output()?;
        let title = config
            .title
            .unwrap_or_else(|| format!("Report for job {}", ctx.job_id));
        Ok(json!({ "format": "markdown", "report": render(&title, &data) }))
    }
}

export_phase!(RenderReport);

fn render(title: &str, data: &Aggregated) -> String {
    let fields: Vec<&String> = data.totals.keys().collect();
    let mut out = format!("# {title}\n\n");
    let _ = writeln!(
        out,
        "{} valid records, {} invalid.\n",
        data.valid,
        data.invalid.len()
    );
    let _ = write!(out, "| {} | count |", data.group_by);
    for field in &fields {
        let _ = write!(out, " {field} |");
    }
    out.push_str("\n|---|---:|");
    out.push_str(&"---:|".repeat(fields.len()));
    out.push('\n');
    for group in &data.groups {
        let _ = write!(out, "| {} | {} |", group.key, group.count);
        for field in &fields {
            let _ = write!(
                out,
                " {} |",
                number(group.sums.get(*field).copied().unwrap_or(0.0))
            );
        }
        out.push('\n');
    }
    let _ = write!(out, "| **total** | {} |", data.valid);
    for field in &fields {
        let _ = write!(out, " {} |", number(data.totals[*field]));
    }
    out.push('\n');
    if !data.invalid.is_empty() {
        out.push_str("\n## Invalid records\n\n");
        for invalid in &data.invalid {
            let _ = writeln!(out, "- record {}: {}", invalid.record, invalid.reason);
        }
    }
    out
}

/// Two decimals, without a trailing `.00` for whole numbers.
fn number(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_groups_totals_and_invalid_records() {
        let data: Aggregated = serde_json::from_value(json!({
            "group_by": "region",
            "groups": [
                {"key": "north", "count": 2, "sums": {"amount": 12.5}},
                {"key": "south", "count": 1, "sums": {"amount": 4.0}},
            ],
            "totals": {"amount": 16.5},
            "valid": 3,
            "invalid": [{"record": 4, "reason": "bad amount"}],
        }))
        .unwrap();
        assert_eq!(
            render("Sales", &data),
            "# Sales\n\n3 valid records, 1 invalid.\n\n\
             | region | count | amount |\n|---|---:|---:|\n\
             | north | 2 | 12.50 |\n| south | 1 | 4 |\n\
             | **total** | 3 | 16.50 |\n\n\
             ## Invalid records\n\n- record 4: bad amount\n"
        );
    }
}
