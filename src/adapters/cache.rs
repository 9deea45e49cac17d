//! Adapters as a model worker sees them: a small least-recently-used cache of loaded files and
//! the one adapter currently attached to its model.
//!
//! Attaching mutates the UNet's LoRA slots, so only the worker thread that owns the model
//! touches any of this; the HTTP layer only checks that the file exists.

use super::AdapterChoice;
use crate::models::lora::LoraAdapter;
use crate::models::DiffusionModel;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// A loaded file is identified by path and modification time, so an adapter retrained in
/// place is reloaded rather than served stale.
#[derive(Clone, PartialEq, Debug)]
struct FileId {
    path: PathBuf,
    modified: Option<SystemTime>,
}

impl FileId {
    fn of(path: &Path) -> Self {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Self {
            path: path.to_path_buf(),
            modified,
        }
    }
}

pub struct AdapterState {
    capacity: usize,
    /// Most recently used last.
    cache: Vec<(FileId, Arc<LoraAdapter>)>,
    /// What the model's slots hold now: (file, scale bits).
    attached: Option<(FileId, u64)>,
}

impl AdapterState {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            cache: Vec::new(),
            attached: None,
        }
    }

    fn load(&mut self, id: &FileId, model: &DiffusionModel) -> Result<Arc<LoraAdapter>, String> {
        if let Some(pos) = self.cache.iter().position(|(k, _)| k == id) {
            let entry = self.cache.remove(pos);
            let adapter = entry.1.clone();
            self.cache.push(entry);
            return Ok(adapter);
        }
        let adapter =
            Arc::new(LoraAdapter::load(&id.path, &model.device).map_err(|e| e.to_string())?);
        self.cache.retain(|(k, _)| k.path != id.path);
        if self.cache.len() >= self.capacity {
            self.cache.remove(0);
        }
        self.cache.push((id.clone(), adapter.clone()));
        Ok(adapter)
    }

    /// Makes the model's slots hold `choice` (or nothing), doing no work when they already do.
    pub fn apply(
        &mut self,
        choice: Option<&AdapterChoice>,
        model: &DiffusionModel,
    ) -> Result<(), String> {
        let Some(choice) = choice else {
            if self.attached.is_some() {
                model.detach_adapters();
                self.attached = None;
            }
            return Ok(());
        };
        let id = FileId::of(&choice.path);
        let want = (id.clone(), choice.scale.to_bits());
        if self.attached.as_ref() == Some(&want) {
            return Ok(());
        }
        let adapter = self
            .load(&id, model)
            .map_err(|e| format!("adapter '{}' could not be loaded: {e}", choice.name))?;
        // attach validates every module before it changes anything, but a failure still leaves
        // the previous adapter attached: forget it so the next batch re-applies its own.
        let result = model.attach_adapter(&adapter, choice.scale);
        match result {
            Ok(()) => {
                self.attached = Some(want);
                Ok(())
            }
            Err(e) => {
                model.detach_adapters();
                self.attached = None;
                Err(format!("adapter '{}' does not fit model: {e}", choice.name))
            }
        }
    }

    /// After a panic the slots may hold anything: detach everything.
    pub fn reset(&mut self, model: &DiffusionModel) {
        model.detach_adapters();
        self.attached = None;
    }
}

