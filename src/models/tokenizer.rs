//! CLIP tokenization as the pipelines do it: `<bos> + BPE (at most max_len - 2) + <eos>`,
//! padded to 77 with the tokenizer's pad token (49407 for CLIP-L, "!" = 0 for SDXL's
//! tokenizer_2).

use super::{ModelError, Result};
use std::path::Path;

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    eos_id: u32,
    max_len: usize,
}

/// The result of tokenizing one prompt.
pub struct Tokens {
    pub ids: Vec<u32>,
    /// BPE tokens dropped by truncation (diffusers logs a warning about them).
    pub truncated: usize,
}

fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        let inner = if file.exists() {
            tokenizers::Tokenizer::from_file(&file)
                .map_err(|e| ModelError::Corrupt(file.display().to_string(), e.to_string()))?
        } else if dir.join("vocab.json").exists() && dir.join("merges.txt").exists() {
            // Hub repos such as SD1.5 ship only the slow tokenizer's files.
            from_vocab_merges(dir)?
        } else {
            return Err(ModelError::MissingFile(file));
        };
        let mut pad: Option<String> = None;
        let mut max_len = 77usize;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if let Ok(text) = std::fs::read_to_string(&p) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| ModelError::Corrupt(p.display().to_string(), e.to_string()))?;
                if pad.is_none() {
                    pad = v.get("pad_token").and_then(token_content);
                }
                if let Some(m) = v.get("model_max_length").and_then(|m| m.as_u64()) {
                    if m <= 4096 {
                        max_len = m as usize;
                    }
                }
            }
        }
        let eos_id = inner
            .token_to_id("<|endoftext|>")
            .ok_or_else(|| ModelError::Config("tokenizer has no <|endoftext|> token".into()))?;
        let pad_id = match pad {
            Some(p) => inner.token_to_id(&p).ok_or_else(|| {
                ModelError::Config(format!(
                    "tokenizer pad token {p:?} is not in the vocabulary"
                ))
            })?,
            None => eos_id,
        };
        Ok(Self {
            inner,
            pad_id,
            eos_id,
            max_len,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(prompt, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        let mut truncated = 0;
        if ids.len() > self.max_len {
            truncated = ids.len() - self.max_len;
            ids.truncate(self.max_len - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_len, self.pad_id);
        Ok(Tokens { ids, truncated })
    }
}

/// Builds the fast CLIP tokenizer from `vocab.json` + `merges.txt`: the same normalizer,
/// pre-tokenizer, BPE settings and post-processor that transformers' CLIP converter writes
/// into `tokenizer.json`.
fn from_vocab_merges(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| ModelError::Io(p.to_path_buf(), e.to_string()))
    };
    let vocab: serde_json::Value = serde_json::from_str(&read(&vocab_path)?)
        .map_err(|e| ModelError::Corrupt(vocab_path.display().to_string(), e.to_string()))?;
    let merges: Vec<String> = read(&merges_path)?
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let id = |t: &str| vocab.get(t).and_then(|v| v.as_u64());
    let (bos, eos) = match (id("<|startoftext|>"), id("<|endoftext|>")) {
        (Some(b), Some(e)) => (b, e),
        _ => {
            return Err(ModelError::Config(format!(
                "{}: no <|startoftext|>/<|endoftext|> tokens",
                vocab_path.display()
            )))
        }
    };
    let spec = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": bos, "content": "<|startoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true},
            {"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": true, "special": true}
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", eos], "cls": ["<|startoftext|>", bos], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>", "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    spec.to_string()
        .parse::<tokenizers::Tokenizer>()
        .map_err(|e| ModelError::Corrupt(vocab_path.display().to_string(), e.to_string()))
}
