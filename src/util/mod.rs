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
