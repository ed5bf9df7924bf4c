//! Payloads exchanged with proplets, matching what a real Rust proplet sends and accepts
//! (captured on the wire; see docs/wire-format.md).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `control/manager/start`, operator → proplet. The proplet rejects (silently) a start whose `inputs` are
/// not strings, that has neither `file` nor `image_url`, or whose `monitoring_profile` lacks a field.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct StartRequest {
    /// The Task's UID; results come back with it as `task_id`.
    pub id: String,
    /// Export to call.
    pub name: String,
    /// Propeller's task state: 1 = scheduled.
    pub state: u8,
    pub kind: String,
    pub image_url: String,
    /// Standard base64 of the module, or empty.
    pub file: String,
    pub inputs: Vec<String>,
    pub cli_args: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    pub daemon: bool,
    pub broadcast: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    pub encrypted: bool,
    pub kbs_resource_path: String,
    /// The target proplet's clientId; absent for broadcast.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proplet_id: Option<String>,
    pub priority: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub monitoring_profile: Option<WireMonitoringProfile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hal_storage_path: Option<String>,
    /// Results of the task's dependencies, by dependency name (the Propeller manager's field; proplets
    /// ignore it, so `resultsFrom` also puts them into inputs or env).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_results: Option<BTreeMap<String, Value>>,
}

/// Every field is required by the proplet; `interval` is whole seconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct WireMonitoringProfile {
    pub enabled: bool,
    pub interval: u64,
    pub collect_cpu: bool,
    pub collect_memory: bool,
    pub collect_disk_io: bool,
    pub collect_threads: bool,
    pub collect_file_descriptors: bool,
    pub export_to_mqtt: bool,
    pub retain_history: bool,
    pub history_size: u64,
}

/// `control/manager/stop`, operator → proplet. Proplets read only `id`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StopRequest {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proplet_id: Option<String>,
    pub broadcast: bool,
}

/// `control/proplet/alive`: `{"proplet_id":"…","status":"alive","namespace":"…"}`; an embedded proplet's
/// last will says `"status":"offline"`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Alive {
    pub proplet_id: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
}

impl Alive {
    pub fn is_offline(&self) -> bool {
        self.status.as_deref() == Some("offline")
    }
}

/// `control/proplet/create`, sent once at proplet start-up.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Discovery {
    pub proplet_id: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub metadata: Option<DiscoveryMetadata>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct DiscoveryMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplet_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm_runtime: Option<String>,
}

/// `control/proplet/metrics`. `timestamp` is serde's SystemTime object (or a number from embedded
/// proplets); the operator uses its own receive time.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PropletMetrics {
    pub proplet_id: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub timestamp: Option<Value>,
    #[serde(default)]
    pub cpu_metrics: Option<CpuMetrics>,
    #[serde(default)]
    pub memory_metrics: Option<MemoryMetrics>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct CpuMetrics {
    #[serde(default)]
    pub user_seconds: Option<f64>,
    #[serde(default)]
    pub system_seconds: Option<f64>,
    #[serde(default)]
    pub percent: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct MemoryMetrics {
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    #[serde(default)]
    pub heap_alloc_bytes: Option<u64>,
    #[serde(default)]
    pub heap_sys_bytes: Option<u64>,
    #[serde(default)]
    pub heap_inuse_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_usage_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_limit_bytes: Option<u64>,
}

/// `control/proplet/results`. `results` is a string for ordinary tasks and an object for federated
/// ones; `proplet_id` is missing from federated results and from embedded proplets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TaskResult {
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplet_id: Option<String>,
    #[serde(default)]
    pub results: Value,
    #[serde(default)]
    pub error: Option<String>,
}

impl TaskResult {
    /// A non-empty `error` means the task failed.
    pub fn failure(&self) -> Option<&str> {
        self.error.as_deref().filter(|e| !e.is_empty())
    }
}

/// `control/proplet/task_metrics`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TaskMetrics {
    pub task_id: String,
    #[serde(default)]
    pub proplet_id: Option<String>,
    #[serde(default)]
    pub metrics: Option<TaskMetricSample>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TaskMetricSample {
    #[serde(default)]
    pub cpu_percent: Option<f64>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    #[serde(default)]
    pub memory_percent: Option<f64>,
}

/// Why an inbound payload was dropped.
/// `registry/proplet`: a proplet asks for the module named by a task's `image_url`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RegistryRequest {
    pub app_name: String,
}

/// `registry/server`: one piece of a module; a proplet reassembles `total_chunks` distinct indices.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RegistryChunk {
    pub app_name: String,
    pub chunk_idx: usize,
    pub total_chunks: usize,
    /// Standard base64 of the chunk's bytes.
    pub data: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is not JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("payload is not a JSON object")]
    NotAnObject,
}

/// Every message is a JSON object. (serde would also fill a struct from a JSON array, field by field: a
/// message no proplet sends, whose `proplet_id` the cheap peek would not see.)
fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(serde_json::from_slice(payload)?),
        _ => Err(DecodeError::NotAnObject),
    }
}

fn non_empty(v: &str, field: &'static str) -> Result<(), DecodeError> {
    if v.trim().is_empty() {
        Err(DecodeError::Empty(field))
    } else {
        Ok(())
    }
}

/// The `proplet_id` of a message, found without decoding it: the first `"proplet_id"` key followed by a
/// plain string (no escapes). `None` when that is not certain; the caller then decodes the message.
/// Lets a shard drop another shard's heartbeats cheaply (with one channel it hears every proplet's).
pub fn peek_proplet_id(payload: &[u8]) -> Option<&str> {
    // Bytes, not text: only the id is checked for UTF-8 (a whole-payload check would touch every byte of
    // every heartbeat another shard owns). The searcher is built once.
    static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"proplet_id\""));
    let at = KEY.find(payload)? + KEY.needle().len();
    // A second occurrence could be a nested field: only an unambiguous key is trusted.
    if KEY.find(&payload[at..]).is_some() {
        return None;
    }
    let rest = payload[at..].trim_ascii_start().strip_prefix(b":")?;
    let rest = rest.trim_ascii_start().strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

pub fn decode_alive(payload: &[u8]) -> Result<Alive, DecodeError> {
    let m: Alive = decode(payload)?;
    non_empty(&m.proplet_id, "proplet_id")?;
    Ok(m)
}

pub fn decode_discovery(payload: &[u8]) -> Result<Discovery, DecodeError> {
    let m: Discovery = decode(payload)?;
    non_empty(&m.proplet_id, "proplet_id")?;
    Ok(m)
}

pub fn decode_metrics(payload: &[u8]) -> Result<PropletMetrics, DecodeError> {
    let m: PropletMetrics = decode(payload)?;
    non_empty(&m.proplet_id, "proplet_id")?;
    Ok(m)
}

pub fn decode_result(payload: &[u8]) -> Result<TaskResult, DecodeError> {
    let m: TaskResult = decode(payload)?;
    non_empty(&m.task_id, "task_id")?;
    Ok(m)
}

pub fn decode_registry_request(payload: &[u8]) -> Result<RegistryRequest, DecodeError> {
    let m: RegistryRequest = decode(payload)?;
    non_empty(&m.app_name, "app_name")?;
    Ok(m)
}

pub fn decode_task_metrics(payload: &[u8]) -> Result<TaskMetrics, DecodeError> {
    let m: TaskMetrics = decode(payload)?;
    non_empty(&m.task_id, "task_id")?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: serde filled a message from a JSON array, whose `proplet_id` the peek missed.
    #[test]
    fn only_objects_are_messages() {
        let array = r#"["x",null,{"proplet_id":"task_id"}]"#.as_bytes();
        assert!(matches!(decode_alive(array), Err(DecodeError::NotAnObject)));
        assert!(matches!(
            decode_metrics(array),
            Err(DecodeError::NotAnObject)
        ));
        assert!(decode_alive(br#"  {"proplet_id":"a"}"#).is_ok());
    }

    #[test]
    fn a_proplet_id_is_peeked_only_when_certain() {
        let p = br#"{"status":"alive","proplet_id":"edge-7","namespace":"x"}"#;
        assert_eq!(peek_proplet_id(p), Some("edge-7"));
        assert_eq!(peek_proplet_id(br#"{"proplet_id" : "a"}"#), Some("a"));
        // Escapes, a nested second key, a number, garbage: decode instead.
        assert_eq!(peek_proplet_id(br#"{"proplet_id":"a\"b"}"#), None);
        assert_eq!(
            peek_proplet_id(br#"{"proplet_id":"a","x":{"proplet_id":"b"}}"#),
            None
        );
        assert_eq!(peek_proplet_id(br#"{"proplet_id":7}"#), None);
        assert_eq!(peek_proplet_id(b"\xff\xfe"), None);
        assert_eq!(peek_proplet_id(b"{\"proplet_id\":\"\xff\"}"), None);
        assert_eq!(peek_proplet_id(b"{\"proplet_id\":\"a"), None);
        assert_eq!(peek_proplet_id(b"{}"), None);
    }

    // Payloads verbatim from a capture of a real Rust proplet 0.5.0.
    const CREATE: &str = r#"{"proplet_id":"proplet-1","namespace":"propeller-ns","metadata":{"ip":"192.0.2.2","environment":"docker","os":"linux","hostname":"vm","cpu_arch":"x86_64","total_memory_bytes":25276502016,"proplet_version":"0.5.0","wasm_runtime":"wasmtime-internal"}}"#;
    const ALIVE: &str = r#"{"proplet_id":"proplet-1","status":"alive","namespace":"propeller-ns"}"#;
    const METRICS: &str = r#"{"proplet_id":"proplet-1","namespace":"propeller-ns","timestamp":{"secs_since_epoch":1795328917,"nanos_since_epoch":90828823},"cpu_metrics":{"user_seconds":0.01,"system_seconds":0.02,"percent":0.0},"memory_metrics":{"rss_bytes":19402752,"heap_alloc_bytes":0,"heap_sys_bytes":0,"heap_inuse_bytes":0,"container_usage_bytes":3017838592,"container_limit_bytes":9223372036854771712}}"#;
    const RESULT: &str =
        r#"{"task_id":"task-add-1","proplet_id":"proplet-1","results":"30","error":null}"#;
    const FAILED: &str = r#"{"task_id":"task-bad-fn","proplet_id":"proplet-1","results":"","error":"Function 'mul' not found"}"#;
    const FL_RESULT: &str = r#"{"task_id":"t","results":{"task_id":"t","round_id":"round-1","proplet_id":"p","num_samples":1,"update_b64":"e30=","format":"f32-delta","metrics":{}},"error":null}"#;

    #[test]
    fn decodes_captured_proplet_messages() {
        let c = decode_discovery(CREATE.as_bytes()).expect("create");
        assert_eq!(
            c.metadata.and_then(|m| m.total_memory_bytes),
            Some(25276502016)
        );
        let a = decode_alive(ALIVE.as_bytes()).expect("alive");
        assert!(!a.is_offline());
        let m = decode_metrics(METRICS.as_bytes()).expect("metrics");
        assert_eq!(m.memory_metrics.and_then(|m| m.rss_bytes), Some(19402752));
        let r = decode_result(RESULT.as_bytes()).expect("result");
        assert_eq!(r.results, Value::String("30".into()));
        assert_eq!(r.failure(), None);
        let f = decode_result(FAILED.as_bytes()).expect("failed result");
        assert!(f.failure().is_some_and(|e| e.contains("mul")));
        let fl = decode_result(FL_RESULT.as_bytes()).expect("fl result");
        assert!(fl.results.is_object() && fl.proplet_id.is_none());
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for bad in [
            "",
            "null",
            "[]",
            "{}",
            r#"{"proplet_id":""}"#,
            r#"{"proplet_id":7}"#,
            "\u{0}garbage",
        ] {
            assert!(decode_alive(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(decode_result(br#"{"task_id":"  "}"#).is_err());
        assert!(decode_result(br#"{"proplet_id":"p"}"#).is_err());
    }

    #[test]
    fn start_request_has_the_shape_proplets_accept() {
        let start = StartRequest {
            id: "task-add-1".into(),
            name: "add".into(),
            state: 1,
            file: "AGFzbQ==".into(),
            inputs: vec!["10".into(), "20".into()],
            proplet_id: Some("proplet-1".into()),
            ..Default::default()
        };
        let v = serde_json::to_value(&start).expect("serialize");
        assert_eq!(v["inputs"], serde_json::json!(["10", "20"]));
        assert_eq!(v["proplet_id"], "proplet-1");
        assert!(v.get("monitoring_profile").is_none());
        assert!(v["cli_args"].is_array());
    }
}
