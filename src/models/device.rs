//! Device names as users write them in configs and flags: `cpu`, `cuda`, `cuda:N`.

use candle_core::Device;

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
            let device = Device::new_cuda(ordinal).map_err(|e| format!("device '{s}': {e}"))?;
            keep_freed_memory(&device).map_err(|e| format!("device '{s}': {e}"))?;
            Ok(device)
        }
        other => Err(format!("unknown device '{other}' (cpu, cuda or cuda:N)")),
    }
}

/// Keeps the GPU memory that tensors free in the CUDA driver's pool instead of handing it back
/// to the OS at every synchronisation.
///
/// candle allocates each tensor with cuMemAllocAsync from the device's default pool, whose
/// release threshold is 0: every synchronisation (the end of each UNet call the benchmark times,
/// each training step's loss read) unmaps all freed memory, and the next step maps it again,
/// a cost that grows with the activations, so with the batch. PyTorch's caching allocator
/// holds its memory the same way. `DSPO_CUDA_POOL_RELEASE=1` restores the driver's default,
/// for a GPU shared with other processes or an A/B run (bench/gpu.sh).
#[cfg(feature = "cuda")]
fn keep_freed_memory(device: &Device) -> Result<(), String> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(d) = device else {
        return Ok(());
    };
    if std::env::var("DSPO_CUDA_POOL_RELEASE").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(|e| e.to_string())?;
    let mut threshold = u64::MAX;
    // SAFETY: the device comes from a live context, and the attribute takes a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device()).map_err(|e| e.to_string())?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| format!("keeping freed memory in the CUDA pool: {e}"))
    }
}

#[cfg(not(feature = "cuda"))]
fn keep_freed_memory(_device: &Device) -> Result<(), String> {
    Ok(())
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
