//! Recurses without bound until the wasm stack overflows.

use jobhost_plugin::{Context, Input, Phase, PhaseError, Value, export_phase};

struct DeepRecursion;

#[inline(never)]
#[allow(unconditional_recursion)] // the point of this plugin
fn descend(depth: u64) -> u64 {
    // The array and black_box keep each frame alive, so nothing is optimized away.
    let frame = std::hint::black_box([depth; 16]);
    descend(depth + 1).wrapping_add(frame[(depth % 16) as usize])
}

impl Phase for DeepRecursion {
    fn run(_: &Context, _: &Input) -> Result<Value, PhaseError> {
        Ok(Value::from(descend(0)))
    }
}

export_phase!(DeepRecursion);
