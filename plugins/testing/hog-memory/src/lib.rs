//! Allocates and touches 1 MiB blocks until memory runs out.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase};

struct HogMemory;

impl Phase for HogMemory {
    fn run(_: &Context, _: &Input) -> Result<Value, PhaseError> {
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        loop {
            blocks.push(std::hint::black_box(vec![1u8; 1 << 20]));
        }
    }
}

export_phase!(HogMemory);
