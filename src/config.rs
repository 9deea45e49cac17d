//! The server's one typed configuration, built from layers: the built-in `config/default.toml`,
//! an optional TOML file, `DSPO_*` environment variables, then command-line flags.
//!
//! The built-in file is both the documentation and the defaults, so the two cannot drift. Layers
//! are merged as TOML values before one typed deserialisation with `deny_unknown_fields`, so a
//! misspelt key anywhere is an error naming it rather than a silently ignored setting.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The documented defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// The directory of the demo model served when no model is configured.
pub const DEMO_MODEL_DIR: &str = "models/shapes";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Io(PathBuf, String),
    #[error("{0}: {1}")]
    Parse(String, String),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthSection,
    pub models: ModelsConfig,
    pub limits: Limits,
    pub defaults: Defaults,
    pub batching: Batching,
    pub adapters: AdaptersConfig,
    pub jobs: JobsSection,
    pub datasets: DatasetsSection,
    pub finetune: FinetuneSection,
    pub rewards: RewardsSection,
}

/// Reward models for POST /evaluate, each a directory or hub id ("" = not available), and the
/// limits of one evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardsSection {
    pub clip_score: String,
    pub pickscore: String,
    pub aesthetic: String,
    pub hpsv2: String,
    pub max_prompts: usize,
    pub max_seeds: usize,
}

impl RewardsSection {
    /// The configured source of a reward, by name; None when it is unknown or not configured.
    pub fn source(&self, name: &str) -> Option<&str> {
        let s = match name {
            "clip_score" => &self.clip_score,
            "pickscore" => &self.pickscore,
            "aesthetic" => &self.aesthetic,
            "hpsv2" => &self.hpsv2,
            _ => return None,
        };
        Some(s.as_str()).filter(|s| !s.is_empty())
    }

    /// Every configured reward's name.
    pub fn available(&self) -> Vec<&'static str> {
        ["clip_score", "pickscore", "aesthetic", "hpsv2"]
            .into_iter()
            .filter(|n| self.source(n).is_some())
            .collect()
    }
}

/// API keys and what each may do (see `api::auth`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    pub api_keys: Vec<String>,
    pub api_keys_file: String,
    pub protect_docs: bool,
    pub requests_per_minute: u32,
    pub max_active_jobs_per_key: usize,
}

/// Fine-tuning jobs (POST /finetune).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsSection {
    pub enabled: bool,
    pub webhook_secret: String,
    pub webhook_retries: usize,
    pub webhook_progress_interval_secs: u64,
    pub keep_job_files: bool,
    pub max_steps: usize,
    pub max_pairs_per_step: usize,
    pub max_lora_rank: usize,
    pub devices: Vec<String>,
    pub database_url: String,
    pub lease_secs: f64,
}

/// Where job datasets may come from and how big they may be.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetsSection {
    pub allow_private_networks: bool,
    pub max_bytes: u64,
    pub timeout_s: u64,
    pub file_roots: Vec<PathBuf>,
}

/// Defaults for the fields a /finetune request leaves out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSection {
    pub method: String,
    pub max_steps: usize,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    pub warmup_steps: usize,
    pub checkpoint_every: usize,
    pub lora_rank: usize,
    pub lora_alpha: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    pub allowed_hosts: Vec<String>,
    pub cors_origins: Vec<String>,
    pub header_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub max_connections: usize,
}

impl ServerConfig {
    /// Whether the server listens on a loopback address only (a name that does not parse as
    /// an address, e.g. `localhost:8080`, counts as loopback when it is "localhost").
    pub fn listens_on_loopback(&self) -> bool {
        match self.listen.parse::<std::net::SocketAddr>() {
            Ok(a) => a.ip().is_loopback(),
            Err(_) => self.listen.rsplit_once(':').is_some_and(|(h, _)| h == "localhost"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    pub serve: Vec<String>,
    pub default: String,
    pub device: String,
    /// Placement per served model name: the devices it is served on, one worker (replica)
    /// each. A `@DEVICE[,DEVICE...]` suffix on the model's `serve` entry wins over this.
    pub devices: std::collections::BTreeMap<String, Vec<String>>,
    pub dtype: String,
    pub variant: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub min_size: u32,
    pub max_size: u32,
    pub max_steps: u32,
    pub max_guidance_scale: f64,
    pub max_num_images: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub steps: u32,
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    pub strength: f64,
    pub adapter_scale: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    pub max_batch: usize,
    pub wait_ms: u64,
    pub queue_size: usize,
    pub retry_after_s: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptersConfig {
    pub cache_size: usize,
}

/// One model to serve: a name clients use, where the weights come from, and the devices it
/// is served on (empty: `models.devices` or `models.device`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub source: String,
    pub devices: Vec<String>,
}

impl ModelSpec {
    /// `NAME=SOURCE[@DEVICE[,DEVICE...]]`, or a bare SOURCE named after its last path
    /// component. The placement suffix is told from a hub revision (`owner/repo@main`) by
    /// its form: every entry must read as a device.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        let (s, devices) = match s.rsplit_once('@') {
            Some((head, tail))
                if tail.split(',').all(|d| crate::models::device::looks_like_device(d.trim())) =>
            {
                (head, tail.split(',').map(|d| d.trim().to_string()).collect())
            }
            _ => (s, Vec::new()),
        };
        let (name, source) = match s.split_once('=') {
            Some((n, src)) => (n.trim().to_string(), src.trim().to_string()),
            None => {
                let name = Path::new(s.trim_end_matches('/'))
                    .file_name()
                    .map(|n| {
                        n.to_string_lossy()
                            .split('@')
                            .next()
                            .unwrap_or_default()
                            .to_string()
                    })
                    .unwrap_or_default();
                (name, s.to_string())
            }
        };
        if source.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "model '{s}': empty source (expected NAME=DIR_OR_HUB_ID)"
            )));
        }
        if !valid_name(&name) {
            return Err(ConfigError::Invalid(format!(
                "model '{s}': the name '{name}' must be 1-64 characters of letters, digits, '-', '_' or '.'"
            )));
        }
        Ok(Self {
            name,
            source,
            devices,
        })
    }
}

/// Adapter names become directory names under the data dir, so names (of models too, for one
/// rule) are restricted to characters that can never climb out of a directory.
pub fn valid_name(name: &str) -> bool {
    crate::adapters::valid_name(name)
}

/// Command-line values that override every other layer (None: not given).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub models: Vec<String>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `section.key=value` pairs.
    pub set: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        let v: toml::Value =
            toml::from_str(DEFAULT_TOML).expect("built-in config/default.toml parses");
        v.try_into()
            .expect("built-in config/default.toml matches Config")
    }
}

impl Config {
    /// Builds the configuration from all layers. `env` is passed in (not read here) so tests
    /// can exercise it without touching the process environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(DEFAULT_TOML)
            .map_err(|e| ConfigError::Parse("built-in default.toml".into(), e.to_string()))?;
        let defaults = value.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Io(path.to_path_buf(), e.to_string()))?;
            let layer: toml::Value = toml::from_str(&text)
                .map_err(|e| ConfigError::Parse(path.display().to_string(), e.to_string()))?;
            merge(&mut value, layer);
        }
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        for (path, _) in leaves(&defaults) {
            let var = format!("DSPO_{}", path.replace('.', "_").to_ascii_uppercase());
            if let Some(raw) = env.get(&var) {
                override_one(&mut value, &path, raw).map_err(|e| ConfigError::Parse(var.clone(), e))?;
            }
        }
        for kv in &overrides.set {
            let (path, raw) = kv.split_once('=').ok_or_else(|| {
                ConfigError::Invalid(format!("--set {kv}: expected section.key=value"))
            })?;
            override_one(&mut value, path.trim(), raw).map_err(|e| {
                if e.starts_with("no setting") {
                    ConfigError::Invalid(format!("--set {kv}: {e}"))
                } else {
                    ConfigError::Parse(format!("--set {kv}"), e)
                }
            })?;
        }
        let str_val = |s: &str| toml::Value::String(s.to_string());
        if let Some(l) = &overrides.listen {
            set_path(&mut value, "server.listen", str_val(l));
        }
        if let Some(d) = &overrides.data_dir {
            set_path(&mut value, "server.data_dir", str_val(&d.to_string_lossy()));
        }
        if let Some(d) = &overrides.device {
            set_path(&mut value, "models.device", str_val(d));
        }
        if let Some(d) = &overrides.dtype {
            set_path(&mut value, "models.dtype", str_val(d));
        }
        if !overrides.models.is_empty() {
            let list = overrides.models.iter().map(|m| str_val(m)).collect();
            set_path(&mut value, "models.serve", toml::Value::Array(list));
        }
        let config: Config = value.try_into().map_err(|e: toml::de::Error| {
            ConfigError::Parse("configuration".into(), e.to_string())
        })?;
        config.check()?;
        Ok(config)
    }

    /// Cross-field checks that serde cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.server.header_timeout_secs == 0
            || self.server.body_timeout_secs == 0
            || self.server.max_connections == 0
        {
            return bad("server.header_timeout_secs, body_timeout_secs and max_connections must be positive".into());
        }
        for o in &self.server.cors_origins {
            let shaped = o == "*"
                || ((o.starts_with("http://") || o.starts_with("https://"))
                    && !o.ends_with('/')
                    && o.chars().all(|c| c.is_ascii_graphic()));
            if !shaped {
                return bad(format!(
                    "server.cors_origins: '{o}' is not an origin (scheme://host[:port], no path) or \"*\""
                ));
            }
        }
        if l.min_size == 0
            || !l.min_size.is_multiple_of(8)
            || !l.max_size.is_multiple_of(8)
            || l.min_size > l.max_size
        {
            return bad(format!(
                "limits.min_size ({}) and limits.max_size ({}) must be positive multiples of 8 with min <= max",
                l.min_size, l.max_size
            ));
        }
        if l.max_steps == 0
            || l.max_num_images == 0
            || l.max_image_pixels == 0
            || l.max_body_bytes == 0
        {
            return bad("limits.max_steps, max_num_images, max_image_pixels and max_body_bytes must be positive".into());
        }
        if !(l.max_guidance_scale.is_finite() && l.max_guidance_scale >= 0.0) {
            return bad("limits.max_guidance_scale must be a finite number >= 0".into());
        }
        let d = &self.defaults;
        if d.steps == 0 || d.steps > l.max_steps {
            return bad(format!(
                "defaults.steps ({}) must be between 1 and limits.max_steps ({})",
                d.steps, l.max_steps
            ));
        }
        for (k, v) in [
            ("guidance_scale", d.guidance_scale),
            ("image_guidance_scale", d.image_guidance_scale),
        ] {
            if !(0.0..=l.max_guidance_scale).contains(&v) {
                return bad(format!(
                    "defaults.{k} ({v}) must be in [0, limits.max_guidance_scale]"
                ));
            }
        }
        if !(d.strength > 0.0 && d.strength <= 1.0) {
            return bad(format!(
                "defaults.strength ({}) must be in (0, 1]",
                d.strength
            ));
        }
        if !d.adapter_scale.is_finite() {
            return bad("defaults.adapter_scale must be finite".into());
        }
        let b = &self.batching;
        if b.max_batch == 0 || b.queue_size == 0 {
            return bad("batching.max_batch and batching.queue_size must be at least 1".into());
        }
        if self.adapters.cache_size == 0 {
            return bad("adapters.cache_size must be at least 1".into());
        }
        self.dtype()?;
        Ok(())
    }

    pub fn dtype(&self) -> Result<candle_core::DType, ConfigError> {
        crate::models::device::parse_dtype(&self.models.dtype)
            .map_err(|e| ConfigError::Invalid(format!("models.dtype: {e}")))
    }

    pub fn variant(&self) -> Option<String> {
        Some(self.models.variant.clone()).filter(|v| !v.is_empty())
    }

    /// The models to serve. With none configured, the demo model if it is present; otherwise
    /// an error telling the user how to name one.
    pub fn model_specs(&self) -> Result<Vec<ModelSpec>, ConfigError> {
        let mut specs = Vec::new();
        for s in &self.models.serve {
            let spec = ModelSpec::parse(s)?;
            if specs.iter().any(|o: &ModelSpec| o.name == spec.name) {
                return Err(ConfigError::Invalid(format!(
                    "model name '{}' is given twice",
                    spec.name
                )));
            }
            specs.push(spec);
        }
        if specs.is_empty() {
            if Path::new(DEMO_MODEL_DIR).join("model_index.json").exists() {
                specs.push(ModelSpec {
                    name: "shapes".into(),
                    source: DEMO_MODEL_DIR.into(),
                    devices: Vec::new(),
                });
            } else {
                return Err(ConfigError::Invalid(format!(
                    "no model to serve: pass --model NAME=DIR_OR_HUB_ID (repeatable), or set models.serve in a \
                     config file or DSPO_MODELS_SERVE (the demo model {DEMO_MODEL_DIR} is not present)"
                )));
            }
        }
        // Placement: the entry's own suffix, else models.devices, else models.device.
        for spec in &mut specs {
            if spec.devices.is_empty() {
                spec.devices = self
                    .models
                    .devices
                    .get(&spec.name)
                    .cloned()
                    .unwrap_or_else(|| vec![self.models.device.clone()]);
            }
        }
        for name in self.models.devices.keys() {
            if !specs.iter().any(|s| &s.name == name) {
                return Err(ConfigError::Invalid(format!(
                    "models.devices names '{name}', which is not a served model"
                )));
            }
        }
        if !self.models.default.is_empty() && !specs.iter().any(|s| s.name == self.models.default) {
            return Err(ConfigError::Invalid(format!(
                "models.default '{}' is not one of the served models ({})",
                self.models.default,
                specs
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(specs)
    }

    pub fn adapters(&self) -> crate::adapters::AdapterDir {
        crate::adapters::AdapterDir::in_data_dir(&self.server.data_dir)
    }
}

/// Deep merge: tables merge key by key, anything else is replaced.
fn merge(base: &mut toml::Value, layer: toml::Value) {
    match (base, layer) {
        (toml::Value::Table(b), toml::Value::Table(l)) => {
            for (k, v) in l {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, l) => *b = l,
    }
}

/// Every non-table value with its dotted path.
fn leaves(v: &toml::Value) -> Vec<(String, toml::Value)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, toml::Value)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out
}

fn set_path(root: &mut toml::Value, path: &str, value: toml::Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let table = match cur {
            toml::Value::Table(t) => t,
            _ => return,
        };
        if i + 1 == parts.len() {
            table.insert(part.to_string(), value);
            return;
        }
        cur = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
}

/// One environment or `--set` override, by the rule every subcommand shares
/// (`crate::util::set_override`: the value is read as the setting's type).
fn override_one(value: &mut toml::Value, path: &str, raw: &str) -> Result<(), String> {
    let mut tree = serde_json::to_value(&*value).map_err(|e| e.to_string())?;
    crate::util::set_override(&mut tree, path, raw)?;
    *value = serde_json::from_value(tree).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn built_in_defaults_parse_and_check() {
        let c = Config::default();
        c.check().unwrap();
        assert_eq!(c.batching.max_batch, 8);
        assert_eq!(c.server.listen, "127.0.0.1:8080");
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("dspo-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[batching]\nmax_batch = 2\nqueue_size = 5\n[server]\nlisten = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        let o = Overrides {
            listen: Some("127.0.0.1:9".into()),
            ..Default::default()
        };
        let c = Config::load(
            Some(&file),
            env(&[
                ("DSPO_BATCHING_MAX_BATCH", "3"),
                ("DSPO_MODELS_SERVE", "a=/x, b=/y"),
            ]),
            &o,
        )
        .unwrap();
        assert_eq!(c.batching.max_batch, 3, "env beats file");
        assert_eq!(c.batching.queue_size, 5, "file beats default");
        assert_eq!(c.server.listen, "127.0.0.1:9", "flag beats file");
        assert_eq!(c.models.serve, vec!["a=/x".to_string(), "b=/y".to_string()]);
        let o = Overrides {
            models: vec!["c=/z".into()],
            set: vec!["limits.max_size=512".into()],
            ..Default::default()
        };
        let c = Config::load(Some(&file), env(&[("DSPO_MODELS_SERVE", "a=/x")]), &o).unwrap();
        assert_eq!(
            c.models.serve,
            vec!["c=/z".to_string()],
            "--model replaces the list"
        );
        assert_eq!(c.limits.max_size, 512);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn mistakes_are_errors() {
        let dir = std::env::temp_dir().join(format!("dspo-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[batching]\nmax_bacth = 2\n").unwrap();
        let e = Config::load(Some(&file), vec![], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_bacth"), "{e}");
        let e = Config::load(
            None,
            env(&[("DSPO_BATCHING_MAX_BATCH", "4x")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("DSPO_BATCHING_MAX_BATCH"), "{e}");
        let o = Overrides {
            set: vec!["limits.min_size=12".into()],
            ..Default::default()
        };
        assert!(
            Config::load(None, vec![], &o).is_err(),
            "min_size must be a multiple of 8"
        );
        let o = Overrides {
            set: vec!["nope.key=1".into()],
            ..Default::default()
        };
        assert!(Config::load(None, vec![], &o).is_err());
        let o = Overrides {
            dtype: Some("f64".into()),
            ..Default::default()
        };
        assert!(Config::load(None, vec![], &o).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn model_specs() {
        assert_eq!(
            ModelSpec::parse("a=/m/x").unwrap(),
            ModelSpec {
                name: "a".into(),
                source: "/m/x".into(),
                devices: vec![],
            }
        );
        let placed = ModelSpec::parse("a=owner/repo@main@cuda:0,cuda:1").unwrap();
        assert_eq!(placed.source, "owner/repo@main");
        assert_eq!(placed.devices, vec!["cuda:0", "cuda:1"]);
        assert_eq!(ModelSpec::parse("/m/x@cpu").unwrap().name, "x");
        assert!(ModelSpec::parse("owner/repo@main").unwrap().devices.is_empty());
        assert_eq!(ModelSpec::parse("/m/tiny-sd15/").unwrap().name, "tiny-sd15");
        assert_eq!(ModelSpec::parse("owner/repo@main").unwrap().name, "repo");
        assert!(ModelSpec::parse("a b=/x").is_err());
        assert!(ModelSpec::parse("a=").is_err());
        let mut c = Config::default();
        c.models.serve = vec!["a=/x".into(), "a=/y".into()];
        assert!(c.model_specs().is_err(), "duplicate names");
        c.models.serve = vec!["a=/x".into()];
        c.models.default = "b".into();
        assert!(c.model_specs().is_err(), "unknown default");
    }
}
