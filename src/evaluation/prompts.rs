//! Prompt lists for an evaluation, from the files prompt sets come in: a parquet file (the
//! `caption` column of Pick-a-Pic's splits, or `prompt` / `Prompt` / `text`, as PartiPrompts and
//! the HPSv2 benchmark ship them), JSON lines with one of those fields, or plain text with one
//! prompt per line. Repeated prompts are kept once, in first-seen order (Pick-a-Pic's test split
//! repeats its captions across pairs).

use crate::training::dataset::{open_parquet, projection};
use parquet::file::reader::FileReader;
use parquet::record::Field;
use std::path::Path;

const COLUMNS: [&str; 4] = ["caption", "prompt", "Prompt", "text"];

pub fn read_prompts(path: &Path) -> Result<Vec<String>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let raw: Vec<String> = if bytes.starts_with(b"PAR1") {
        from_parquet(path)?
    } else {
        let text = String::from_utf8(bytes).map_err(|_| "the prompt file is neither parquet nor UTF-8 text".to_string())?;
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        if lines.first().is_some_and(|l| l.starts_with('{')) {
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let v: serde_json::Value =
                        serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1))?;
                    COLUMNS
                        .iter()
                        .find_map(|c| v.get(*c).and_then(|x| x.as_str()))
                        .map(String::from)
                        .ok_or_else(|| format!("line {}: no {} field", i + 1, COLUMNS.join(" / ")))
                })
                .collect::<Result<_, _>>()?
        } else {
            lines.into_iter().map(String::from).collect()
        }
    };
    let mut seen = std::collections::HashSet::new();
    let prompts: Vec<String> = raw.into_iter().filter(|p| seen.insert(p.clone())).collect();
    if prompts.is_empty() {
        return Err("the prompt file holds no prompts".into());
    }
    Ok(prompts)
}

fn from_parquet(path: &Path) -> Result<Vec<String>, String> {
    let reader = open_parquet(path).map_err(|e| e.to_string())?;
    let names: Vec<String> = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    let column = COLUMNS
        .iter()
        .find(|c| names.iter().any(|n| n == *c))
        .ok_or_else(|| format!("the parquet file has no {} column", COLUMNS.join(" / ")))?;
    let proj = projection(&reader, &[column]).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for row in reader.get_row_iter(Some(proj)).map_err(|e| e.to_string())? {
        let row = row.map_err(|e| e.to_string())?;
        for (_, f) in row.get_column_iter() {
            if let Field::Str(s) = f {
                out.push(s.clone());
            }
        }
    }
    Ok(out)
}
