//! Small helpers shared across layers.

/// Parses JSON as Python's `json` module writes it: `Infinity`, `-Infinity` and `NaN` (which
/// diffusers' `save_config` emits, e.g. DPM-Solver's `lambda_min_clipped`) become null.
pub fn parse_lenient_json(text: &str) -> serde_json::Result<serde_json::Value> {
    let mut clean = String::with_capacity(text.len());
    let mut in_str = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|t| rest.starts_with(**t))
        {
            clean.push_str("null");
            rest = &rest[tok.len()..];
            continue;
        }
        clean.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&clean)
}

#[cfg(test)]
mod tests {
    #[test]
    fn python_specials_become_null_outside_strings() {
        let v = super::parse_lenient_json(
            r#"{"a": -Infinity, "b": "NaN \" Infinity", "c": [NaN, 1.5]}"#,
        )
        .unwrap();
        assert!(v["a"].is_null());
        assert_eq!(v["b"], "NaN \" Infinity");
        assert!(v["c"][0].is_null());
        assert_eq!(v["c"][1], 1.5);
    }
}

/// Applies one `--set path=value` override to a configuration tree, the one rule for every
/// subcommand: `path` is dotted (`batching.max_batch`, `pretrain.timestep_bias.strategy`) and
/// must name an existing setting, and the value is read as that setting's type (a number, a
/// boolean, a string, a comma-separated list; an unset optional setting takes JSON, else a
/// string), so a typo like `4x` for a number is an error rather than a string.
pub fn set_override(root: &mut serde_json::Value, path: &str, raw: &str) -> Result<(), String> {
    use serde_json::Value;
    let mut slot = &mut *root;
    for part in path.split('.') {
        slot = match slot {
            Value::Object(map) => map
                .get_mut(part)
                .ok_or_else(|| format!("no setting named '{path}'"))?,
            _ => return Err(format!("no setting named '{path}'")),
        };
    }
    let raw = raw.trim();
    let number = |what: &str| format!("'{raw}' is not {what} (for {path})");
    *slot = match &*slot {
        Value::Bool(_) => Value::Bool(raw.parse().map_err(|_| number("true/false"))?),
        Value::Number(n) if n.is_f64() => {
            serde_json::json!(raw.parse::<f64>().map_err(|_| number("a number"))?)
        }
        Value::Number(_) => serde_json::json!(raw.parse::<i64>().map_err(|_| number("an integer"))?),
        Value::String(_) => Value::String(raw.to_string()),
        Value::Array(_) => Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.into())))
                .collect(),
        ),
        Value::Null => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.into())),
        Value::Object(_) => return Err(format!("'{path}' is a table: set one of its keys")),
    };
    Ok(())
}

#[cfg(test)]
mod set_tests {
    use super::set_override;
    use serde_json::json;

    #[test]
    fn overrides_are_typed_by_the_setting() {
        let mut v = json!({"a": {"n": 1, "f": 0.5, "b": false, "s": "x", "l": ["p"], "o": null}});
        for (path, raw) in [("a.n", "4"), ("a.f", "2"), ("a.b", "true"), ("a.s", "7"), ("a.l", "q, r"), ("a.o", "3")] {
            set_override(&mut v, path, raw).unwrap();
        }
        assert_eq!(v, json!({"a": {"n": 4, "f": 2.0, "b": true, "s": "7", "l": ["q", "r"], "o": 3}}));
        assert!(set_override(&mut v, "a.n", "4x").unwrap_err().contains("not an integer"));
        assert!(set_override(&mut v, "a.f", "x").unwrap_err().contains("not a number"));
        assert!(set_override(&mut v, "a.missing", "1").unwrap_err().contains("no setting"));
        assert!(set_override(&mut v, "a", "1").unwrap_err().contains("table"));
    }
}
