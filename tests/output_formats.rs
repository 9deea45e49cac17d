//! JPEG and WebP output next to PNG, against a real server on 127.0.0.1: the same seed gives
//! the same pixels losslessly in WebP and closely in JPEG; the settings text is in the EXIF
//! UserComment where A1111 writes it, read back with Pillow (an independent reader); `Accept`
//! picks the file type for one image; bad values are 4xx with their codes.

mod common;

use common::*;
use serde_json::json;
use std::process::Command;

fn server() -> dspo_server::api::running::RunningServer {
    let mut c = tiny_config();
    c.models.serve.truncate(1);
    start(c)
}

fn first_image(r: &Reply) -> (String, Vec<u8>) {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let img = &r.json()["images"][0];
    let data = img["image_base64"]
        .as_str()
        .or(img["png_base64"].as_str())
        .unwrap();
    (img["mime_type"].as_str().unwrap().to_string(), unb64(data))
}

/// Pillow's reading of a file: its format, size and the EXIF UserComment decoded as piexif
/// (what A1111 uses) writes it: an 8-byte character-code prefix, then UTF-16 big-endian.
fn pillow_reads(file: &[u8]) -> Option<String> {
    let dir = temp_dir("formats");
    let path = dir.join("image");
    std::fs::write(&path, file).unwrap();
    let script = r#"
import sys
from PIL import Image
im = Image.open(sys.argv[1])
exif = im.getexif().get_ifd(0x8769)
comment = exif.get(0x9286, b"")
assert comment[:8] == b"UNICODE\0", comment[:8]
print(im.format, im.size[0], im.size[1])
print(comment[8:].decode("utf-16-be"))
"#;
    let out = Command::new("python3")
        .args(["-c", script, path.to_str().unwrap()])
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No module named 'PIL'") {
            return None;
        }
        panic!("pillow could not read the file: {err}");
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn jpeg_and_webp_carry_the_same_image_and_settings() {
    let server = server();
    let body = |fmt: Option<&str>| {
        let mut b = json!({"prompt": "a green triangle", "steps": 3, "seed": 21, "width": 64, "height": 64});
        if let Some(f) = fmt {
            b["output_format"] = json!(f);
        }
        b
    };
    let png = pngs(&post_json(&server, "/generate", &body(None)))[0].clone();
    let reference = pixels(&png);
    let text = dspo_server::api::images::read_png_parameters(&png).unwrap();

    let r = post_json(&server, "/generate", &body(Some("webp")));
    assert_eq!(r.json()["parameters"]["output_format"], "webp");
    assert!(r.json()["images"][0].get("png_base64").is_none());
    let (mime, webp) = first_image(&r);
    assert_eq!(mime, "image/webp");
    assert_eq!(&webp[..4], b"RIFF");
    assert_eq!(pixels(&webp), reference, "WebP output is lossless");

    let mut q = body(Some("jpeg"));
    q["output_quality"] = json!(95);
    let r = post_json(&server, "/generate", &q);
    assert_eq!(r.json()["parameters"]["output_quality"], 95);
    let (mime, jpeg) = first_image(&r);
    assert_eq!(mime, "image/jpeg");
    assert_eq!(&jpeg[..2], [0xFF, 0xD8]);
    let got = pixels(&jpeg);
    let mean_err = got
        .iter()
        .zip(&reference)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / got.len() as f64;
    assert!(mean_err < 6.0, "JPEG at quality 95 is {mean_err} grey levels off on average");

    match (pillow_reads(&webp), pillow_reads(&jpeg)) {
        (Some(w), Some(j)) => {
            assert_eq!(w, format!("WEBP 64 64\n{text}\n"));
            assert_eq!(j, format!("JPEG 64 64\n{text}\n"));
        }
        _ => eprintln!("SKIPPED the EXIF check with Pillow: pip install pillow (.ci/run does)"),
    }

    // Accept picks the type of a single file; it must agree with an explicit output_format.
    let r = request(&server, "POST", "/generate", &[("accept", "image/webp")], Some(&body(None)));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/webp"));
    assert_eq!(pixels(&r.body), reference);
    let r = request(&server, "POST", "/generate", &[("accept", "image/jpeg")], Some(&body(Some("jpg"))));
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    let r = request(&server, "POST", "/generate", &[("accept", "image/png")], Some(&body(Some("webp"))));
    assert_eq!((r.status, r.code().as_str()), (406, "not_acceptable"));
    let r = request(&server, "POST", "/generate", &[("accept", "image/png, application/json;q=0.5")], Some(&body(Some("webp"))));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["images"][0]["mime_type"], "image/webp");

    // Edits take the same fields, multipart included.
    let (ct, form) = multipart(&[("prompt", "make it blue"), ("mode", "img2img"), ("steps", "2"), ("output_format", "jpeg")], &test_png(64, 64));
    let r = post_raw(&server, "/edit", &[("content-type", &ct)], &form);
    assert_eq!(first_image(&r).0, "image/jpeg");

    for (bad, code) in [
        (json!({"prompt": "x", "output_format": "gif"}), "invalid_output_format"),
        (json!({"prompt": "x", "output_format": "jpeg", "output_quality": 0}), "invalid_output_format"),
        (json!({"prompt": "x", "output_format": 3}), "invalid_request"),
    ] {
        let r = post_json(&server, "/generate", &bad);
        assert_eq!((r.status, r.code().as_str()), (422, code), "{bad}");
    }
}
