//! Image bytes in and out: decoding uploads under a decoded-pixel limit, resizing to the
//! output size, and encoding as PNG (AUTOMATIC1111's `parameters` text chunk), JPEG or WebP
//! (the same text as an EXIF UserComment, where A1111 puts it in those formats).

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

/// The file format of generated images (`output_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    /// Quality 1-100.
    Jpeg(u8),
    /// Lossless.
    Webp,
}

impl OutputFormat {
    pub const NAMES: [&'static str; 3] = ["png", "jpeg", "webp"];
    pub const DEFAULT_JPEG_QUALITY: u8 = 90;

    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg(_) => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg(_) => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }

    /// `name` as clients write it ("jpg" too); None for an unknown name.
    pub fn parse(name: &str, jpeg_quality: u8) -> Option<OutputFormat> {
        match name.to_ascii_lowercase().as_str() {
            "png" => Some(OutputFormat::Png),
            "jpeg" | "jpg" => Some(OutputFormat::Jpeg(jpeg_quality)),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }
}

impl OutputFormat {
    /// The format a request's validated parameters chose.
    pub fn of(p: &Parameters) -> OutputFormat {
        let quality = p
            .output_quality
            .map(|q| q.clamp(1, 100) as u8)
            .unwrap_or(Self::DEFAULT_JPEG_QUALITY);
        Self::parse(&p.output_format, quality).unwrap_or(OutputFormat::Png)
    }
}

/// Encodes `img` in `format` with the settings text embedded where readers of that format
/// look for it.
pub fn encode(img: &RgbImage, parameters: &str, format: OutputFormat) -> Result<Vec<u8>, String> {
    use image::ImageEncoder;
    let mut out = Vec::new();
    match format {
        OutputFormat::Png => return encode_png(img, parameters),
        OutputFormat::Jpeg(quality) => {
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
            enc.set_exif_metadata(exif_user_comment(parameters))
                .map_err(|e| e.to_string())?;
            enc.write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| e.to_string())?;
        }
        OutputFormat::Webp => {
            let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            enc.set_exif_metadata(exif_user_comment(parameters))
                .map_err(|e| e.to_string())?;
            enc.write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// A big-endian TIFF block (what JPEG's APP1 and WebP's EXIF chunk carry) holding one EXIF
/// UserComment: the character-code prefix `UNICODE\0` and UTF-16BE text, the encoding A1111
/// writes with piexif and reads back for its "PNG info" of JPEG and WebP files.
fn exif_user_comment(text: &str) -> Vec<u8> {
    const IFD0_AT: u32 = 8;
    // IFD0: a count, one 12-byte entry (the Exif IFD pointer) and a zero next-IFD offset.
    const EXIF_IFD_AT: u32 = IFD0_AT + 2 + 12 + 4;
    const COMMENT_AT: u32 = EXIF_IFD_AT + 2 + 12 + 4;
    let mut comment = b"UNICODE\0".to_vec();
    comment.extend(text.encode_utf16().flat_map(|u| u.to_be_bytes()));
    let mut t = Vec::with_capacity(COMMENT_AT as usize + comment.len());
    t.extend_from_slice(b"MM\0\x2a");
    t.extend_from_slice(&IFD0_AT.to_be_bytes());
    let entry = |t: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: u32| {
        t.extend_from_slice(&1u16.to_be_bytes());
        t.extend_from_slice(&tag.to_be_bytes());
        t.extend_from_slice(&kind.to_be_bytes());
        t.extend_from_slice(&count.to_be_bytes());
        t.extend_from_slice(&value.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
    };
    // ExifIFDPointer (LONG), then UserComment (UNDEFINED bytes stored at COMMENT_AT).
    entry(&mut t, 0x8769, 4, 1, EXIF_IFD_AT);
    entry(&mut t, 0x9286, 7, comment.len() as u32, COMMENT_AT);
    t.extend_from_slice(&comment);
    t
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
            output_format: "png".into(),
            output_quality: None,
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

    /// The EXIF block is a valid big-endian TIFF whose Exif IFD holds the UserComment; Pillow
    /// reads it in tests/output_formats.rs, this checks the layout byte by byte.
    #[test]
    fn exif_user_comment_layout() {
        let t = exif_user_comment("Steps: 2");
        let u16_at = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        assert_eq!(&t[..4], b"MM\0\x2a");
        let ifd0 = u32_at(4) as usize;
        assert_eq!((u16_at(ifd0), u16_at(ifd0 + 2)), (1, 0x8769));
        let exif = u32_at(ifd0 + 10) as usize;
        assert_eq!((u16_at(exif), u16_at(exif + 2), u16_at(exif + 4)), (1, 0x9286, 7));
        let (len, at) = (u32_at(exif + 6) as usize, u32_at(exif + 10) as usize);
        assert_eq!(&t[at..at + 8], b"UNICODE\0");
        assert_eq!(at + len, t.len());
        let units: Vec<u16> = t[at + 8..].chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        assert_eq!(String::from_utf16(&units).unwrap(), "Steps: 2");
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
