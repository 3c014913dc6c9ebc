//! Busy loop that polls `cancelled()` and returns early when asked.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase};

struct Cooperative;

impl Phase for Cooperative {
    fn run(_: &Context, _: &Input) -> Result<Value, PhaseError> {
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
