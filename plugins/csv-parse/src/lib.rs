//! `csv-parse`: the first phase of the sample pipeline.
//!
//! Input `{"csv": "<text>"}`: the output of the phase before (`fetch-url`
//! makes one) if there is one, otherwise the job's payload. Config
//! `{"delimiter": ",", "header": true}`
//! (both optional). Output `{"columns": [...], "records": [{...}], "rows": n}`
//! where each record maps column names to values: numbers and booleans are
//! typed, empty cells are `null`, everything else stays a string.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase, json};
use serde::Deserialize;
use serde_json::Map;

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    delimiter: String,
    header: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            delimiter: ",".into(),
            header: true,
        }
    }
}

#[derive(Deserialize)]
struct Payload {
    csv: String,
}

struct CsvParse;

impl Phase for CsvParse {
    fn run(ctx: &Context, input: &Input) -> Result<Value, PhaseError> {
        let config: Config = ctx.config()?;
        let source: Payload = if input.previous.is_empty() {
            input.payload()?
        } else {
            input.previous_output()?
        };
        parse(&source.csv, &config).map_err(PhaseError::fail)
    }
}

export_phase!(CsvParse);

fn parse(text: &str, config: &Config) -> Result<Value, String> {
    let delimiter = match config.delimiter.as_bytes() {
        [byte] => *byte,
        _ => {
            return Err(format!(
                "delimiter must be one byte, got {:?}",
                config.delimiter
            ));
        }
    };
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(config.header)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let columns: Vec<String> = if config.header {
        let headers = reader
            .headers()
            .map_err(|e| format!("bad CSV header: {e}"))?;
        headers.iter().map(str::to_owned).collect()
    } else {
        Vec::new()
    };
    let mut records = Vec::new();
    for (index, row) in reader.records().enumerate() {
        let row = row.map_err(|e| format!("bad CSV at record {}: {e}", index + 1))?;
        let mut record = Map::new();
        for (i, cell) in row.iter().enumerate() {
            let name = columns
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("column{}", i + 1));
            record.insert(name, typed(cell));
        }
        records.push(Value::Object(record));
    }
    Ok(json!({ "columns": columns, "rows": records.len(), "records": records }))
}

/// Types a cell the way a spreadsheet user expects.
fn typed(cell: &str) -> Value {
    if cell.is_empty() {
        return Value::Null;
    }
    if let Ok(int) = cell.parse::<i64>() {
        return json!(int);
    }
    if let Some(number) = cell
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
    {
        return Value::Number(number);
    }
    match cell {
        "true" | "TRUE" | "True" => Value::Bool(true),
        "false" | "FALSE" | "False" => Value::Bool(false),
        _ => Value::String(cell.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_cells_and_names_columns() {
        let out = parse(
            "name, qty,price,ok\nbolt,3,0.25,true\n\"nut, hex\",,1e2,no\n",
            &Config::default(),
        )
        .unwrap();
        assert_eq!(out["columns"], json!(["name", "qty", "price", "ok"]));
        assert_eq!(out["rows"], 2);
        assert_eq!(
            out["records"][0],
            json!({"name": "bolt", "qty": 3, "price": 0.25, "ok": true})
        );
        assert_eq!(
            out["records"][1],
            json!({"name": "nut, hex", "qty": null, "price": 100.0, "ok": "no"})
        );
    }

    #[test]
    fn headerless_and_custom_delimiter() {
        let config = Config {
            delimiter: ";".into(),
            header: false,
        };
        let out = parse("a;1\nb;2\n", &config).unwrap();
        assert_eq!(out["records"][1], json!({"column1": "b", "column2": 2}));
    }

    #[test]
    fn ragged_rows_are_an_error_naming_the_record() {
        let err = parse("a,b\n1,2\n3\n", &Config::default()).unwrap_err();
        assert!(err.contains("record 2"), "{err}");
    }

    #[test]
    fn rejects_multi_byte_delimiter() {
        let config = Config {
            delimiter: "::".into(),
            header: true,
        };
        assert!(parse("a\n", &config).unwrap_err().contains("one byte"));
    }
}
