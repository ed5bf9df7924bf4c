//! Client updates, in every form a proplet sends them: the FL client's JSON (POSTed to `/update` or
//! published on `fl/rounds/{round}/updates/{proplet}`), with the model in `update`; the same with a
//! `json-f64` vector in `update_b64`; and the proplet's result envelope, whose `update_b64` is the client's
//! stdout (that JSON again).
use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};

use super::params::{Params, kind};

#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub round_id: String,
    pub proplet_id: String,
    pub num_samples: u64,
    /// Numeric metrics only (e.g. loss); others are dropped.
    pub metrics: BTreeMap<String, f64>,
    pub params: Params,
}

fn text(v: &Value, field: &str) -> Result<String, String> {
    match v.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(format!("{field} is {}, not a name", kind(other))),
        None => Err(format!("{field} is missing")),
    }
}

fn decode_b64(s: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim().as_bytes())
        .map_err(|e| format!("update_b64 is not base64: {e}"))
}

impl Update {
    /// Parses an update sent over HTTP or MQTT.
    pub fn parse(payload: &[u8]) -> Result<Update, String> {
        let v: Value = serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
        Self::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Result<Update, String> {
        if !v.is_object() {
            return Err(format!("an update is an object, not {}", kind(v)));
        }
        let round_id = text(v, "round_id")?;
        let proplet_id = text(v, "proplet_id")?;
        let num_samples = match v.get("num_samples") {
            None => return Err("num_samples is missing".into()),
            Some(n) => match n.as_u64() {
                Some(0) => {
                    return Err(
                        "num_samples is 0: an update must say how many samples it was trained on"
                            .into(),
                    );
                }
                Some(n) => n,
                None => {
                    return Err(format!(
                        "num_samples is {}, not a positive integer",
                        kind(n)
                    ));
                }
            },
        };
        let params = match (v.get("update"), v.get("update_b64")) {
            (Some(model), _) if !model.is_null() => {
                Params::from_json(model).map_err(|e| format!("update: {e}"))?
            }
            (_, Some(Value::String(b64))) => {
                let format = v
                    .get("format")
                    .and_then(Value::as_str)
                    .unwrap_or("json-f64");
                if format != "json-f64" {
                    return Err(format!(
                        "update format {format:?} is not supported: send `update` as an object of \
                         numbers and number lists, or update_b64 in json-f64"
                    ));
                }
                let bytes = decode_b64(b64)?;
                let vector: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("update_b64 is not a JSON list of numbers: {e}"))?;
                if !vector.is_array() {
                    return Err("update_b64 is not a JSON list of numbers".into());
                }
                Params::from_json(&vector).map_err(|e| format!("update_b64: {e}"))?
            }
            _ => return Err("the update carries no model (`update` or `update_b64`)".into()),
        };
        let metrics = v
            .get("metrics")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, x)| Some((k.clone(), x.as_f64().filter(|f| f.is_finite())?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Update {
            round_id,
            proplet_id,
            num_samples,
            metrics,
            params,
        })
    }

    /// The update inside a proplet's FL result envelope (`results` of `control/proplet/results`): its
    /// `update_b64` holds the FL client's stdout, the same JSON the proplet POSTs.
    pub fn from_result_envelope(results: &Value) -> Result<Update, String> {
        let b64 = results
            .get("update_b64")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or("the result envelope has no update_b64 (the client printed nothing)")?;
        let bytes = decode_b64(b64)?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(inner) if inner.is_object() => Self::from_value(&inner),
            // A json-f64 vector: the envelope itself says who and how many samples.
            Ok(Value::Array(_)) => Self::from_value(&json!({
                "round_id": results.get("round_id"), "proplet_id": results.get("proplet_id"),
                "num_samples": results.get("num_samples"), "update_b64": b64,
                "format": results.get("format").and_then(Value::as_str).unwrap_or("json-f64"),
                "metrics": results.get("metrics"),
            })),
            _ => Err("the result envelope's update_b64 is not an update".into()),
        }
    }

    /// The stored form (parsed again by [`Update::from_value`]).
    pub fn to_json(&self) -> Value {
        json!({
            "round_id": self.round_id,
            "proplet_id": self.proplet_id,
            "num_samples": self.num_samples,
            "metrics": self.metrics,
            "update": self.params.to_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_demo_clients_update() {
        let body = br#"{"round_id":"round-1","proplet_id":"p1","base_model_uri":"fl/models/global_model_v0",
            "num_samples":100,"metrics":{"loss":0.71,"note":"x"},"update":{"w":[0.12,-0.4,0.9],"b":0.05}}"#;
        let u = Update::parse(body).expect("parses");
        assert_eq!((u.round_id.as_str(), u.num_samples), ("round-1", 100));
        assert_eq!(u.metrics.get("loss"), Some(&0.71));
        assert!(!u.metrics.contains_key("note"));
        assert_eq!(Update::from_value(&u.to_json()).expect("round trip"), u);
    }

    #[test]
    fn reads_json_f64_vectors_and_result_envelopes() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("[1.0,2.0]");
        let env = json!({"round_id":"round-2","proplet_id":"p","num_samples":3,"update_b64":b64,"format":"json-f64"});
        let u = Update::from_value(&env).expect("vector");
        assert_eq!(u.params.values, vec![1.0, 2.0]);
        let stdout = br#"{"round_id":"round-1","proplet_id":"p1","num_samples":5,"update":{"w":[1.0],"b":2.0}}"#;
        let envelope = json!({"task_id":"t","round_id":"round-1","proplet_id":"p1","num_samples":1,
            "update_b64": base64::engine::general_purpose::STANDARD.encode(stdout),"format":"f32-delta","metrics":{}});
        let u = Update::from_result_envelope(&envelope).expect("envelope");
        assert_eq!(u.num_samples, 5);
    }

    #[test]
    fn refuses_bad_updates_with_a_reason() {
        let cases: [(&[u8], &str); 5] = [
            (b"{", "not JSON"),
            (br#"{"round_id":"r","proplet_id":"p","num_samples":0,"update":[1]}"#, "num_samples is 0"),
            (br#"{"round_id":"r","proplet_id":"p","num_samples":1}"#, "carries no model"),
            (br#"{"round_id":"r","proplet_id":"p","num_samples":1,"update_b64":"AAAA","format":"f32-delta"}"#, "not supported"),
            (br#"{"proplet_id":"p","num_samples":1,"update":[1]}"#, "round_id is missing"),
        ];
        for (body, why) in cases {
            let e = Update::parse(body).expect_err("refused");
            assert!(e.contains(why), "{e}");
        }
    }
}
