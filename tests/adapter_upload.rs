//! POST /adapters against a real server on 127.0.0.1: a kohya-format LoRA (the fixture diffusers
//! checked, see tests/lora_formats.rs) uploaded for one model is listed, serves /generate with
//! the same pixels as the file placed in the adapters directory by hand, belongs to the key
//! that uploaded it, and comes back byte for byte; a file that does not fit the model, is not
//! a LoRA file, or reuses a name is refused with its code before anything is stored.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;

const KEY_A: &str = "upload-key-a-0123456789";
const KEY_B: &str = "upload-key-b-0123456789";

fn kohya() -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/kohya_sd15.safetensors"),
    )
    .unwrap()
}

fn upload(
    server: &dspo_server::api::running::RunningServer,
    key: &str,
    fields: &[(&str, &str)],
    file: &[u8],
) -> Reply {
    let (ct, body) = multipart_file(fields, "file", "lora.safetensors", file);
    let auth = format!("Bearer {key}");
    post_raw(server, "/adapters", &[("content-type", &ct), ("authorization", &auth)], &body)
}

fn with_key(server: &dspo_server::api::running::RunningServer, method: &str, path: &str, key: &str, body: Option<&Value>) -> Reply {
    request(server, method, path, &[("authorization", &format!("Bearer {key}"))], body)
}

fn names(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap().to_string(), a["method"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn an_uploaded_kohya_lora_is_checked_listed_served_and_owned() {
    let mut config = tiny_config();
    config.auth.api_keys = vec![KEY_A.into(), KEY_B.into()];
    // A file placed by hand: served, and listed as a plain file.
    let by_hand = config.server.data_dir.join("adapters/by-hand");
    std::fs::create_dir_all(&by_hand).unwrap();
    std::fs::write(by_hand.join("adapter.safetensors"), kohya()).unwrap();
    let server = start(config);

    let r = upload(&server, KEY_A, &[("name", "kohya-up"), ("model", "tiny-sd15")], &kohya());
    assert_eq!(r.status, 201, "{:?}", r.json());
    assert_eq!(r.json()["method"], "uploaded");
    assert_eq!(r.json()["base_model"], "tiny-sd15");
    let list = with_key(&server, "GET", "/adapters", KEY_B, None).json();
    assert_eq!(
        names(&list),
        [("kohya-up".to_string(), "uploaded".to_string()), ("by-hand".to_string(), "file".to_string())]
    );

    let gen = |adapter: &str| {
        let body = json!({"prompt": "a red circle", "steps": 2, "seed": 8, "model": "tiny-sd15", "adapter": adapter});
        pngs(&with_key(&server, "POST", "/generate", KEY_B, Some(&body)))[0].clone()
    };
    assert_eq!(pixels(&gen("kohya-up")), pixels(&gen("by-hand")));

    // Refusals, each before anything is stored.
    let r = upload(&server, KEY_A, &[("name", "kohya-up")], &kohya());
    assert_eq!((r.status, r.code().as_str()), (409, "adapter_exists"));
    let r = upload(&server, KEY_A, &[("name", "for-sdxl"), ("model", "tiny-sdxl")], &kohya());
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_adapter"), "{:?}", r.json());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains("tiny-sdxl") && msg.contains("does not"), "{msg}");
    let r = upload(&server, KEY_A, &[("name", "noise")], b"not a safetensors file");
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_adapter"));
    let r = upload(&server, KEY_A, &[("name", "../escape")], &kohya());
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_job"));
    let r = upload(&server, KEY_A, &[("name", "x"), ("model", "nope")], &kohya());
    assert_eq!((r.status, r.code().as_str()), (404, "model_not_found"));
    let (ct, body) = multipart(&[("name", "no-file")], b"");
    let r = post_raw(&server, "/adapters", &[("content-type", &ct), ("authorization", &format!("Bearer {KEY_A}"))], &body);
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"), "a part named image is not the file");
    let listed = names(&with_key(&server, "GET", "/adapters", KEY_A, None).json());
    assert_eq!(listed.len(), 2, "{listed:?}");

    // Only the uploader may download or delete it.
    let r = with_key(&server, "GET", "/adapters/kohya-up/weights", KEY_B, None);
    assert_eq!(r.status, 403);
    assert_eq!(with_key(&server, "DELETE", "/adapters/kohya-up", KEY_B, None).status, 403);
    let r = with_key(&server, "GET", "/adapters/kohya-up/weights", KEY_A, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body, kohya());
    assert_eq!(with_key(&server, "DELETE", "/adapters/kohya-up", KEY_A, None).status, 204);
    let listed = names(&with_key(&server, "GET", "/adapters", KEY_A, None).json());
    assert_eq!(listed, [("by-hand".to_string(), "file".to_string())]);
    // The name is free again.
    let r = upload(&server, KEY_B, &[("name", "kohya-up")], &kohya());
    assert_eq!(r.status, 201, "{:?}", r.json());
}
