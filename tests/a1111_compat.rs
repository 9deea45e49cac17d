//! The AUTOMATIC1111-compatible routes with request bodies as A1111's clients send them: field
//! names, sampler names, seed -1, batch_size x n_iter, options we do not run (ignored), the
//! model in override_settings, `<lora:...>` in the prompt; the image equals /generate's for the
//! same settings, and img2img takes a `data:` URL.

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn a1111_bodies_generate_and_edit_like_our_own_routes() {
    let mut config = tiny_config();
    config.models.serve.truncate(2);
    let server = start(config);

    let body = json!({
        "prompt": "a red circle", "negative_prompt": "blurry", "steps": 3, "cfg_scale": 6.5,
        "sampler_name": "Euler a", "seed": 42, "width": 64, "height": 64, "batch_size": 2, "n_iter": 1,
        "restore_faces": false, "enable_hr": false, "tiling": false, "send_images": true, "save_images": false,
        "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, "script_args": []
    });
    let r = post_json(&server, "/sdapi/v1/txt2img", &body);
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let images = j["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let info: Value = serde_json::from_str(j["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], json!([42, 43]));
    assert_eq!(info["sampler_name"], "euler_a");
    assert_eq!(j["parameters"]["sampler_name"], "Euler a");

    // The same settings through /generate give the same pixels.
    let ours = post_json(&server, "/generate", &json!({
        "prompt": "a red circle", "negative_prompt": "blurry", "steps": 3, "guidance_scale": 6.5,
        "scheduler": "euler_a", "seed": 42, "width": 64, "height": 64, "model": "tiny-sd15"}));
    let a1111_png = unb64(images[0].as_str().unwrap());
    assert_eq!(pixels(&a1111_png), pixels(&pngs(&ours)[0]));

    // seed -1 draws one.
    let r = post_json(&server, "/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 2, "seed": -1}));
    let info: Value = serde_json::from_str(r.json()["info"].as_str().unwrap()).unwrap();
    assert!(info["seed"].as_u64().is_some());

    // img2img on the InstructPix2Pix model, the image as a data: URL.
    let input = format!("data:image/png;base64,{}", b64(&test_png(64, 64)));
    let r = post_json(&server, "/sdapi/v1/img2img", &json!({
        "init_images": [input], "prompt": "make it blue", "steps": 2, "image_cfg_scale": 1.5,
        "denoising_strength": 0.75, "override_settings": {"sd_model_checkpoint": "tiny-ip2p"}}));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(png_size(&unb64(r.json()["images"][0].as_str().unwrap())), (64, 64));

    // A LoRA named the A1111 way that does not exist; masks are refused.
    let r = post_json(&server, "/sdapi/v1/txt2img", &json!({"prompt": "x <lora:nope:0.8>", "steps": 2}));
    assert_eq!((r.status, r.code().as_str()), (404, "adapter_not_found"));
    let r = post_json(&server, "/sdapi/v1/img2img", &json!({"init_images": [b64(&test_png(64, 64))], "mask": "x", "prompt": "x"}));
    assert_eq!(r.status, 422);

    let samplers = get(&server, "/sdapi/v1/samplers").json();
    assert!(samplers.as_array().unwrap().iter().any(|s| s["name"] == "DPM++ 2M Karras"));
    let models = get(&server, "/sdapi/v1/sd-models").json();
    assert_eq!(models.as_array().unwrap().len(), 2);
    assert_eq!(get(&server, "/sdapi/v1/loras").json(), json!([]));
}
