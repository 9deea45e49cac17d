//! With the `cuda` feature, compiles the project's own CUDA kernels to PTX with nvcc: one module
//! per storage type and padded head size, so the driver JIT-compiles only the variants a model
//! uses. Without the feature this does nothing (CPU builds and CI need no CUDA toolkit).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Padded head dimensions the attention kernels are built for (SD1.5 uses 40/80/160, SD2 and
/// SDXL 64); a head dimension is rounded up to the next one. Larger heads take the composed path.
const ATTENTION_HEAD_DIMS: [usize; 7] = [32, 48, 64, 80, 96, 128, 160];
/// (name used in the module, C type) of each storage type.
const ATTENTION_TYPES: [(&str, &str); 3] =
    [("f32", "float"), ("f16", "__half"), ("bf16", "__nv_bfloat16")];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = Path::new("src/models/kernels/cuda/attention.cu");
    println!("cargo:rerun-if-changed={}", src.display());
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // PTX for the oldest architecture asked for runs on every newer one (the driver JITs it).
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let include = std::env::var("CUDA_HOME").ok().map(|h| format!("-I{h}/include"));
    let jobs: Vec<_> = ATTENTION_TYPES
        .iter()
        .flat_map(|&(tn, ct)| ATTENTION_HEAD_DIMS.iter().map(move |&dp| (tn, ct, dp)))
        .collect();
    let handles: Vec<_> = jobs
        .iter()
        .map(|&(tn, ct, dp)| {
            let (nvcc, cap, include, src) = (nvcc.clone(), cap.clone(), include.clone(), src);
            let ptx = out.join(format!("attention_{tn}_{dp}.ptx"));
            std::thread::spawn(move || {
                let mut cmd = Command::new(&nvcc);
                cmd.args(["--ptx", "-O3", "-std=c++17"])
                    .arg(format!("-arch=sm_{cap}"))
                    .arg(format!("-DATTN_T={ct}"))
                    .arg(format!("-DATTN_DP={dp}"))
                    .args(include)
                    .arg("-o")
                    .arg(&ptx)
                    .arg(src);
                let status = cmd
                    .status()
                    .unwrap_or_else(|e| panic!("cannot run {nvcc} (set NVCC or PATH): {e}"));
                assert!(status.success(), "nvcc failed on {} for {tn}/{dp}", src.display());
            })
        })
        .collect();
    for h in handles {
        h.join().expect("nvcc thread");
    }
    let mut table = String::from(
        "/// (storage type, padded head dimension, PTX) of every attention module.\n\
         pub(super) const ATTENTION_PTX: &[(&str, usize, &str)] = &[\n",
    );
    for &(tn, _, dp) in &jobs {
        let ptx = out.join(format!("attention_{tn}_{dp}.ptx"));
        table += &format!("    (\"{tn}\", {dp}, include_str!({:?})),\n", ptx.display().to_string());
    }
    table += "];\n";
    std::fs::write(out.join("attention_ptx.rs"), table).unwrap();
}
