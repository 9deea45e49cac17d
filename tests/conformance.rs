//! Runs `dspo-server conformance` on the team's suite (../shared/conformance): every case of
//! every kind must pass. Also proves that the runner can fail: a perturbed expectation and an
//! unknown case kind are both reported as FAIL with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn suite() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance")
}

fn run(suite: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dspo-server"))
        .arg("conformance")
        .arg(suite)
        .args(extra)
        .output()
        .expect("run dspo-server");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    (out.status.success(), stdout)
}

#[test]
fn every_case_of_the_shared_suite_passes() {
    let (ok, out) = run(&suite(), &[]);
    println!("{out}");
    let last = out.lines().last().unwrap_or_default();
    let n_cases = std::fs::read_dir(suite().join("cases"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .map(|x| x == "json")
                .unwrap_or(false)
        })
        .count();
    assert_eq!(last, format!("{n_cases} passed, 0 failed"), "{out}");
    assert!(ok);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("PASS ")).count(),
        n_cases
    );
}

#[test]
fn kind_filter_selects_cases() {
    let (ok, out) = run(&suite(), &["--kind", "tokenize"]);
    assert!(ok, "{out}");
    assert!(
        out.lines()
            .filter(|l| l.starts_with("PASS "))
            .all(|l| l.contains(" tokenize ")),
        "{out}"
    );
    assert!(out.lines().last().unwrap().ends_with("passed, 0 failed"));
}

/// Copies one case into a scratch suite, with its model path made absolute.
fn scratch_case(
    dir: &Path,
    case: &str,
    edit: impl FnOnce(
        &mut serde_json::Value,
        &mut std::collections::HashMap<String, candle_core::Tensor>,
    ),
) {
    std::fs::create_dir_all(dir.join("cases")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(suite().join("cases").join(format!("{case}.json"))).unwrap(),
    )
    .unwrap();
    if let Some(m) = json["model"].as_str() {
        json["model"] = serde_json::Value::String(suite().join(m).display().to_string());
    }
    let mut tensors = candle_core::safetensors::load(
        suite().join("cases").join(format!("{case}.safetensors")),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    edit(&mut json, &mut tensors);
    std::fs::write(
        dir.join("cases").join(format!("{case}.json")),
        serde_json::to_string(&json).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(
        &tensors,
        dir.join("cases").join(format!("{case}.safetensors")),
    )
    .unwrap();
}

#[test]
fn a_wrong_expectation_fails() {
    let dir = std::env::temp_dir().join(format!("dspo-conf-wrong-{}", std::process::id()));
    scratch_case(&dir, "unet_sd15", |json, tensors| {
        let name = json["expected"]["noise_pred"].as_str().unwrap().to_string();
        let t = tensors[&name].clone();
        // A perturbation of 1e-3 is ~30x the tolerance: a correct runner must flag it.
        tensors.insert(name, (t + 1e-3).unwrap());
    });
    let (ok, out) = run(&dir, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok, "{out}");
    assert!(out.contains("FAIL unet_sd15 unet"), "{out}");
    assert!(out.lines().last().unwrap() == "0 passed, 1 failed", "{out}");
}

#[test]
fn an_unknown_kind_fails_rather_than_skips() {
    let dir = std::env::temp_dir().join(format!("dspo-conf-unknown-{}", std::process::id()));
    scratch_case(&dir, "sft_loss_b2", |json, _| {
        json["kind"] = serde_json::Value::String("teleport".into());
    });
    let (ok, out) = run(&dir, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL sft_loss_b2 teleport") && out.contains("not implemented"),
        "{out}"
    );
}
