//! `aggregate`: the middle phase of the sample pipeline.
//!
//! Reads `records` from the previous phase's output (as `csv-parse` makes
//! them). Config: `{"group_by": "region", "sum": ["amount"], "required": []}`.
//! A record is valid when every required field and every summed field is
//! present, and every summed field is a number; invalid records are reported
//! with the reason, not dropped silently. Output:
//! `{"group_by", "groups": [{"key", "count", "sums"}], "totals", "valid", "invalid": [{"record", "reason"}]}`
//! with groups sorted by key.

use std::collections::BTreeMap;

use jobhost_plugin::{Context, Input, Level, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    group_by: String,
    #[serde(default)]
    sum: Vec<String>,
    #[serde(default)]
    required: Vec<String>,
}

#[derive(Deserialize)]
struct Records {
    records: Vec<serde_json::Map<String, Value>>,
}

struct Aggregate;

impl Phase for Aggregate {
    fn run(ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let Records { records } = input.previous_output()?;
        let report = aggregate(&config, &records, |done| {
            jobhost_plugin::progress((done * 100 / records.len().max(1)) as u8, "aggregating")
        });
        let invalid = report["invalid"].as_array().map_or(0, Vec::len);
        if invalid > 0 {
            jobhost_plugin::log(Level::Warn, &format!("{invalid} invalid records skipped"));
        }
        Ok(report)
    }
}

export_phase!(Aggregate);

#[derive(Default)]
struct Group {
    count: u64,
    sums: BTreeMap<String, f64>,
}

fn aggregate(
    config: &Config,
    records: &[serde_json::Map<String, Value>],
    mut on_progress: impl FnMut(usize),
) -> Value {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut invalid = Vec::new();
    for (index, record) in records.iter().enumerate() {
        match validate(config, record) {
            Ok((key, values)) => {
                let group = groups.entry(key).or_default();
                group.count += 1;
                for (field, value) in values {
                    *group.sums.entry(field).or_default() += value;
                }
            }
            Err(reason) => invalid.push(json!({ "record": index + 1, "reason": reason })),
        }
        if (index + 1) % 1000 == 0 {
            on_progress(index + 1);
        }
    }
    on_progress(records.len());
    let mut totals: BTreeMap<String, f64> = config.sum.iter().map(|f| (f.clone(), 0.0)).collect();
    for group in groups.values() {
        for (field, sum) in &group.sums {
            *totals.entry(field.clone()).or_default() += sum;
        }
    }
    let valid: u64 = groups.values().map(|g| g.count).sum();
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(key, g)| json!({ "key": key, "count": g.count, "sums": g.sums }))
        .collect();
    json!({
        "group_by": config.group_by,
        "groups": groups,
        "totals": totals,
        "valid": valid,
        "invalid": invalid,
    })
}

/// Returns the record's group key and its summed values, or why it is invalid.
fn validate(
    config: &Config,
    record: &serde_json::Map<String, Value>,
) -> Result<(String, Vec<(String, f64)>), String> {
    let present = |field: &str| record.get(field).is_some_and(|v| !v.is_null());
    if let Some(missing) = config.required.iter().find(|f| !present(f)) {
        return Err(format!("missing required field `{missing}`"));
    }
    let key = match record.get(&config.group_by) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => {
            return Err(format!("missing group field `{}`", config.group_by));
        }
        Some(other) => other.to_string(),
    };
    let mut values = Vec::with_capacity(config.sum.len());
    for field in &config.sum {
        match record.get(field) {
            Some(Value::Number(n)) => values.push((field.clone(), n.as_f64().unwrap_or(0.0))),
            Some(Value::Null) | None => return Err(format!("missing field `{field}`")),
            Some(other) => return Err(format!("field `{field}` is not a number: {other}")),
        }
    }
    Ok((key, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(value: Value) -> Vec<serde_json::Map<String, Value>> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn groups_sums_and_reports_invalid_records() {
        let config = Config {
            group_by: "region".into(),
            sum: vec!["amount".into()],
            required: vec!["id".into()],
        };
        let input = records(json!([
            {"id": 1, "region": "north", "amount": 10.5},
            {"id": 2, "region": "south", "amount": 4},
            {"id": 3, "region": "north", "amount": 2},
            {"id": 4, "region": "north", "amount": "n/a"},
            {"region": "south", "amount": 1},
            {"id": 6, "amount": 1},
        ]));
        let out = aggregate(&config, &input, |_| {});
        assert_eq!(
            out["groups"],
            json!([
                {"key": "north", "count": 2, "sums": {"amount": 12.5}},
                {"key": "south", "count": 1, "sums": {"amount": 4.0}},
            ])
        );
        assert_eq!(out["totals"], json!({"amount": 16.5}));
        assert_eq!(out["valid"], 3);
        assert_eq!(
            out["invalid"],
            json!([
                {"record": 4, "reason": "field `amount` is not a number: \"n/a\""},
                {"record": 5, "reason": "missing required field `id`"},
                {"record": 6, "reason": "missing group field `region`"},
            ])
        );
    }

    #[test]
    fn reports_progress_to_completion() {
        let config = Config {
            group_by: "k".into(),
            sum: vec![],
            required: vec![],
        };
        let input = records(json!([{"k": "a"}, {"k": "b"}]));
        let mut seen = Vec::new();
        aggregate(&config, &input, |done| seen.push(done));
        assert_eq!(seen.last(), Some(&2));
    }
}
