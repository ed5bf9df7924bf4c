//! Model parameters as the aggregators see them: a flat list of numbers plus the shape that turns it back
//! into the JSON proplets exchange. Two shapes are in use: Propeller's FL demo models (an object of named
//! numbers and number lists, e.g. `{"w":[…],"b":…}`) and plain vectors (`json-f64`: a JSON array of floats,
//! base64-encoded in `update_b64`).
use serde_json::{Map, Value};

/// How the flat values map back to JSON.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    /// Named fields, in key order: `None` a number, `Some(n)` a list of n numbers.
    Object(Vec<(String, Option<usize>)>),
    /// A list of n numbers.
    Vector(usize),
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shape::Vector(n) => write!(f, "[{n}]"),
            Shape::Object(fields) => {
                let parts: Vec<String> = fields
                    .iter()
                    .map(|(k, n)| match n {
                        None => k.clone(),
                        Some(n) => format!("{k}[{n}]"),
                    })
                    .collect();
                write!(f, "{{{}}}", parts.join(","))
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub shape: Shape,
    pub values: Vec<f64>,
}

fn numbers(v: &[Value], what: &str) -> Result<Vec<f64>, String> {
    v.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| format!("{what}[{i}] is not a finite number"))
        })
        .collect()
}

impl Params {
    /// Reads a model or an update: an object of numbers and number lists, or a list of numbers.
    pub fn from_json(v: &Value) -> Result<Params, String> {
        match v {
            Value::Array(items) => {
                let values = numbers(items, "model")?;
                if values.is_empty() {
                    return Err("the parameter vector is empty".into());
                }
                Ok(Params {
                    shape: Shape::Vector(values.len()),
                    values,
                })
            }
            Value::Object(fields) => {
                let mut keys: Vec<&String> = fields.keys().collect();
                keys.sort();
                let mut shape = Vec::new();
                let mut values = Vec::new();
                for k in keys {
                    match &fields[k] {
                        Value::Number(n) => {
                            let x = n
                                .as_f64()
                                .filter(|f| f.is_finite())
                                .ok_or_else(|| format!("field {k:?} is not a finite number"))?;
                            shape.push((k.clone(), None));
                            values.push(x);
                        }
                        Value::Array(items) => {
                            let xs = numbers(items, k)?;
                            shape.push((k.clone(), Some(xs.len())));
                            values.extend(xs);
                        }
                        _ => {
                            return Err(format!(
                                "field {k:?} is neither a number nor a list of numbers"
                            ));
                        }
                    }
                }
                if values.is_empty() {
                    return Err("the model has no parameters".into());
                }
                Ok(Params {
                    shape: Shape::Object(shape),
                    values,
                })
            }
            other => Err(format!(
                "a model is an object or a list of numbers, not {}",
                kind(other)
            )),
        }
    }

    pub fn to_json(&self) -> Value {
        match &self.shape {
            Shape::Vector(_) => Value::from(self.values.clone()),
            Shape::Object(fields) => {
                let mut out = Map::new();
                let mut at = 0;
                for (k, n) in fields {
                    match n {
                        None => {
                            out.insert(k.clone(), Value::from(self.values[at]));
                            at += 1;
                        }
                        Some(n) => {
                            out.insert(k.clone(), Value::from(self.values[at..at + n].to_vec()));
                            at += n;
                        }
                    }
                }
                Value::Object(out)
            }
        }
    }
}

pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn demo_models_and_vectors_round_trip() {
        let m = json!({"w": [0.5, -1.0, 2.0], "b": 0.25});
        let p = Params::from_json(&m).expect("parses");
        assert_eq!(p.values, vec![0.25, 0.5, -1.0, 2.0]);
        assert_eq!(p.shape.to_string(), "{b,w[3]}");
        assert_eq!(p.to_json(), m);
        let v = json!([1.0, 2.0]);
        assert_eq!(Params::from_json(&v).expect("parses").to_json(), v);
    }

    #[test]
    fn rejects_what_is_not_numbers() {
        for bad in [
            json!({"w": ["x"]}),
            json!({"w": {"nested": 1}}),
            json!([]),
            json!({}),
            json!("model"),
        ] {
            assert!(Params::from_json(&bad).is_err(), "{bad}");
        }
    }
}
