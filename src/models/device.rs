//! Device and dtype names as users write them in configs and flags: `cpu`, `cuda`, `cuda:N`;
//! `f32`, `f16`, `bf16`.

use candle_core::{DType, Device};

/// A dtype by name (also the long names torch users write). The error is a sentence.
pub fn parse_dtype(name: &str) -> Result<DType, String> {
    Ok(match name {
        "f32" | "float32" | "fp32" => DType::F32,
        "f16" | "float16" | "fp16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        o => return Err(format!("unknown dtype '{o}' (f32, f16 or bf16)")),
    })
}

/// Opens the named device. The error is a sentence for the user; a CUDA device asked of a
/// binary built without the `cuda` feature says how to get one that has it.
pub fn parse_device(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| format!("device '{s}': expected cuda:N with N a GPU index"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(format!(
                    "device '{s}': this binary was built without CUDA support \
                     (build one with scripts/build-cuda.sh or `cargo build --release --features cuda`)"
                ));
            }
            Device::new_cuda(ordinal).map_err(|e| format!("device '{s}': {e}"))
        }
        other => Err(format!("unknown device '{other}' (cpu, cuda or cuda:N)")),
    }
}

/// Whether `name` is written like a device (`cpu`, `cuda`, `cuda:N`), without opening it:
/// what tells a placement suffix (`DIR@cuda:1`) from a hub revision (`owner/repo@main`).
pub fn looks_like_device(name: &str) -> bool {
    name == "cpu"
        || name == "cuda"
        || name
            .strip_prefix("cuda:")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("gpu").unwrap_err().contains("unknown device"));
        assert!(parse_device("cuda:x")
            .unwrap_err()
            .contains("expected cuda:N"));
        if !candle_core::utils::cuda_is_available() {
            assert!(parse_device("cuda:0").unwrap_err().contains("without CUDA"));
        }
    }
}
