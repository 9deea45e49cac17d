//! `dspo-server eval` runs every task the server runs, through the same pipeline entry point:
//! an InstructPix2Pix edit from `eval --images` is, pixel for pixel, the server's /edit of the
//! same image, prompt and seed; img2img and SDXL evaluations produce their images; a mode the
//! model has no pipeline for is refused with a clear message.

mod common;

use common::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dspo-server");

fn eval(model: &str, extra: &[&str], prompts: &Path, out: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["eval", "--model"])
        .arg(models_dir().join(model))
        .arg("--prompts")
        .arg(prompts)
        .arg("--out")
        .arg(out)
        .args(["--single", "--steps", "3", "--guidance-scale", "7.5", "--scheduler", "ddim", "--size", "64"])
        .args(extra)
        .output()
        .unwrap()
}

fn inputs() -> (std::path::PathBuf, std::path::PathBuf, Vec<Vec<u8>>) {
    let dir = temp_dir("eval-edit");
    let images = dir.join("inputs");
    std::fs::create_dir_all(&images).unwrap();
    let pngs = vec![test_png(64, 64), {
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([200, (x * 4) as u8, (y * 2) as u8]));
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }];
    for (i, p) in pngs.iter().enumerate() {
        std::fs::write(images.join(format!("{i:02}.png")), p).unwrap();
    }
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "make it blue\nturn it into a square\n").unwrap();
    (dir, images, pngs)
}

#[test]
fn eval_edits_are_the_servers_edits() {
    let (dir, images, pngs) = inputs();
    let out = dir.join("ip2p");
    let run = eval("tiny-ip2p", &["--images", images.to_str().unwrap()], &dir.join("prompts.txt"), &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));

    let server = start(tiny_config());
    for (i, (prompt, png)) in ["make it blue", "turn it into a square"].iter().zip(&pngs).enumerate() {
        let body = json!({"image": b64(png), "prompt": prompt, "model": "tiny-ip2p", "steps": 3,
                          "guidance_scale": 7.5, "image_guidance_scale": 1.5, "scheduler": "ddim",
                          "seed": i * 1000});
        let served = pngs_of(&post_json(&server, "/edit", &body));
        let evaluated = std::fs::read(out.join(format!("a/{i:04}_0.png"))).unwrap();
        assert_eq!(pixels(&served), pixels(&evaluated), "prompt {i}: eval and /edit differ");
    }
}

fn pngs_of(r: &Reply) -> Vec<u8> {
    pngs(r).remove(0)
}

#[test]
fn eval_runs_img2img_and_sdxl_and_refuses_what_a_model_cannot_do() {
    let (dir, images, _) = inputs();
    let prompts = dir.join("prompts.txt");
    let img = images.to_str().unwrap();
    let run = eval("tiny-sd15", &["--images", img, "--mode", "img2img", "--strength", "0.6"], &prompts, &dir.join("i2i"));
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let run = eval("tiny-sdxl", &[], &prompts, &dir.join("xl"));
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for sub in ["i2i", "xl"] {
        for i in 0..2 {
            let png = std::fs::read(dir.join(format!("{sub}/a/{i:04}_0.png"))).unwrap();
            assert_eq!(png_size(&png), (64, 64), "{sub} {i}");
        }
    }
    let run = eval("tiny-sdxl", &["--images", img], &prompts, &dir.join("xl-edit"));
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("no edit pipeline"));
    let run = eval("tiny-ip2p", &[], &prompts, &dir.join("ip2p-t2i"));
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("does not run txt2img"));
}
