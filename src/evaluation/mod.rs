//! The evaluation protocol: images of model/adapter A and B drawn with the same prompts and
//! seeds, scored by reward models, compared as win rates with 95% intervals, paired (A's image
//! of a seed against B's of the same seed) and unpaired (against B's next seed).
//!
//! Scores are keyed by stem `{prompt:04}_{seed index}`, the name every image of an evaluation
//! carries, so the statistics do not care where the images came from (a folder scored by an
//! external command, or the server's own reward models).

pub mod prompts;
pub mod run;

use std::collections::BTreeMap;

/// Stem -> (reward, other per-image figures averaged per side, e.g. `color_ok`).
pub type Scores = BTreeMap<String, (f64, BTreeMap<String, f64>)>;

/// Win rate of A over B on the stems both sides scored (ties count half), with the 95%
/// normal-approximation interval, plus per-side means of the reward and of the extra fields.
pub fn win_rate(
    a: &Scores,
    b: &Scores,
    tie_eps: f64,
) -> serde_json::Value {
    let common: Vec<&String> = a.keys().filter(|k| b.contains_key(*k)).collect();
    let (mut wins, mut ties, mut losses) = (0usize, 0usize, 0usize);
    for k in &common {
        let d = a[*k].0 - b[*k].0;
        if d.abs() <= tie_eps {
            ties += 1;
        } else if d > 0.0 {
            wins += 1;
        } else {
            losses += 1;
        }
    }
    let n = common.len();
    let wr = (wins as f64 + 0.5 * ties as f64) / n.max(1) as f64;
    let outcomes: Vec<f64> = std::iter::repeat_n(1.0, wins)
        .chain(std::iter::repeat_n(0.5, ties))
        .chain(std::iter::repeat_n(0.0, losses))
        .collect();
    let ci = if n > 1 {
        let var = outcomes.iter().map(|o| (o - wr).powi(2)).sum::<f64>() / (n - 1) as f64;
        1.96 * (var / n as f64).sqrt()
    } else {
        f64::NAN
    };
    let means = |m: &Scores| {
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let mut r = 0.0;
        for k in &common {
            let (rw, extra) = &m[*k];
            r += rw;
            for (name, v) in extra {
                let e = sums.entry(name.clone()).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
        let mut o = serde_json::Map::new();
        o.insert("mean_reward".into(), (r / n.max(1) as f64).into());
        for (name, (s, c)) in sums {
            o.insert(name, (s / c.max(1) as f64).into());
        }
        serde_json::Value::Object(o)
    };
    serde_json::json!({
        "n": n, "wins": wins, "ties": ties, "losses": losses,
        "winrate": wr, "ci95": ci,
        "a": means(a), "b": means(b),
    })
}

/// B's rewards re-keyed so that stem `{i}_{k}` holds B's image of seed `(k + 1) % seeds`:
/// `win_rate(a, &cross_seed(b, seeds), ..)` then compares independent draws of the same prompt.
/// Stems that are not `{i}_{k}` with `k < seeds` are dropped.
pub fn cross_seed(b: &Scores, seeds: usize) -> Scores {
    b.iter()
        .filter_map(|(stem, v)| {
            let (prompt, k) = stem.rsplit_once('_')?;
            let k: usize = k.parse().ok().filter(|k| *k < seeds)?;
            Some((format!("{prompt}_{}", (k + seeds - 1) % seeds), v.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(rewards: &[(&str, f64, bool)]) -> Scores {
        rewards
            .iter()
            .map(|(k, r, ok)| {
                (
                    k.to_string(),
                    (
                        *r,
                        BTreeMap::from([("color_ok".to_string(), if *ok { 1.0 } else { 0.0 })]),
                    ),
                )
            })
            .collect()
    }

    #[test]
    fn win_rate_counts_ties_half_pairs_by_stem_and_averages_checks() {
        let a = side(&[
            ("0000_0", -0.1, true),
            ("0001_0", -0.5, true),
            ("0002_0", -0.3, false),
            ("only_a", 0.0, true),
        ]);
        let b = side(&[
            ("0000_0", -0.2, true),
            ("0001_0", -0.4, false),
            ("0002_0", -0.3, false),
        ]);
        let r = win_rate(&a, &b, 0.0);
        assert_eq!(
            (
                r["n"].as_u64(),
                r["wins"].as_u64(),
                r["ties"].as_u64(),
                r["losses"].as_u64()
            ),
            (Some(3), Some(1), Some(1), Some(1))
        );
        assert!((r["winrate"].as_f64().unwrap() - 0.5).abs() < 1e-12);
        // Outcomes 1, 0.5, 0: sample sd 0.5, so the interval is 1.96 * 0.5 / sqrt(3).
        assert!((r["ci95"].as_f64().unwrap() - 1.96 * 0.5 / 3f64.sqrt()).abs() < 1e-12);
        assert!((r["a"]["color_ok"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((r["b"]["mean_reward"].as_f64().unwrap() - (-0.3)).abs() < 1e-12);
        // A tie threshold turns the 0.1 gaps into ties.
        assert_eq!(win_rate(&a, &b, 0.1)["ties"].as_u64(), Some(3));
    }

    #[test]
    fn unpaired_comparison_takes_b_from_the_next_seed_of_the_same_prompt() {
        let a = side(&[
            ("0000_0", 0.0, true),
            ("0000_1", 0.0, true),
            ("0001_0", 0.0, true),
        ]);
        // B's seed 1 of prompt 0 beats A, seed 0 loses; prompt 1 has no seed 1 on B's side.
        let b = side(&[
            ("0000_0", -1.0, true),
            ("0000_1", 1.0, true),
            ("0001_0", -1.0, true),
            ("0000_2", 5.0, true),
        ]);
        let c = cross_seed(&b, 2);
        assert_eq!(c.keys().collect::<Vec<_>>(), ["0000_0", "0000_1", "0001_1"]);
        assert_eq!((c["0000_0"].0, c["0000_1"].0), (1.0, -1.0));
        let r = win_rate(&a, &c, 0.0);
        // A 0000_0 vs B 0000_1 (loss), A 0000_1 vs B 0000_0 (win); 0001_0 has no partner.
        assert_eq!(
            (r["n"].as_u64(), r["wins"].as_u64(), r["losses"].as_u64()),
            (Some(2), Some(1), Some(1))
        );
    }
}
