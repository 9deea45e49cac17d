//! Image bytes in and out: decoding uploads under a decoded-pixel limit, resizing to the
//! output size, and PNG encoding with AUTOMATIC1111's `parameters` text chunk.

use super::error::ApiError;
use super::types::Parameters;
use base64::Engine;
use image::{ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;

/// Base64 as clients send it: optionally a `data:` URL, possibly wrapped over lines.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    let payload = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, p)| p).unwrap_or(""),
        None => s,
    };
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .or_else(|_| {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(compact.trim_end_matches('='))
        })
        .map_err(|e| ApiError::InvalidImage(format!("image is not valid base64: {e}")))
}

/// Decodes PNG, JPEG or WebP to RGB (alpha is dropped, as PIL's convert("RGB") does). The size
/// is read from the header first: an image over `max_pixels` is refused before any pixel is
/// decoded, so a small file cannot expand into gigabytes.
pub fn decode_image(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::InvalidImage("image is empty".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::InvalidImage(format!("image could not be read: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Some(f) => {
            return Err(ApiError::InvalidImage(format!(
                "image format {f:?} is not accepted (PNG, JPEG or WebP)"
            )))
        }
        None => {
            return Err(ApiError::InvalidImage(
                "image is not a PNG, JPEG or WebP file".into(),
            ))
        }
    };
    // The JPEG decoder fills a cut-off scan with grey instead of failing; a file without an
    // end-of-image marker is an upload that did not finish (PIL refuses it too).
    if format == ImageFormat::Jpeg && !bytes.windows(2).any(|w| w == [0xFF, 0xD9]) {
        return Err(ApiError::InvalidImage(
            "the JPEG is truncated (it has no end-of-image marker)".into(),
        ));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| ApiError::InvalidImage(format!("image header could not be decoded: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(ApiError::ImageTooLarge(format!(
            "image is {w}x{h} = {pixels} pixels; at most {max_pixels} decoded pixels are accepted"
        )));
    }
    if pixels == 0 {
        return Err(ApiError::InvalidImage(format!("image is {w}x{h}")));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The header could lie about what follows; the decoder enforces the same bounds.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(pixels.saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(l) => {
            ApiError::ImageTooLarge(format!("image exceeds the decoding limits: {l}"))
        }
        e => ApiError::InvalidImage(format!("image could not be decoded: {e}")),
    })?;
    Ok(img.to_rgb8())
}

/// The size an edit's output takes by default: the input's, each side rounded down to a
/// multiple of 8 (as diffusers' image processor does for the VAE).
pub fn rounded_size(img: &RgbImage) -> (u32, u32) {
    (img.width() / 8 * 8, img.height() / 8 * 8)
}

pub fn resize(img: RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        img
    } else {
        image::imageops::resize(&img, width, height, image::imageops::FilterType::Lanczos3)
    }
}

/// AUTOMATIC1111's quoting of infotext values: JSON-quoted when they contain a separator.
fn quote(v: &str) -> String {
    if v.contains([',', '\n', ':']) {
        serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
    } else {
        v.to_string()
    }
}

/// The `parameters` text AUTOMATIC1111 writes (its "infotext"): the prompt, an optional
/// `Negative prompt:` line, and one line of `Key: value` pairs. LoRA adapters appear the way
/// A1111 users write them, as `<lora:name:scale>` in the prompt.
pub fn a1111_parameters(p: &Parameters, seed: u64, sampler: &str) -> String {
    let mut prompt = p.prompt.clone();
    if let (Some(name), Some(scale)) = (&p.adapter, p.adapter_scale) {
        prompt.push_str(&format!(" <lora:{name}:{scale}>"));
    }
    let mut out = prompt;
    if let Some(neg) = p.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        out.push_str("\nNegative prompt: ");
        out.push_str(neg);
    }
    let mut fields = vec![
        ("Steps", p.steps.to_string()),
        ("Sampler", sampler.to_string()),
        ("CFG scale", p.guidance_scale.to_string()),
        ("Seed", seed.to_string()),
        ("Size", format!("{}x{}", p.width, p.height)),
        ("Model", quote(&p.model)),
    ];
    if let Some(s) = p.strength {
        fields.push(("Denoising strength", s.to_string()));
    }
    if let Some(s) = p.image_guidance_scale {
        fields.push(("Image CFG scale", s.to_string()));
    }
    if let Some(name) = &p.adapter {
        fields.push(("Lora", quote(name)));
    }
    fields.push((
        "Version",
        format!("dspo-server {}", env!("CARGO_PKG_VERSION")),
    ));
    let line: Vec<String> = fields
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    out.push('\n');
    out.push_str(&line.join(", "));
    out
}

/// An 8-bit RGB PNG with the text in a `parameters` chunk: tEXt when it is Latin-1 (what
/// A1111 and PIL write), iTXt (UTF-8) otherwise, as PIL's PngInfo.add_text does.
pub fn encode_png(img: &RgbImage, parameters: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let latin1 = parameters.chars().all(|c| (c as u32) < 256);
        let added = if latin1 {
            enc.add_text_chunk("parameters".to_string(), parameters.to_string())
        } else {
            enc.add_itxt_chunk("parameters".to_string(), parameters.to_string())
        };
        added.map_err(|e| e.to_string())?;
        let mut writer = enc.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(img.as_raw())
            .map_err(|e| e.to_string())?;
        writer.finish().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Reads the `parameters` chunk back (tEXt, zTXt or iTXt); used by tests and clients of the
/// library.
pub fn read_png_parameters(bytes: &[u8]) -> Option<String> {
    let decoder = png::Decoder::new(Cursor::new(bytes));
    let reader = decoder.read_info().ok()?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return Some(t.text.clone());
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return t.get_text().ok();
    }
    info.utf8_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .and_then(|t| t.get_text().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Parameters {
        Parameters {
            mode: "txt2img".into(),
            prompt: "a red circle".into(),
            negative_prompt: Some("blurry".into()),
            model: "tiny, v2".into(),
            adapter: Some("centred".into()),
            adapter_scale: Some(0.8),
            width: 64,
            height: 72,
            steps: 8,
            guidance_scale: 7.0,
            scheduler: "euler_a".into(),
            seed: 5,
            num_images: 1,
            strength: None,
            image_guidance_scale: None,
            input_width: None,
            input_height: None,
            resized: None,
        }
    }

    #[test]
    fn infotext_matches_a1111_layout() {
        let t = a1111_parameters(&params(), 6, "Euler a");
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "a red circle <lora:centred:0.8>");
        assert_eq!(lines[1], "Negative prompt: blurry");
        assert!(
            lines[2].starts_with("Steps: 8, Sampler: Euler a, CFG scale: 7, Seed: 6, Size: 64x72, Model: \"tiny, v2\", Lora: centred, Version: dspo-server "),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn png_round_trips_pixels_and_text() {
        let img = RgbImage::from_fn(16, 8, |x, y| image::Rgb([x as u8 * 10, y as u8 * 20, 7]));
        for text in ["latin-1 only: café", "unicode: 猫"] {
            let bytes = encode_png(&img, text).unwrap();
            assert_eq!(read_png_parameters(&bytes).as_deref(), Some(text));
            let back = decode_image(&bytes, 1 << 20).unwrap();
            assert_eq!(back, img);
        }
    }

    #[test]
    fn decoding_limits() {
        let img = RgbImage::new(100, 100);
        let bytes = encode_png(&img, "x").unwrap();
        assert!(matches!(
            decode_image(&bytes, 9_999),
            Err(ApiError::ImageTooLarge(_))
        ));
        assert!(decode_image(&bytes, 10_000).is_ok());
        assert!(matches!(
            decode_image(b"GIF89a....", 1 << 20),
            Err(ApiError::InvalidImage(_))
        ));
        assert!(matches!(
            decode_image(&bytes[..40], 1 << 20),
            Err(ApiError::InvalidImage(_))
        ));
        assert!(matches!(
            decode_base64("!!!"),
            Err(ApiError::InvalidImage(_))
        ));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert_eq!(
            decode_base64(&format!("data:image/png;base64,{b64}")).unwrap(),
            bytes
        );
    }
}
