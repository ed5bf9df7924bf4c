//! Aggregation algorithms behind one trait, chosen by `spec.aggregator.algorithm`:
//! - `fedavg`: the sample-weighted mean (McMahan et al.): `θ = Σ nᵢ·θᵢ / Σ nᵢ`;
//! - `trimmed-mean`: per coordinate, drop the `trimFraction` (default 0.1, below 0.5) smallest and
//!   largest client values and average the rest, unweighted: robust to a few outlying or poisoned clients.
//!
//! All updates must have the model's shape; zero samples and mismatched shapes are errors, never
//! silently patched.
use std::collections::BTreeMap;

use serde_json::Value;

use super::params::Params;
use super::update::Update;

pub trait Aggregator: Send + Sync {
    fn name(&self) -> &'static str;
    /// The new global model from the round's updates.
    fn aggregate(&self, updates: &[Update]) -> Result<Params, String>;
}

/// The aggregator `algorithm` names, configured by `config` (an error explains what is wrong).
pub fn by_name(algorithm: &str, config: Option<&Value>) -> Result<Box<dyn Aggregator>, String> {
    match algorithm.trim().to_ascii_lowercase().as_str() {
        "fedavg" | "" => Ok(Box::new(FedAvg)),
        "trimmed-mean" | "trimmedmean" | "trimmed_mean" => {
            let fraction = match config.and_then(|c| c.get("trimFraction")) {
                None => 0.1,
                Some(v) => v
                    .as_f64()
                    .ok_or("aggregator.config.trimFraction must be a number")?,
            };
            if !(0.0..0.5).contains(&fraction) {
                return Err(format!(
                    "aggregator.config.trimFraction {fraction} must be at least 0 and below 0.5"
                ));
            }
            Ok(Box::new(TrimmedMean { fraction }))
        }
        other => Err(format!(
            "unknown aggregator.algorithm {other:?}: use fedavg or trimmed-mean"
        )),
    }
}

/// The common shape of all updates, or which one differs.
fn common_shape(updates: &[Update]) -> Result<&Params, String> {
    let first = updates.first().ok_or("no updates to aggregate")?;
    for u in &updates[1..] {
        if u.params.shape != first.params.shape {
            return Err(format!(
                "mismatched update shapes: {} sent {}, {} sent {}",
                first.proplet_id, first.params.shape, u.proplet_id, u.params.shape
            ));
        }
    }
    Ok(&first.params)
}

pub struct FedAvg;

impl Aggregator for FedAvg {
    fn name(&self) -> &'static str {
        "fedavg"
    }

    fn aggregate(&self, updates: &[Update]) -> Result<Params, String> {
        let first = common_shape(updates)?;
        let total: u64 = updates.iter().map(|u| u.num_samples).sum();
        if total == 0 {
            return Err("cannot aggregate: the updates report zero samples in total".into());
        }
        let mut sum = vec![0.0; first.values.len()];
        for u in updates {
            let w = u.num_samples as f64;
            for (s, x) in sum.iter_mut().zip(&u.params.values) {
                *s += w * x;
            }
        }
        Ok(Params {
            shape: first.shape.clone(),
            values: sum.into_iter().map(|s| s / total as f64).collect(),
        })
    }
}

pub struct TrimmedMean {
    pub fraction: f64,
}

impl Aggregator for TrimmedMean {
    fn name(&self) -> &'static str {
        "trimmed-mean"
    }

    fn aggregate(&self, updates: &[Update]) -> Result<Params, String> {
        let first = common_shape(updates)?;
        let k = updates.len();
        let cut = ((k as f64) * self.fraction).floor() as usize;
        let kept = k - 2 * cut;
        let mut values = Vec::with_capacity(first.values.len());
        let mut column = Vec::with_capacity(k);
        for j in 0..first.values.len() {
            column.clear();
            column.extend(updates.iter().map(|u| u.params.values[j]));
            column.sort_by(f64::total_cmp);
            values.push(column[cut..k - cut].iter().sum::<f64>() / kept as f64);
        }
        Ok(Params {
            shape: first.shape.clone(),
            values,
        })
    }
}

/// Sample-weighted means of the numeric metrics clients reported (e.g. loss), per metric.
pub fn mean_metrics(updates: &[Update]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for u in updates {
        for (k, v) in &u.metrics {
            let e = sums.entry(k.clone()).or_default();
            e.0 += v * u.num_samples as f64;
            e.1 += u.num_samples as f64;
        }
    }
    sums.into_iter()
        .filter(|(_, (_, n))| *n > 0.0)
        .map(|(k, (s, n))| (k, s / n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update(p: &str, n: u64, model: Value) -> Update {
        Update::from_value(&json!({"round_id":"round-1","proplet_id":p,"num_samples":n,
            "metrics":{"loss": n as f64},"update":model}))
        .expect("valid")
    }

    #[test]
    fn fedavg_is_the_sample_weighted_mean() {
        let us = [
            update("a", 1, json!({"w":[1.0, 0.0],"b":1.0})),
            update("b", 3, json!({"w":[5.0, 4.0],"b":-1.0})),
        ];
        let m = by_name("fedavg", None)
            .expect("known")
            .aggregate(&us)
            .expect("ok");
        assert_eq!(m.to_json(), json!({"w":[4.0, 3.0],"b":-0.5}));
        assert_eq!(mean_metrics(&us).get("loss"), Some(&2.5));
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let us = [
            update("a", 1, json!([1.0, 2.0])),
            update("b", 1, json!([1.0])),
        ];
        let e = FedAvg.aggregate(&us).expect_err("mismatch");
        assert!(e.contains("mismatched") && e.contains('b'), "{e}");
        let us = [
            update("a", 1, json!([1.0])),
            update("b", 1, json!({"w":[1.0]})),
        ];
        assert!(FedAvg.aggregate(&us).is_err());
    }

    #[test]
    fn trimmed_mean_drops_the_extremes() {
        let us: Vec<Update> = [1.0, 2.0, 3.0, 1000.0, -1000.0]
            .iter()
            .enumerate()
            .map(|(i, x)| update(&format!("p{i}"), 1, json!([x])))
            .collect();
        let cfg = json!({"trimFraction": 0.2});
        let m = by_name("trimmed-mean", Some(&cfg))
            .expect("known")
            .aggregate(&us)
            .expect("ok");
        assert_eq!(m.values, vec![2.0]);
        assert!(by_name("trimmed-mean", Some(&json!({"trimFraction": 0.5}))).is_err());
        assert!(by_name("krum", None).is_err());
    }
}
