//! Runs a conformance suite (the format of `../shared/conformance/README.md`): every case
//! names a stage, a model directory, inputs and expected tensors with tolerances. Passing
//! means we compute the same function as diffusers/transformers.

mod cases;
mod rewards;
mod training;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use cases::{ModelCache, KINDS};

#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub max_abs: f64,
    pub rel_l2: f64,
}

impl Tolerance {
    fn from_json(v: &Value) -> Option<Self> {
        Some(Self {
            max_abs: v.get("max_abs")?.as_f64()?,
            rel_l2: v.get("rel_l2")?.as_f64()?,
        })
    }
}

/// One loaded case.
pub struct Case {
    pub name: String,
    pub kind: String,
    pub model: Option<PathBuf>,
    pub params: Value,
    pub tensors: HashMap<String, Tensor>,
    pub json: Value,
    pub root: PathBuf,
}

impl Case {
    /// The input tensor of `role`.
    pub fn input(&self, role: &str) -> anyhow::Result<Tensor> {
        let name = self.json["inputs"][role]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("case has no input role {role}"))?;
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("tensor {name} missing from the case file"))
    }
    pub fn has_input(&self, role: &str) -> bool {
        self.json["inputs"].get(role).is_some()
    }
    /// Input roles with a prefix, e.g. `theta0.` (role suffix -> tensor).
    pub fn inputs_with_prefix(&self, prefix: &str) -> anyhow::Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        if let Some(obj) = self.json["inputs"].as_object() {
            for (role, name) in obj {
                if let Some(rest) = role.strip_prefix(prefix) {
                    let name = name.as_str().unwrap_or_default();
                    let t = self
                        .tensors
                        .get(name)
                        .ok_or_else(|| anyhow::anyhow!("tensor {name} missing"))?;
                    out.insert(rest.to_string(), t.clone());
                }
            }
        }
        Ok(out)
    }
    pub fn param_str(&self, k: &str) -> Option<String> {
        self.params
            .get(k)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    }
    pub fn param_f64(&self, k: &str) -> anyhow::Result<f64> {
        self.params
            .get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| anyhow::anyhow!("param {k} missing or not a number"))
    }
    pub fn param_usize(&self, k: &str) -> anyhow::Result<usize> {
        self.params
            .get(k)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| anyhow::anyhow!("param {k} missing or not an integer"))
    }
    pub fn file(&self, section: &str, role: &str) -> anyhow::Result<PathBuf> {
        let rel = self.json[section][role]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("case has no {section}.{role}"))?;
        Ok(self.root.join(rel))
    }
}

pub fn read_case_json(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    crate::util::parse_lenient_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The comparison of one expected tensor.
#[derive(Debug, Clone)]
pub struct RoleResult {
    pub role: String,
    pub max_abs: f64,
    pub rel_l2: f64,
    pub tol: Tolerance,
    pub ok: bool,
    pub note: Option<String>,
}

#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub kind: String,
    pub roles: Vec<RoleResult>,
    pub error: Option<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.roles.is_empty() && self.roles.iter().all(|r| r.ok)
    }

    /// `PASS|FAIL <case> <kind> max_abs=<x> rel_l2=<y>` (worst role, by ratio to tolerance).
    pub fn line(&self) -> String {
        let status = if self.passed() { "PASS" } else { "FAIL" };
        let ratio = |r: &RoleResult| {
            let a = if r.tol.max_abs > 0.0 {
                r.max_abs / r.tol.max_abs
            } else if r.max_abs > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            let b = if r.tol.rel_l2 > 0.0 {
                r.rel_l2 / r.tol.rel_l2
            } else if r.rel_l2 > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            a.max(b)
        };
        let worst = self.roles.iter().max_by(|a, b| {
            ratio(a)
                .partial_cmp(&ratio(b))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut s = match worst {
            Some(w) => format!(
                "{status} {} {} max_abs={:.3e} rel_l2={:.3e} (worst role {}: tol {:.1e}/{:.1e})",
                self.name, self.kind, w.max_abs, w.rel_l2, w.role, w.tol.max_abs, w.tol.rel_l2
            ),
            None => format!(
                "{status} {} {} max_abs=nan rel_l2=nan",
                self.name, self.kind
            ),
        };
        if let Some(e) = &self.error {
            s.push_str(&format!(" error: {e}"));
        }
        if let Some(w) = worst {
            if let Some(n) = &w.note {
                s.push_str(&format!(" ({n})"));
            }
        }
        s
    }
}

/// Compares `out` with `reference`: max |out-ref| and ||out-ref|| / ||ref||.
pub fn compare(out: &Tensor, reference: &Tensor) -> anyhow::Result<(f64, f64)> {
    if out.dims() != reference.dims() {
        anyhow::bail!(
            "shape {:?} differs from the expected {:?}",
            out.dims(),
            reference.dims()
        );
    }
    let o = out
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let r = reference
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut max_abs = 0f64;
    let mut diff2 = 0f64;
    let mut ref2 = 0f64;
    for (a, b) in o.iter().zip(&r) {
        let d = a - b;
        if !d.is_finite() {
            return Ok((f64::INFINITY, f64::INFINITY));
        }
        max_abs = max_abs.max(d.abs());
        diff2 += d * d;
        ref2 += b * b;
    }
    let rel = if ref2 > 0.0 {
        (diff2 / ref2).sqrt()
    } else if diff2 > 0.0 {
        f64::INFINITY
    } else {
        0.0
    };
    Ok((max_abs, rel))
}

pub struct Runner {
    pub root: PathBuf,
    pub device: Device,
    models: cases::ModelCache,
}

impl Runner {
    pub fn new(root: &Path, device: Device) -> Self {
        Self {
            root: root.to_path_buf(),
            device,
            models: cases::ModelCache::default(),
        }
    }

    /// Case names (file stems) of the suite, sorted.
    pub fn case_names(&self) -> anyhow::Result<Vec<String>> {
        let dir = self.root.join("cases");
        let mut names = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) == Some("json") {
                if let Some(s) = p.file_stem().and_then(|s| s.to_str()) {
                    names.push(s.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn kind_of(&self, name: &str) -> anyhow::Result<String> {
        let json = read_case_json(&self.root.join("cases").join(format!("{name}.json")))?;
        Ok(json["kind"].as_str().unwrap_or("").to_string())
    }

    fn load_case(&self, name: &str) -> anyhow::Result<Case> {
        let json = read_case_json(&self.root.join("cases").join(format!("{name}.json")))?;
        let st = self.root.join("cases").join(format!("{name}.safetensors"));
        let tensors = if st.exists() {
            candle_core::safetensors::load(&st, &Device::Cpu)?
        } else {
            HashMap::new()
        };
        Ok(Case {
            name: name.to_string(),
            kind: json["kind"].as_str().unwrap_or("").to_string(),
            model: json["model"].as_str().map(|m| self.root.join(m)),
            params: json.get("params").cloned().unwrap_or(Value::Null),
            tensors,
            json,
            root: self.root.clone(),
        })
    }

    pub fn run_case(&mut self, name: &str) -> CaseResult {
        let case = match self.load_case(name) {
            Ok(c) => c,
            Err(e) => {
                return CaseResult {
                    name: name.into(),
                    kind: "?".into(),
                    roles: vec![],
                    error: Some(e.to_string()),
                }
            }
        };
        let kind = case.kind.clone();
        let outputs = cases::run(&case, &mut self.models, &self.device);
        let outputs = match outputs {
            Ok(o) => o,
            Err(e) => {
                return CaseResult {
                    name: name.into(),
                    kind,
                    roles: vec![],
                    error: Some(format!("{e:#}")),
                }
            }
        };
        let mut roles = Vec::new();
        let tol_default = Tolerance::from_json(&case.json["tolerance"]).unwrap_or(Tolerance {
            max_abs: 0.0,
            rel_l2: 0.0,
        });
        let by_role = case
            .json
            .get("tolerance_by_role")
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default();
        let expected = case.json["expected"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut error = None;
        for (role, tname) in &expected {
            let tol = by_role
                .iter()
                .find(|(pat, _)| match pat.strip_suffix('*') {
                    Some(prefix) => role.starts_with(prefix),
                    None => *pat == role,
                })
                .and_then(|(_, v)| Tolerance::from_json(v))
                .unwrap_or(tol_default);
            let Some(reference) = case.tensors.get(tname.as_str().unwrap_or_default()) else {
                error = Some(format!(
                    "expected tensor for role {role} missing from the case file"
                ));
                continue;
            };
            let Some(out) = outputs.get(role) else {
                error = Some(format!("no output for expected role {role}"));
                continue;
            };
            // A stage that also runs inside training on other kernels (cases::TRAINING_KERNELS)
            // is held to the same reference and tolerance on both.
            let variant = outputs
                .get(&format!("{role}{}", cases::TRAINING_KERNELS))
                .map(|t| (format!("{role} (training kernels)"), t));
            for (label, out) in std::iter::once((role.clone(), out)).chain(variant) {
                match compare(out, reference) {
                    Ok((max_abs, rel_l2)) => roles.push(RoleResult {
                        role: label,
                        max_abs,
                        rel_l2,
                        tol,
                        ok: max_abs <= tol.max_abs && rel_l2 <= tol.rel_l2,
                        note: None,
                    }),
                    Err(e) => {
                        error = Some(format!("role {label}: {e}"));
                    }
                }
            }
        }
        CaseResult {
            name: name.into(),
            kind,
            roles,
            error,
        }
    }
}
