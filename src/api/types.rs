//! The JSON the API speaks, one request and one response type per endpoint. These are the raw
//! shapes; `validate` turns requests into typed tasks. Integers arrive as i64 so that an
//! out-of-range value gets its own error code instead of a generic deserialisation error.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Sampler names accepted in `scheduler` (schema only; the value is parsed by validation).
#[derive(ToSchema, Serialize)]
#[allow(dead_code)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    Ddim,
    Euler,
    EulerA,
    #[serde(rename = "dpmpp_2m")]
    DpmPp2M,
    #[serde(rename = "dpmpp_2m_karras")]
    DpmPp2MKarras,
    Pndm,
}

/// `mode` of `/edit` (schema only).
#[derive(ToSchema, Serialize)]
#[allow(dead_code)]
#[serde(rename_all = "snake_case")]
pub enum EditMode {
    /// Follow an instruction ("make it blue") with an InstructPix2Pix model.
    #[serde(rename = "instruct_pix2pix")]
    InstructPix2Pix,
    /// Re-noise the image to `strength` and denoise it towards the prompt.
    #[serde(rename = "img2img")]
    Img2Img,
}

/// `output_format` of generated images (schema only).
#[derive(ToSchema, Serialize)]
#[allow(dead_code)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// Lossless; the settings in a `parameters` text chunk.
    Png,
    /// Lossy at `output_quality`; the settings in EXIF UserComment.
    Jpeg,
    /// Lossless WebP; the settings in EXIF UserComment.
    Webp,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// What to draw.
    #[schema(example = "a red circle on a blue background")]
    pub prompt: String,
    /// What to steer away from. Left out: no negative prompt (SDXL: zero embeddings).
    pub negative_prompt: Option<String>,
    /// A served model's name (see GET /models). Left out: the default model.
    pub model: Option<String>,
    /// A LoRA adapter under the server's data dir (`adapters/<name>/adapter.safetensors`).
    pub adapter: Option<String>,
    /// Adapter strength in [-2, 2]; default from the server's configuration.
    pub adapter_scale: Option<f64>,
    /// Multiple of 8 within the server's size limits. Default: the model's native size.
    #[schema(example = 64)]
    pub width: Option<i64>,
    #[schema(example = 64)]
    pub height: Option<i64>,
    /// Denoising steps, 1 to the server's max_steps.
    #[schema(example = 8)]
    pub steps: Option<i64>,
    /// Classifier-free guidance scale, 0 to the server's max (<= 1 disables guidance).
    pub guidance_scale: Option<f64>,
    /// Default: the scheduler the checkpoint ships with.
    #[schema(value_type = Option<Scheduler>)]
    pub scheduler: Option<String>,
    /// Seed of the first image; image i uses seed + i. Left out: random.
    #[schema(example = 42)]
    pub seed: Option<u64>,
    /// Images to generate, 1 to the server's max_num_images.
    pub num_images: Option<i64>,
    /// File format of the images. Default png. With one image, `Accept: image/jpeg` (or
    /// image/webp, image/png) returns the file itself in that format.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// JPEG quality, 1 to 100 (default 90); ignored by the lossless formats.
    pub output_quality: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditRequest {
    /// The input image, base64 (PNG, JPEG or WebP; a `data:image/...;base64,` prefix is allowed).
    pub image: String,
    /// The instruction (instruct_pix2pix) or the target description (img2img).
    #[schema(example = "turn the circle green")]
    pub prompt: String,
    /// Left out: instruct_pix2pix on an InstructPix2Pix model, img2img otherwise.
    #[schema(value_type = Option<EditMode>)]
    pub mode: Option<String>,
    /// instruct_pix2pix: how closely to keep the input image (0 to the guidance maximum).
    pub image_guidance_scale: Option<f64>,
    /// img2img: how far the input is re-noised, in (0, 1].
    pub strength: Option<f64>,
    pub negative_prompt: Option<String>,
    pub model: Option<String>,
    pub adapter: Option<String>,
    pub adapter_scale: Option<f64>,
    /// Output size; left out, the input's size rounded down to a multiple of 8.
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    #[schema(value_type = Option<Scheduler>)]
    pub scheduler: Option<String>,
    pub seed: Option<u64>,
    pub num_images: Option<i64>,
    /// File format of the images. Default png. With one image, `Accept: image/jpeg` (or
    /// image/webp, image/png) returns the file itself in that format.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// JPEG quality, 1 to 100 (default 90); ignored by the lossless formats.
    pub output_quality: Option<i64>,
}

/// `/edit` as multipart/form-data: the same fields as the JSON body, as form fields, with the
/// image as a file part.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct EditForm {
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    pub prompt: String,
    #[schema(value_type = Option<EditMode>)]
    pub mode: Option<String>,
    pub image_guidance_scale: Option<f64>,
    pub strength: Option<f64>,
    pub negative_prompt: Option<String>,
    pub model: Option<String>,
    pub adapter: Option<String>,
    pub adapter_scale: Option<f64>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    #[schema(value_type = Option<Scheduler>)]
    pub scheduler: Option<String>,
    pub seed: Option<u64>,
    pub num_images: Option<i64>,
    /// File format of the images. Default png. With one image, `Accept: image/jpeg` (or
    /// image/webp, image/png) returns the file itself in that format.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// JPEG quality, 1 to 100 (default 90); ignored by the lossless formats.
    pub output_quality: Option<i64>,
}

/// A file download (an adapter's safetensors weights), declared as binary so generated
/// clients return its bytes.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct BinaryFile(Vec<u8>);

/// A PNG file (`Accept: image/png` with one image).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct PngFile(Vec<u8>);

/// An image file (`Accept: image/jpeg` or `image/webp` with one image).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct ImageFile(Vec<u8>);

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GeneratedImage {
    pub seed: u64,
    /// image/png, image/jpeg or image/webp.
    pub mime_type: String,
    /// The PNG, base64 (output_format png, the default); it carries a `parameters` text chunk
    /// in AUTOMATIC1111's format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub png_base64: Option<String>,
    /// The JPEG or WebP file, base64 (output_format jpeg or webp); the same settings text is in
    /// its EXIF UserComment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_base64: Option<String>,
}

/// Everything that decided the images, defaults filled in.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Parameters {
    /// txt2img, img2img or instruct_pix2pix.
    pub mode: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub model: String,
    pub adapter: Option<String>,
    pub adapter_scale: Option<f64>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: String,
    /// The first image's seed.
    pub seed: u64,
    pub num_images: u32,
    pub strength: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    /// /edit: the input image's size before it was resized to width x height.
    pub input_width: Option<u32>,
    pub input_height: Option<u32>,
    /// /edit: whether the input was resized (its sides are rounded down to multiples of 8).
    pub resized: Option<bool>,
    /// png, jpeg or webp.
    pub output_format: String,
    /// JPEG only.
    pub output_quality: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    /// Waiting in the model's queue.
    pub queue_ms: f64,
    /// The batch's denoising and decoding (shared by every request in the batch).
    pub inference_ms: f64,
    /// Image encoding.
    pub encode_ms: f64,
    /// From the request's arrival to the response.
    pub total_ms: f64,
    /// Images in the UNet batch this request ran in.
    pub batch_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    /// The request id (also the `x-request-id` header).
    pub id: String,
    pub model: String,
    pub images: Vec<GeneratedImage>,
    pub parameters: Parameters,
    pub timings: Timings,
    /// e.g. a prompt longer than CLIP's 77 tokens was truncated.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelDefaults {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    pub scheduler: String,
    /// instruct_pix2pix models only.
    pub image_guidance_scale: Option<f64>,
    /// Models that support img2img only.
    pub strength: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelEntry {
    pub name: String,
    /// Where the weights come from (directory or hub id).
    pub source: String,
    /// stable_diffusion, stable_diffusion_xl or instruct_pix2pix; null until loaded.
    pub architecture: Option<String>,
    /// The devices the model is served on, one replica each (`cpu`, `cuda:0`, ...).
    pub devices: Vec<String>,
    pub loaded: bool,
    /// Why the model could not be loaded, if it could not.
    pub error: Option<String>,
    /// The request was served by this model when it named none.
    pub default: bool,
    /// txt2img (POST /generate), img2img and instruct_pix2pix (POST /edit).
    pub modes: Vec<String>,
    pub schedulers: Vec<String>,
    pub defaults: Option<ModelDefaults>,
    /// What the model knows to draw, when its directory ships a `vocabulary` (the demo model
    /// lists its shapes, colours and backgrounds); null otherwise.
    #[schema(value_type = Option<Object>)]
    pub vocabulary: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelsResponse {
    pub models: Vec<ModelEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelHealth {
    pub name: String,
    /// The replica's device: a model served on several devices has an entry per replica.
    pub device: String,
    pub loaded: bool,
    /// Requests admitted and not yet computing.
    pub queue_depth: u32,
    pub requests_computed: u64,
    pub images_computed: u64,
    /// Requests dropped before compute because their client disconnected.
    pub dropped_disconnected: u64,
    /// Batches abandoned between steps because all their clients disconnected.
    pub cancelled_in_compute: u64,
    /// Requests refused with 429.
    pub rejected_queue_full: u64,
    pub batches: u64,
    pub failed_batches: u64,
    /// Batch size (images) -> number of batches of that size.
    pub batch_sizes: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// Always "ok" while the process serves requests.
    pub status: String,
    pub version: String,
    pub uptime_s: f64,
    pub models: Vec<ModelHealth>,
    /// This server's id among replicas sharing a job database (a running job's `replica`
    /// names the server running it); null when jobs are disabled.
    pub replica: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyResponse {
    /// True once every model is loaded and the data directory takes writes (200); false while
    /// a model is loading or failed, or storage is full or read-only (503).
    pub ready: bool,
    pub models: Vec<ModelReadiness>,
    /// With fine-tuning jobs enabled: null while the data directory takes writes, else why it
    /// does not (full, read-only); the server is then not ready.
    pub storage_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelReadiness {
    pub name: String,
    /// The replica's device: a model served on several devices has an entry per replica.
    pub device: String,
    /// loading, ready or failed
    pub status: String,
    pub error: Option<String>,
}
