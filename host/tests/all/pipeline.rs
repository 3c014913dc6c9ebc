//! The sample pipeline (csv-parse → aggregate → render-report) on real input.

use serde_json::json;

use crate::{load, output, runtime};
use jobhost::runtime::PhaseRun;

const SALES_CSV: &str = "\
order,region,amount,paid
1001,north,120.50,true
1002,south,80,true
1003,north,19.5,false
1004,east,oops,true
1005,south,20,true
1006,,5,true
";

#[tokio::test]
async fn csv_to_markdown_report() {
    let runtime = runtime();
    let csv = load(&runtime, plugin_artifacts::CSV_PARSE).await;
    let aggregate = load(&runtime, plugin_artifacts::AGGREGATE).await;
    let report = load(&runtime, plugin_artifacts::RENDER_REPORT).await;
    assert_eq!(csv.metadata.name, "csv-parse");
    assert_eq!(csv.metadata.version, "1.0.0");

    let payload = json!({ "csv": SALES_CSV }).to_string();
    let mut previous = Vec::new();

    let parsed = runtime.run(&csv, PhaseRun::new(payload.clone())).await;
    let parsed_out = output(&parsed);
    assert_eq!(parsed_out["rows"], 6);
    assert_eq!(
        parsed_out["records"][0],
        json!({"order": 1001, "region": "north", "amount": 120.5, "paid": true})
    );
    previous.push((
        "parse".to_string(),
        parsed.outcome.unwrap().as_str().to_owned(),
    ));

    let mut run = PhaseRun::new(payload.clone());
    run.config =
        json!({"group_by": "region", "sum": ["amount"], "required": ["order"]}).to_string();
    run.previous = previous.clone();
    let aggregated = runtime.run(&aggregate, run).await;
    let aggregated_out = output(&aggregated);
    assert_eq!(aggregated_out["totals"], json!({"amount": 240.0}));
    assert_eq!(aggregated_out["valid"], 4);
    assert_eq!(
        aggregated.last_progress.as_ref().map(|p| p.percent),
        Some(100)
    );
    assert!(
        aggregated
            .log
            .entries
            .iter()
            .any(|e| e.message == "2 invalid records skipped")
    );
    previous.push((
        "aggregate".to_string(),
        aggregated.outcome.unwrap().as_str().to_owned(),
    ));

    let mut run = PhaseRun::new(payload);
    run.config = json!({"title": "Sales by region"}).to_string();
    run.previous = previous;
    let rendered = output(&runtime.run(&report, run).await);
    assert_eq!(rendered["format"], "markdown");
    assert_eq!(
        rendered["report"],
        "# Sales by region\n\n4 valid records, 2 invalid.\n\n\
         | region | count | amount |\n|---|---:|---:|\n\
         | north | 2 | 140 |\n| south | 2 | 100 |\n\
         | **total** | 4 | 240 |\n\n\
         ## Invalid records\n\n\
         - record 4: field `amount` is not a number: \"oops\"\n\
         - record 6: missing group field `region`\n"
    );
}

#[tokio::test]
async fn bad_input_is_a_permanent_failure_with_a_reason() {
    let runtime = runtime();
    let csv = load(&runtime, plugin_artifacts::CSV_PARSE).await;
    let result = crate::run(&runtime, &csv, r#"{"text": "a,b"}"#, "{}").await;
    let failure = result.outcome.unwrap_err();
    assert!(!failure.is_retryable());
    assert!(
        failure
            .to_string()
            .contains("invalid payload: missing field `csv`"),
        "{failure}"
    );
}
