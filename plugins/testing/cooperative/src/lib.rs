//! Busy loop that polls `cancelled()` and returns early, with an error, when
//! asked. It reports progress once as it starts, so that a test can wait
//! until it runs.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase};

struct Cooperative;

impl Phase for Cooperative {
    fn run(_: &Context, _: &Input) -> Result<Value, PhaseError> {
        jobhost_plugin::progress(0, "running");
        let mut polls = 0u64;
        while !jobhost_plugin::cancelled() {
            polls += 1;
            let mut work = 0u64;
            for i in 0..100 {
                work = std::hint::black_box(work.wrapping_add(i));
            }
        }
        Err(PhaseError::fail(format!(
            "stopped cooperatively after {polls} polls"
        )))
    }
}

export_phase!(Cooperative);
