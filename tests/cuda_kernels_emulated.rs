//! The CUDA attention kernels checked without a GPU: their source is compiled as C++ over a
//! small emulation of CUDA's execution model (tests/cuda_emulation/emulation.h: a block's
//! threads are CPU threads meeting at a barrier) and run against attention computed directly in
//! double precision, values, log-sum-exps and gradients. What this cannot see (half-precision
//! loads and stores, the real launch) `dspo-server check-kernels --device cuda:0` checks on a GPU.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn cuda_attention_kernels_match_direct_attention_in_emulation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    if Command::new(&cxx).arg("--version").output().is_err() {
        eprintln!("SKIPPED the emulated CUDA kernel check: no C++ compiler ({cxx}; set CXX)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dspo-cuda-emu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("attention_check");
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-DDSPO_CUDA_EMULATION"])
        .arg("-I")
        .arg(root.join("src/models/kernels/cuda"))
        .arg("-I")
        .arg(root.join("tests/cuda_emulation"))
        .arg(root.join("tests/cuda_emulation/attention_check.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(
        build.status.success(),
        "compiling the emulated kernels failed:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "emulated CUDA attention differs from the reference:\n{report}");
    assert_eq!(report.lines().filter(|l| l.starts_with("ok")).count(), 9, "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
