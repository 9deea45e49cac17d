//! The reward models (CLIP score, PickScore, LAION aesthetics, HPSv2) and their preprocessing
//! against transformers and open_clip: `dspo-server conformance` on the suite that
//! tests/fixtures/rewards/make_reward_cases.py wrote with those libraries (see its README).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn every_reward_case_passes() {
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rewards");
    let out = Command::new(env!("CARGO_BIN_EXE_dspo-server"))
        .arg("conformance")
        .arg(&suite)
        .output()
        .expect("run dspo-server");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let cases = std::fs::read_dir(suite.join("cases"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
        .count();
    assert!(cases >= 16, "{cases} cases");
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().last(), Some(format!("{cases} passed, 0 failed").as_str()), "{stdout}");
    for kind in ["clip_preprocess", "clip_embed", "reward"] {
        assert!(stdout.lines().any(|l| l.starts_with("PASS ") && l.contains(&format!(" {kind} "))), "{kind}: {stdout}");
    }
}
