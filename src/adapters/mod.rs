//! LoRA adapters: where they live on disk and which names are valid (this file), and the cache
//! a model worker attaches them from (`cache.rs`). The registry of trained adapters (who made
//! each, from what) is a table of the job store, next to the jobs that produce them.

pub mod cache;

use std::path::{Path, PathBuf};

/// The file of an adapter in its directory: diffusers' LoRA format, what
/// `load_lora_weights` reads.
pub const WEIGHTS_FILE: &str = "adapter.safetensors";

/// A LoRA adapter chosen by a request; the file was seen to exist at validation time.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterChoice {
    pub name: String,
    pub path: PathBuf,
    pub scale: f64,
}

/// Adapter names: 1-64 letters, digits, '-', '_' and '.', not starting with '.', so that a
/// name is one path component and never a hidden or relative one.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !n.starts_with('.')
}

/// The adapters directory: `<root>/<name>/adapter.safetensors` per adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterDir {
    root: PathBuf,
}

impl AdapterDir {
    /// The directory a server keeps under its data directory.
    pub fn in_data_dir(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("adapters"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// An adapter's directory (whether or not it exists).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// An adapter's weights file (whether or not it exists).
    pub fn weights(&self, name: &str) -> PathBuf {
        self.dir(name).join(WEIGHTS_FILE)
    }

    /// Whether anything (even an incomplete install) holds this name, compared without case:
    /// on a case-insensitive filesystem `Held` and `held` are one directory.
    pub fn taken(&self, name: &str) -> bool {
        self.dir(name).exists()
            || std::fs::read_dir(&self.root).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(name))
            })
    }

    /// An existing adapter's weights, if the name is valid and the file is there.
    pub fn find(&self, name: &str) -> Option<PathBuf> {
        let p = self.weights(name);
        (valid_name(name) && p.is_file()).then_some(p)
    }

    /// The names of the complete adapters present, sorted (files dropped in by hand too).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| self.find(n).is_some())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Copies a trained adapter in under `name`; readers see the file only once it is
    /// complete (written beside it, then renamed).
    pub fn install(&self, name: &str, weights: &Path) -> std::io::Result<PathBuf> {
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
        std::fs::copy(weights, &tmp)?;
        let path = self.weights(name);
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Removes an adapter's directory.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        std::fs::remove_dir_all(self.dir(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_visible_path_components() {
        for ok in ["a", "my-adapter_1.v2", &"x".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "..", "a/b", "a\\b", "sp ace", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn install_find_remove() {
        let tmp = std::env::temp_dir().join(format!("adapters-{}", std::process::id()));
        let dirs = AdapterDir::in_data_dir(&tmp);
        let src = tmp.join("trained.safetensors");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(&src, b"weights").unwrap();
        assert_eq!(dirs.find("a"), None);
        let p = dirs.install("a", &src).unwrap();
        assert_eq!(p, tmp.join("adapters/a/adapter.safetensors"));
        assert_eq!(dirs.find("a"), Some(p.clone()));
        assert_eq!(std::fs::read(&p).unwrap(), b"weights");
        assert!(!dirs.dir("a").join(".adapter.safetensors.tmp").exists());
        assert!(dirs.taken("A"), "names compare without case");
        dirs.remove("a").unwrap();
        assert!(!dirs.taken("a"));
        let _ = std::fs::remove_dir_all(&tmp);
    }
}
