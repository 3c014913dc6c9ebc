//! Spins forever without calling the host: only epoch interruption stops it.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase};

struct Spin;

impl Phase for Spin {
    fn run(_: &Context, _: &Input) -> Result<Value, PhaseError> {
        let mut counter = 0u64;
        loop {
            counter = std::hint::black_box(counter.wrapping_add(1));
        }
    }
}

export_phase!(Spin);
