//! End-to-end tests of every endpoint and every error code, against a real server on
//! 127.0.0.1 serving the tiny conformance models.

mod common;

use common::*;
use dspo_server::api::images::read_png_parameters;
use dspo_server::models::lora::{LoraAdapter, LoraModule};
use dspo_server::models::pipeline_model::LoadOptions;
use dspo_server::models::DiffusionModel;
use serde_json::json;
use std::collections::BTreeMap;

#[test]
fn service_endpoints() {
    let server = start(tiny_config());
    let ready = get(&server, "/ready");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["ready"], true);

    let health = get(&server, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");
    assert_eq!(health.json()["models"].as_array().unwrap().len(), 3);

    let models = get(&server, "/models").json();
    let by_name: BTreeMap<String, serde_json::Value> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m.clone()))
        .collect();
    assert_eq!(by_name["tiny-sd15"]["architecture"], "stable_diffusion");
    assert_eq!(by_name["tiny-sd15"]["modes"], json!(["txt2img", "img2img"]));
    assert_eq!(
        by_name["tiny-sd15"]["default"], true,
        "the first served model is the default"
    );
    assert_eq!(
        by_name["tiny-sd15"]["defaults"]["width"], 64,
        "native size = sample_size * vae factor"
    );
    assert_eq!(by_name["tiny-ip2p"]["architecture"], "instruct_pix2pix");
    assert_eq!(by_name["tiny-ip2p"]["modes"], json!(["instruct_pix2pix"]));
    assert_eq!(by_name["tiny-sdxl"]["modes"], json!(["txt2img"]));
    assert_eq!(by_name["tiny-sdxl"]["defaults"]["scheduler"], "euler");

    let docs = get(&server, "/docs");
    assert_eq!(docs.status, 200);
    assert!(String::from_utf8_lossy(&docs.body).contains("SwaggerUIBundle"));
    let js = get(&server, "/docs/swagger-ui-bundle.js");
    assert_eq!(js.status, 200);
    assert!(js.body.len() > 100_000);
    assert_eq!(get(&server, "/docs/nope.js").status, 404);
}

#[test]
fn served_openapi_is_the_committed_file() {
    let server = start(tiny_config());
    let served = get(&server, "/openapi.json");
    assert_eq!(served.status, 200);
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json is committed");
    assert!(
        String::from_utf8_lossy(&served.body) == committed,
        "the served OpenAPI document differs from openapi/openapi.json; regenerate it with \
         `cargo run --release -- openapi > openapi/openapi.json` and review the diff"
    );
    let doc = served.json();
    for path in [
        "/generate",
        "/edit",
        "/models",
        "/health",
        "/ready",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    // Every enum value the document offers SDK users is one the server accepts.
    let schemas = &doc["components"]["schemas"];
    for s in schemas["Scheduler"]["enum"].as_array().unwrap() {
        let r = post_json(
            &server,
            "/generate",
            &json!({"prompt": "x", "steps": 2, "scheduler": s}),
        );
        assert_eq!(r.status, 200, "documented scheduler {s} refused");
    }
    let png = test_png(64, 64);
    for m in schemas["EditMode"]["enum"].as_array().unwrap() {
        let model = if m == "instruct_pix2pix" {
            "tiny-ip2p"
        } else {
            "tiny-sd15"
        };
        let r = post_json(
            &server,
            "/edit",
            &json!({"image": b64(&png), "prompt": "x", "steps": 2, "mode": m, "model": model}),
        );
        assert_eq!(
            r.status,
            200,
            "documented mode {m} refused: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

#[test]
fn generate_json_png_metadata_and_determinism() {
    let server = start(tiny_config());
    let body = json!({"prompt": "a red circle", "negative_prompt": "blue", "steps": 4, "seed": 7, "width": 64, "height": 64});
    let a = post_json(&server, "/generate", &body);
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let v = a.json();
    assert_eq!(v["model"], "tiny-sd15");
    assert_eq!(v["images"][0]["seed"], 7);
    assert_eq!(v["parameters"]["steps"], 4);
    assert_eq!(v["parameters"]["scheduler"], "ddim");
    assert_eq!(v["parameters"]["mode"], "txt2img");
    assert!(v["timings"]["total_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        v["id"].as_str(),
        a.header("x-request-id"),
        "the body id is the request id"
    );
    let png_a = &pngs(&a)[0];
    assert_eq!(png_size(png_a), (64, 64));
    let text = read_png_parameters(png_a).expect("parameters chunk");
    assert_eq!(
        text.lines().collect::<Vec<_>>()[..2],
        ["a red circle", "Negative prompt: blue"],
        "A1111 layout: prompt, negative prompt, then settings"
    );
    assert!(
        text.contains(
            "Steps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: tiny-sd15"
        ),
        "{text}"
    );

    // Same seed, same bytes; another seed, other bytes.
    let b = post_json(&server, "/generate", &body);
    assert!(
        &pngs(&b)[0] == png_a,
        "same seed twice must give identical bytes"
    );
    let mut other = body.clone();
    other["seed"] = json!(8);
    assert!(
        &pngs(&post_json(&server, "/generate", &other))[0] != png_a,
        "another seed, another image"
    );

    // num_images: image i has seed + i and equals a request for that seed alone.
    let mut three = body.clone();
    three["num_images"] = json!(3);
    let r = post_json(&server, "/generate", &three);
    let imgs = pngs(&r);
    assert_eq!(imgs.len(), 3);
    assert_eq!(r.json()["images"][2]["seed"], 9);
    assert!(
        &imgs[0] == png_a,
        "image 0 of three equals the single image"
    );
    let mut nine = body.clone();
    nine["seed"] = json!(9);
    assert!(
        pngs(&post_json(&server, "/generate", &nine))[0] == imgs[2],
        "image 2 of three (seed 9) equals seed 9 alone"
    );

    // Accept: image/png returns the PNG itself, identical to the JSON one.
    let raw = post_raw(
        &server,
        "/generate",
        &[
            ("content-type", "application/json"),
            ("accept", "image/png"),
            ("x-request-id", "my-id-1"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-type"), Some("image/png"));
    assert_eq!(raw.header("x-seed"), Some("7"));
    assert_eq!(
        raw.header("x-request-id"),
        Some("my-id-1"),
        "a client's request id is kept"
    );
    assert!(&raw.body == png_a, "the PNG body is the JSON one");
    // An id that could forge log fields or flood the log is replaced, not echoed.
    let long = "x".repeat(200);
    for bad in ["a b", "a\"b=c", long.as_str()] {
        let r = post_raw(
            &server,
            "/generate",
            &[("content-type", "application/json"), ("x-request-id", bad)],
            body.to_string().as_bytes(),
        );
        let id = r.header("x-request-id").unwrap_or_default().to_string();
        assert!(id != bad && uuid::Uuid::parse_str(&id).is_ok(), "{bad:?} -> {id:?}");
    }

    // SDXL and another scheduler through the same endpoint.
    let xl = post_json(
        &server,
        "/generate",
        &json!({"prompt": "x", "model": "tiny-sdxl", "steps": 3, "seed": 1, "scheduler": "euler_a", "width": 72, "height": 64}),
    );
    assert_eq!(png_size(&pngs(&xl)[0]), (72, 64));
    let text = read_png_parameters(&pngs(&xl)[0]).unwrap();
    assert!(
        text.contains("Sampler: Euler a") && text.contains("Model: tiny-sdxl"),
        "{text}"
    );
}

#[test]
fn edit_json_and_multipart() {
    let server = start(tiny_config());
    let input = test_png(80, 72);
    // instruct_pix2pix is the default mode of an InstructPix2Pix model.
    let body = json!({"image": b64(&input), "prompt": "make it blue", "model": "tiny-ip2p", "steps": 3, "seed": 3});
    let j = post_json(&server, "/edit", &body);
    let v = j.json();
    assert_eq!(v["parameters"]["mode"], "instruct_pix2pix", "{v}");
    assert_eq!(v["parameters"]["image_guidance_scale"], 1.5);
    assert_eq!(v["parameters"]["resized"], false);
    let json_png = &pngs(&j)[0];
    assert_eq!(
        png_size(json_png),
        (80, 72),
        "the output keeps the input's size"
    );
    assert!(read_png_parameters(json_png)
        .unwrap()
        .contains("Image CFG scale: 1.5"));

    let (ct, form) = multipart(
        &[
            ("prompt", "make it blue"),
            ("model", "tiny-ip2p"),
            ("steps", "3"),
            ("seed", "3"),
        ],
        &input,
    );
    let m = post_raw(&server, "/edit", &[("content-type", &ct)], &form);
    assert!(
        &pngs(&m)[0] == json_png,
        "JSON and multipart bodies are the same request"
    );

    // img2img on the SD model; a 70x70 input rounds down to 64x64.
    let odd = test_png(70, 70);
    let (ct, form) = multipart(
        &[
            ("prompt", "a circle"),
            ("mode", "img2img"),
            ("strength", "0.5"),
            ("steps", "4"),
            ("seed", "1"),
        ],
        &odd,
    );
    let r = post_raw(&server, "/edit", &[("content-type", &ct)], &form);
    let v = r.json();
    assert_eq!(v["parameters"]["width"], 64, "{v}");
    assert_eq!(v["parameters"]["input_width"], 70);
    assert_eq!(v["parameters"]["resized"], true);
    assert_eq!(v["parameters"]["strength"], 0.5);
    assert_eq!(png_size(&pngs(&r)[0]), (64, 64));
    let again = post_raw(&server, "/edit", &[("content-type", &ct)], &form);
    assert!(
        pngs(&again) == pngs(&r),
        "img2img is deterministic per seed too"
    );

    // Accept: image/png works for edits.
    let raw = post_raw(
        &server,
        "/edit",
        &[("content-type", &ct), ("accept", "image/png")],
        &form,
    );
    assert_eq!(raw.header("content-type"), Some("image/png"));
    assert!(raw.body == pngs(&r)[0], "PNG body equals the JSON image");
}

/// A flat image compresses to almost nothing whatever its size.
fn black_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::GrayImage::new(w, h)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// Every error a client can cause, with its status and code.
#[test]
fn error_codes() {
    let mut config = tiny_config();
    config.limits.max_body_bytes = 64 * 1024;
    config.limits.max_image_pixels = 256 * 256;
    let server = start(config);
    let gen = |body: serde_json::Value| post_json(&server, "/generate", &body);
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (json!({"prompt": "x", "width": 65}), 422, "invalid_size"),
        (json!({"prompt": "x", "height": 56}), 422, "invalid_size"),
        (json!({"prompt": "x", "width": 4096}), 422, "invalid_size"),
        (json!({"prompt": "x", "width": -8}), 422, "invalid_size"),
        (json!({"prompt": "x", "steps": 0}), 422, "invalid_steps"),
        (json!({"prompt": "x", "steps": 151}), 422, "invalid_steps"),
        (
            json!({"prompt": "x", "guidance_scale": 31.0}),
            422,
            "invalid_guidance_scale",
        ),
        (
            json!({"prompt": "x", "guidance_scale": -1.0}),
            422,
            "invalid_guidance_scale",
        ),
        (
            json!({"prompt": "x", "num_images": 9}),
            422,
            "too_many_images",
        ),
        (
            json!({"prompt": "x", "num_images": 0}),
            422,
            "invalid_request",
        ),
        (
            json!({"prompt": "x", "scheduler": "k_lms_turbo"}),
            422,
            "unknown_scheduler",
        ),
        (
            json!({"prompt": "x", "model": "tiny-ip2p"}),
            422,
            "unsupported_mode",
        ),
        (
            json!({"prompt": "x", "model": "nope"}),
            404,
            "model_not_found",
        ),
        (
            json!({"prompt": "x", "adapter": "nope"}),
            404,
            "adapter_not_found",
        ),
        (
            json!({"prompt": "x", "adapter": "../../etc"}),
            404,
            "adapter_not_found",
        ),
        (
            json!({"prompt": "x", "cfg_scale": 7}),
            422,
            "invalid_request",
        ),
        (json!({"steps": 4}), 422, "invalid_request"),
        (
            json!({"prompt": "x", "steps": "four"}),
            422,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let r = gen(body.clone());
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(r.json()["error"]["message"].as_str().unwrap().len() > 5);
    }

    let r = post_raw(
        &server,
        "/generate",
        &[("content-type", "application/json")],
        b"{\"prompt\": ",
    );
    assert_eq!((r.status, r.code().as_str()), (400, "malformed_json"));
    let r = post_raw(
        &server,
        "/generate",
        &[("content-type", "text/plain")],
        b"{\"prompt\": \"x\"}",
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );
    // On loopback, only loopback Host names are served (DNS rebinding).
    for (host, want) in [("evil.example:80", "HTTP/1.1 403"), ("localhost:1", "HTTP/1.1 200"), ("[::1]", "HTTP/1.1 200")] {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
        write!(sock, "GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
        let mut reply = String::new();
        let _ = sock.read_to_string(&mut reply);
        assert!(reply.starts_with(want), "{host}: {reply}");
        if want.ends_with("403") {
            assert!(reply.contains("host_not_allowed"), "{reply}");
        }
    }
    // A bad query string is a JSON error like any other bad input.
    let r = get(&server, "/finetune?status=bogus");
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"), "{}", String::from_utf8_lossy(&r.body));
    // A huge declared length is refused from the headers alone: no body is ever sent here.
    {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        write!(
            sock,
            "POST /generate HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n",
            server.addr
        )
        .unwrap();
        let mut reply = String::new();
        let _ = sock.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        assert!(reply.contains("payload_too_large"), "{reply}");
    }
    let big = json!({"prompt": "x".repeat(100 * 1024)}).to_string();
    let (status, body) =
        post_expect_continue(&server, "/generate", "application/json", big.as_bytes());
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    let (status, _) = post_expect_continue(
        &server,
        "/generate",
        "application/json",
        b"{\"prompt\": \"small enough\", \"steps\": 1}",
    );
    assert_eq!(
        status, 200,
        "a body under the limit is read after 100 Continue"
    );
    let r = post_raw(
        &server,
        "/generate",
        &[
            ("content-type", "application/json"),
            ("accept", "image/png"),
        ],
        json!({"prompt": "x", "steps": 2, "num_images": 2})
            .to_string()
            .as_bytes(),
    );
    assert_eq!((r.status, r.code().as_str()), (406, "not_acceptable"));
    assert_eq!(get(&server, "/nope").code(), "not_found");
    let r = get(&server, "/generate");
    assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));

    // /edit
    let png = test_png(64, 64);
    let edit = |extra: serde_json::Value| {
        let mut body = json!({"image": b64(&png), "prompt": "x", "steps": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        post_json(&server, "/edit", &body)
    };
    let cases: Vec<(serde_json::Value, u16, &str)> = vec![
        (json!({"mode": "instruct_pix2pix"}), 422, "unsupported_mode"),
        (
            json!({"mode": "img2img", "model": "tiny-sdxl"}),
            422,
            "unsupported_mode",
        ),
        (json!({"mode": "txt2img"}), 422, "unknown_mode"),
        (
            json!({"mode": "img2img", "strength": 0.0}),
            422,
            "invalid_strength",
        ),
        (
            json!({"mode": "img2img", "strength": 1.5}),
            422,
            "invalid_strength",
        ),
        (
            json!({"mode": "img2img", "strength": 0.1}),
            422,
            "invalid_strength",
        ),
        (
            json!({"model": "tiny-ip2p", "image_guidance_scale": 40.0}),
            422,
            "invalid_image_guidance_scale",
        ),
        (json!({"image": "not base64 !!"}), 422, "invalid_image"),
        (
            json!({"image": b64(b"definitely not an image")}),
            422,
            "invalid_image",
        ),
        (json!({"image": b64(&png[..60])}), 422, "invalid_image"),
        (
            json!({"image": b64(&black_png(300, 300))}),
            422,
            "image_too_large",
        ),
        (
            json!({"image": b64(&test_png(40, 40))}),
            422,
            "invalid_size",
        ),
        (json!({"width": 60}), 422, "invalid_size"),
        (json!({"model": "nope"}), 404, "model_not_found"),
    ];
    for (extra, status, code) in cases {
        let r = edit(extra.clone());
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{extra}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // A tiny file that claims a huge image is refused from its header, before decoding.
    let huge = black_png(2000, 2000);
    assert!(
        huge.len() < 40 * 1024,
        "compressed it is small: {}",
        huge.len()
    );
    assert_eq!(edit(json!({"image": b64(&huge)})).code(), "image_too_large");

    let (ct, form) = multipart(&[("prompt", "x"), ("steps", "many")], &png);
    let r = post_raw(&server, "/edit", &[("content-type", &ct)], &form);
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"));
    let (ct, form) = multipart(&[("prompt", "x"), ("colour", "red")], &png);
    assert_eq!(
        post_raw(&server, "/edit", &[("content-type", &ct)], &form).code(),
        "invalid_request"
    );
    let r = post_raw(
        &server,
        "/edit",
        &[("content-type", "multipart/form-data; boundary=zzz")],
        b"--zzz\r\nbroken",
    );
    assert_eq!((r.status, r.code().as_str()), (400, "malformed_multipart"));
    let (ct, form) = multipart(&[("prompt", "x")], &vec![0u8; 100 * 1024]);
    let (status, body) = post_expect_continue(&server, "/edit", &ct, &form);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    let r = post_raw(
        &server,
        "/edit",
        &[("content-type", "text/plain")],
        b"hello",
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (415, "unsupported_media_type")
    );

    // After all of that, nothing failed on the server's side.
    for m in ["tiny-sd15", "tiny-ip2p", "tiny-sdxl"] {
        assert_eq!(health_of(&server, m)["failed_batches"], 0);
    }
}

/// Writes a random LoRA adapter over `count` of the UNet's linears at data_dir/adapters/name.
fn write_adapter(
    data_dir: &std::path::Path,
    name: &str,
    model_dir: &std::path::Path,
    count: usize,
    rename: bool,
) {
    let model = DiffusionModel::load(model_dir, &LoadOptions::default()).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut modules = BTreeMap::new();
    let mut targets = Vec::new();
    for (module, _, in_dim, out_dim) in model.unet.linears().all().into_iter().take(count) {
        let module = if rename {
            format!("{module}_missing")
        } else {
            module
        };
        let (down_key, up_key) = LoraAdapter::diffusers_keys(&module);
        let down = candle_core::Tensor::randn(0f32, 0.5, (2, in_dim), &dev).unwrap();
        let up = candle_core::Tensor::randn(0f32, 0.5, (out_dim, 2), &dev).unwrap();
        targets.push(module.clone());
        modules.insert(
            module,
            LoraModule {
                down,
                up,
                alpha: 2.0,
                down_key,
                up_key,
            },
        );
    }
    let adapter = LoraAdapter {
        modules,
        use_rslora: false,
        peft_config: LoraAdapter::peft_config_for(2, 2.0, &targets),
        ..Default::default()
    };
    let dir = data_dir.join("adapters").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    adapter.save(&dir.join("adapter.safetensors")).unwrap();
}

#[test]
fn adapters() {
    let config = tiny_config();
    let data = config.server.data_dir.clone();
    let sd15 = models_dir().join("tiny-sd15");
    write_adapter(&data, "shapes-lora", &sd15, 1000, false);
    write_adapter(&data, "wrong-model", &sd15, 3, true);
    let server = start(config);
    let base = json!({"prompt": "a circle", "steps": 4, "seed": 11});
    let plain = pngs(&post_json(&server, "/generate", &base))[0].clone();
    let with = |scale: f64| {
        let mut b = base.clone();
        b["adapter"] = json!("shapes-lora");
        b["adapter_scale"] = json!(scale);
        post_json(&server, "/generate", &b)
    };
    let r = with(1.0);
    let lora_png = pngs(&r)[0].clone();
    assert!(
        pixels(&lora_png) != pixels(&plain),
        "the adapter changes the image"
    );
    assert_eq!(r.json()["parameters"]["adapter"], "shapes-lora");
    let text = read_png_parameters(&lora_png).unwrap();
    assert!(
        text.starts_with("a circle <lora:shapes-lora:1>") && text.contains("Lora: shapes-lora"),
        "{text}"
    );
    assert!(
        pixels(&pngs(&with(0.0))[0]) == pixels(&plain),
        "scale 0 is the base model"
    );
    assert!(
        pngs(&with(1.0))[0] == lora_png,
        "re-attaching gives the same bytes"
    );
    assert!(
        pngs(&post_json(&server, "/generate", &base))[0] == plain,
        "the adapter is detached again"
    );
    assert_eq!(with(5.0).code(), "invalid_adapter_scale");
    let mut wrong = base.clone();
    wrong["adapter"] = json!("wrong-model");
    let r = post_json(&server, "/generate", &wrong);
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "invalid_adapter"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(
        pngs(&post_json(&server, "/generate", &base))[0] == plain,
        "a failed attach leaves the base model"
    );
}

/// A step count inside the configured limit that the model's schedule cannot produce (DDIM with
/// "leading" spacing and steps_offset 1 runs past timestep 999 at 1000 steps) is the client's
/// choice: 422, never a 500 from inside the worker.
#[test]
fn steps_the_schedule_cannot_make_are_refused_up_front() {
    let mut config = tiny_config();
    config.models.serve.truncate(1);
    config.limits.max_steps = 1000;
    let server = start(config);
    let r = post_json(
        &server,
        "/generate",
        &json!({"prompt": "x", "steps": 1000, "scheduler": "ddim"}),
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (422, "invalid_steps"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        health_of(&server, "tiny-sd15")["batches"],
        0,
        "refused before reaching the worker"
    );
}

/// Raw HTTP/1.1 exchange (for methods and headers the test client does not send).
fn raw_http(server: &dspo_server::api::running::RunningServer, head: &str) -> String {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(server.addr).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    write!(sock, "{head}Host: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = sock.read_to_string(&mut reply);
    reply.to_ascii_lowercase()
}

#[test]
fn cors_only_for_configured_origins() {
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /generate HTTP/1.1\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n"
        )
    };
    let mut config = tiny_config();
    config.server.cors_origins = vec!["https://app.example".into()];
    let server = start(config);
    let ok = raw_http(&server, &preflight("https://app.example"));
    assert!(ok.starts_with("http/1.1 200"), "{ok}");
    assert!(ok.contains("access-control-allow-origin: https://app.example"), "{ok}");
    assert!(ok.contains("access-control-allow-methods"), "{ok}");
    let other = raw_http(&server, &preflight("https://evil.example"));
    assert!(!other.contains("access-control-allow-origin"), "{other}");
    // A simple request from the allowed origin carries the header too.
    let get = raw_http(&server, "GET /health HTTP/1.1\r\nOrigin: https://app.example\r\n");
    assert!(get.contains("access-control-allow-origin: https://app.example"), "{get}");
    drop(server);
    // By default no origin is allowed.
    let server = start(tiny_config());
    let none = raw_http(&server, &preflight("https://app.example"));
    assert!(!none.contains("access-control-allow-origin"), "{none}");
    // A malformed origin is a configuration error.
    let mut config = tiny_config();
    config.server.cors_origins = vec!["app.example/".into()];
    assert!(config.check().unwrap_err().to_string().contains("not an origin"));
}

#[test]
fn contract_details_wrong_types_ignored_parameters_and_ended_jobs() {
    let mut config = tiny_config();
    config.models.serve.truncate(2);
    let server = start(config);
    // A wrong JSON type for an enum field is a 422 like an unknown name, not a 400.
    let r = post_json(&server, "/finetune", &json!({"dataset_url": "https://example.com/p.parquet", "method": 1}));
    assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"), "{:?}", r.json());
    // Parameters the mode ignores are named in the warnings.
    let r = post_json(&server, "/generate", &json!({"prompt": "x", "model": "tiny-sd15", "steps": 2, "adapter_scale": 0.5}));
    assert_eq!(r.status, 200);
    assert!(r.json()["warnings"][0].as_str().unwrap().contains("adapter_scale was ignored"), "{:?}", r.json()["warnings"]);
    let input = test_png(64, 64);
    let r = post_json(&server, "/edit", &json!({"image": b64(&input), "prompt": "x", "model": "tiny-ip2p", "steps": 2, "strength": 0.5}));
    assert_eq!(r.status, 200);
    assert!(r.json()["warnings"][0].as_str().unwrap().contains("strength was ignored"), "{:?}", r.json()["warnings"]);
    let r = post_json(&server, "/edit", &json!({"image": b64(&input), "prompt": "x", "model": "tiny-sd15", "mode": "img2img", "steps": 4, "image_guidance_scale": 2.0}));
    assert_eq!(r.status, 200);
    assert!(r.json()["warnings"][0].as_str().unwrap().contains("image_guidance_scale was ignored"), "{:?}", r.json()["warnings"]);
    let r = post_json(&server, "/generate", &json!({"prompt": "x", "model": "tiny-sd15", "steps": 2}));
    assert_eq!(r.json()["warnings"], json!([]));
    // Far from the native size: said, not refused.
    let native = get(&server, "/models").json()["models"][0]["native_size"].as_u64().unwrap_or(64);
    let big = native * 4;
    let r = post_json(&server, "/generate", &json!({"prompt": "x", "model": "tiny-sd15", "steps": 2, "width": big, "height": big}));
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert!(r.json()["warnings"][0].as_str().unwrap().contains("native"), "{:?}", r.json()["warnings"]);
}

#[test]
fn an_idle_kept_alive_connection_is_closed_after_the_header_timeout() {
    use std::io::{Read, Write};
    let mut config = tiny_config();
    config.models.serve.truncate(1);
    config.server.header_timeout_secs = 1;
    let server = start(config);
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let request = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n";
    s.write_all(request).unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Idle past the timeout: the server closes its end (a read sees end of stream).
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let _ = s.write_all(request);
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the idle connection was still served: {}", String::from_utf8_lossy(&buf[..n]));
}

#[test]
fn a_job_without_a_method_takes_the_models_default() {
    let mut config = tiny_config();
    config.models.serve.truncate(1);
    config.finetune.method = "diffusion_dpo".into();
    let server = start(config);
    let r = post_json(&server, "/finetune", &json!({"dataset_url": "https://127.0.0.1:9/p.parquet"}));
    assert_eq!(r.status, 202, "{:?}", r.json());
    assert_eq!(r.json()["job"]["spec"]["method"], "diffusion_dpo");
}
