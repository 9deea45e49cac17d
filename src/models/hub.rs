//! Downloading a diffusers pipeline from the Hugging Face hub (users with network access).
//! Files land in the standard hub cache (`HF_HOME`), so diffusers and we share downloads.

use super::{ModelError, Result};
use std::path::PathBuf;

/// Components of a diffusers pipeline and the files each needs.
#[cfg(feature = "hub")]
const COMPONENT_FILES: &[(&str, &[&str])] = &[
    (
        "unet",
        &["config.json", "diffusion_pytorch_model.safetensors"],
    ),
    (
        "vae",
        &["config.json", "diffusion_pytorch_model.safetensors"],
    ),
    ("text_encoder", &["config.json", "model.safetensors"]),
    ("text_encoder_2", &["config.json", "model.safetensors"]),
    (
        "tokenizer",
        &[
            "tokenizer.json",
            "special_tokens_map.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
        ],
    ),
    (
        "tokenizer_2",
        &[
            "tokenizer.json",
            "special_tokens_map.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
        ],
    ),
    ("scheduler", &["scheduler_config.json"]),
];

/// A pipeline repository's files (weights included) in the local hub cache.
pub fn download_pipeline(
    repo: &str,
    revision: Option<&str>,
    variant: Option<&str>,
) -> Result<PathBuf> {
    download(repo, revision, variant, true)
}

/// Only a pipeline repository's configuration and tokenizer files, for a single-file
/// checkpoint that brings its own weights.
pub fn download_configs(repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    download(repo, revision, None, false)
}

#[cfg(feature = "hub")]
fn download(
    repo: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    weights: bool,
) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Hub(e.to_string()))?;
    let repo = match revision {
        Some(r) => api.repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            r.to_string(),
        )),
        None => api.repo(Repo::new(repo.to_string(), RepoType::Model)),
    };
    let index = repo
        .get("model_index.json")
        .map_err(|e| ModelError::Hub(format!("model_index.json: {e}")))?;
    let root = index
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| ModelError::Hub("bad cache path".into()))?;
    let index_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&index)
            .map_err(|e| ModelError::Io(index.clone(), e.to_string()))?,
    )
    .map_err(|e| ModelError::Corrupt(index.display().to_string(), e.to_string()))?;
    for (component, files) in COMPONENT_FILES {
        if index_json
            .get(*component)
            .map(|v| v.is_array() && !v[0].is_null())
            != Some(true)
        {
            continue;
        }
        for file in *files {
            if !weights && file.ends_with(".safetensors") {
                continue;
            }
            let mut names = vec![];
            if let (Some(v), Some(stem)) = (variant, file.strip_suffix(".safetensors")) {
                names.push(format!("{component}/{stem}.{v}.safetensors"));
            }
            names.push(format!("{component}/{file}"));
            let mut got = false;
            for name in &names {
                if repo.get(name).is_ok() {
                    got = true;
                    break;
                }
            }
            // The slow-tokenizer files are optional when tokenizer.json exists, and vice versa.
            let optional = component.starts_with("tokenizer") && *file != "tokenizer.json";
            if !got && !optional {
                return Err(ModelError::Hub(format!(
                    "{} not found in the repository",
                    names.join(" or ")
                )));
            }
        }
    }
    Ok(root)
}

#[cfg(not(feature = "hub"))]
fn download(
    repo: &str,
    _revision: Option<&str>,
    _variant: Option<&str>,
    _weights: bool,
) -> Result<PathBuf> {
    Err(ModelError::Hub(format!(
        "{repo}: this build has no hub support (build with --features hub)"
    )))
}

/// Named files of a model repository (a CLIP reward model, say) in the local hub cache; the
/// directory holding them. Files other than `config.json` and weights may be missing.
#[cfg(feature = "hub")]
pub fn download_files(repo: &str, files: &[&str]) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Hub(e.to_string()))?;
    let repo_api = api.model(repo.to_string());
    let mut root = None;
    for file in files {
        match repo_api.get(file) {
            Ok(p) => root = root.or_else(|| p.parent().map(PathBuf::from)),
            Err(e) if *file == "config.json" || file.ends_with(".safetensors") => {
                return Err(ModelError::Hub(format!("{repo}: {file}: {e}")))
            }
            Err(_) => {}
        }
    }
    root.ok_or_else(|| ModelError::Hub(format!("{repo}: nothing downloaded")))
}

#[cfg(not(feature = "hub"))]
pub fn download_files(repo: &str, _files: &[&str]) -> Result<PathBuf> {
    Err(ModelError::Hub(format!(
        "{repo}: this build has no hub support (build with --features hub)"
    )))
}
