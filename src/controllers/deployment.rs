//! The Deployment (and key Secret) of a `type: k8s` proplet.
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, Secret, SecretKeySelector};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::api::proplet::{ClientKey, K8sSpec, Proplet, PropletEnvConfig};
use crate::context::{Context, MANAGER};
use crate::error::{Error, Result};

/// Selector label of the proplet pods (upstream's key, kept so existing selectors match).
pub const POD_LABEL: &str = "propeller.absmach.fr/proplet";
const HASH_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/spec-hash";

pub fn deployment_name(p: &Proplet) -> String {
    format!("{}-proplet", p.name_any())
}

fn key_secret_name(p: &Proplet) -> String {
    format!("{}-proplet-key", p.name_any())
}

fn seconds(d: &kube::core::Duration) -> String {
    std::time::Duration::from(*d).as_secs().to_string()
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn secret_env(name: &str, secret: &str, key: &str, optional: Option<bool>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional,
            }),
            ..Default::default()
        }),
    }
}

/// The proplet's environment, for both proplet generations (PROPLET_DOMAIN_ID/CLIENT_ID/CLIENT_KEY and
/// PROPLET_TENANT_ID/ENTITY_ID/API_KEY), numbers as whole seconds.
pub fn proplet_env(p: &Proplet, k8s: &K8sSpec) -> std::result::Result<Vec<EnvVar>, String> {
    let cc = &p.spec.connection_config;
    let domain = cc.domain().ok_or("domainId is required")?;
    let client = cc.client().ok_or("clientId is required")?;
    let mut vars = vec![
        env("PROPLET_LOG_LEVEL", k8s.log_level.as_str()),
        env("PROPLET_MQTT_ADDRESS", cc.mqtt_address.clone()),
        env("PROPLET_MQTT_TIMEOUT", seconds(&cc.mqtt_timeout)),
        env("PROPLET_MQTT_QOS", cc.mqtt_qos.to_string()),
        env("PROPLET_DOMAIN_ID", domain),
        env("PROPLET_TENANT_ID", domain),
        env("PROPLET_CHANNEL_ID", cc.channel_id.clone()),
        env("PROPLET_CLIENT_ID", client),
        env("PROPLET_ENTITY_ID", client),
        env(
            "PROPLET_MANAGER_K8S_NAMESPACE",
            p.namespace().unwrap_or_default(),
        ),
    ];
    let (secret, key, optional) = match cc.key()? {
        ClientKey::Literal(_) => (key_secret_name(p), "clientKey".to_string(), None),
        ClientKey::Secret(r) => (
            r.name
                .clone()
                .ok_or("clientKeySecretRef.name is required")?,
            r.key.clone(),
            r.optional,
        ),
    };
    vars.push(secret_env("PROPLET_CLIENT_KEY", &secret, &key, optional));
    vars.push(secret_env("PROPLET_API_KEY", &secret, &key, optional));
    if let Some(dir) = &k8s.plugin_dir {
        vars.push(env("PROPLET_PLUGIN_DIR", dir.clone()));
    }
    if let Some(e) = &k8s.env {
        vars.extend(env_config(e));
    }
    Ok(vars)
}

fn env_config(e: &PropletEnvConfig) -> Vec<EnvVar> {
    let mut v = Vec::new();
    let mut s = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            v.push(env(name, value));
        }
    };
    let b = |x: Option<bool>| x.map(|x| x.to_string());
    let text = |x: &Option<String>| x.clone().filter(|x| !x.is_empty());
    s(
        "PROPLET_LIVELINESS_INTERVAL",
        e.liveliness_interval.as_ref().map(seconds),
    );
    s(
        "PROPLET_METRICS_INTERVAL",
        e.metrics_interval.as_ref().map(seconds),
    );
    s(
        "PROPLET_METRICS_PORT",
        e.metrics_port.map(|x| x.to_string()),
    );
    s("PROPLET_METRICS_ENABLED", b(e.metrics_enabled));
    // An explicit empty string is meaningful here: it forces the built-in runtime.
    s(
        "PROPLET_EXTERNAL_WASM_RUNTIME",
        e.external_wasm_runtime.clone(),
    );
    s("PROPLET_HAL_ENABLED", b(e.hal_enabled));
    s("PROPLET_HTTP_ENABLED", b(e.http_enabled));
    s("PROPLET_USB_ENABLED", b(e.usb_enabled));
    s("PROPLET_OTEL_URL", text(&e.otel_url));
    s("PROPLET_TRACE_RATIO", text(&e.trace_ratio));
    s("PROPLET_TAGS", text(&e.tags));
    s("PROPLET_LOCATION", text(&e.location));
    s("PROPLET_DESCRIPTION", text(&e.description));
    s("PROPLET_KBS_URI", text(&e.kbs_uri));
    s("PROPLET_AA_CONFIG_PATH", text(&e.aa_config_path));
    s("PROPLET_MQTT_TLS_CA_CERT", text(&e.mqtt_tls_ca_cert));
    s(
        "PROPLET_MQTT_TLS_CLIENT_CERT",
        text(&e.mqtt_tls_client_cert),
    );
    s("PROPLET_MQTT_TLS_CLIENT_KEY", text(&e.mqtt_tls_client_key));
    s(
        "PROPLET_MQTT_TLS_INSECURE_SKIP_VERIFY",
        b(e.mqtt_tls_insecure_skip_verify),
    );
    v
}

fn quantity(v: &IntOrString) -> Quantity {
    match v {
        IntOrString::Int(i) => Quantity(i.to_string()),
        IntOrString::String(s) => Quantity(s.clone()),
    }
}

/// The desired Deployment.
pub fn desired(p: &Proplet, k8s: &K8sSpec) -> std::result::Result<Deployment, String> {
    let name = p.name_any();
    let env = proplet_env(p, k8s)?;
    let requests: BTreeMap<String, Quantity> = p
        .spec
        .resources
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), quantity(v)))
        .collect();
    let owner = p
        .controller_owner_ref(&())
        .ok_or("the Proplet has no uid yet")?;
    let labels = json!({
        "app.kubernetes.io/name": "proplet",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": MANAGER,
        POD_LABEL: name,
    });
    let spec = json!({
        "replicas": k8s.replicas,
        "selector": {"matchLabels": {POD_LABEL: name}},
        "template": {
            "metadata": {"labels": {POD_LABEL: name, "app.kubernetes.io/name": "proplet"}},
            "spec": {
                "containers": [{
                    "name": "proplet",
                    "image": k8s.image,
                    "imagePullPolicy": k8s.image_pull_policy.clone().unwrap_or_else(|| "IfNotPresent".into()),
                    "env": env,
                    "resources": if requests.is_empty() { json!({}) } else { json!({"requests": requests}) },
                }],
            },
        },
    });
    let mut spec = spec;
    if let Some(selector) = k8s.node_selector.as_ref().filter(|s| !s.is_empty()) {
        spec["template"]["spec"]["nodeSelector"] = json!(selector);
    }
    let hash = content_hash(&spec.to_string());
    let dep = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(p),
            "namespace": p.namespace(),
            "labels": labels,
            "annotations": {HASH_ANNOTATION: hash},
            "ownerReferences": [owner],
        },
        "spec": spec,
    });
    serde_json::from_value(dep).map_err(|e| e.to_string())
}

/// Content hash of the desired spec, so an unchanged desired state costs no write. (Another operator
/// build may hash differently; that costs one re-apply.)
fn content_hash(text: &str) -> String {
    format!("{:016x}", crate::naming::stable_hash(text))
}

/// Creates or updates the Deployment (and the Secret for a literal key) when they differ from the
/// desired state. Returns the Deployment as the API server has it.
pub async fn ensure(
    ctx: &Context,
    p: &Proplet,
    k8s: &K8sSpec,
) -> Result<std::result::Result<Deployment, String>> {
    let ns = p
        .namespace()
        .ok_or_else(|| Error::NoNamespace(p.name_any()))?;
    let want = match desired(p, k8s) {
        Ok(d) => d,
        Err(msg) => return Ok(Err(msg)),
    };
    if let Ok(ClientKey::Literal(key)) = p.spec.connection_config.key() {
        ensure_key_secret(ctx, p, &ns, key).await?;
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let name = deployment_name(p);
    let existing = api.get_opt(&name).await?;
    let want_hash = want.annotations().get(HASH_ANNOTATION).cloned();
    if let Some(d) = existing
        && d.annotations().get(HASH_ANNOTATION) == want_hash.as_ref()
    {
        return Ok(Ok(d));
    }
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&want),
        )
        .await?;
    ctx.metrics.api_write("deployments", "apply");
    Ok(Ok(applied))
}

/// A literal clientKey goes into a Secret owned by the Proplet, so the Deployment never holds it in clear.
async fn ensure_key_secret(ctx: &Context, p: &Proplet, ns: &str, key: &str) -> Result<()> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let name = key_secret_name(p);
    let current = api.get_opt(&name).await?;
    let same = current
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get("clientKey"))
        .is_some_and(|v| v.0 == key.as_bytes());
    if same {
        return Ok(());
    }
    let owner = p.controller_owner_ref(&());
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
                     "labels": {"app.kubernetes.io/managed-by": MANAGER}},
        "type": "Opaque",
        "stringData": {"clientKey": key},
    });
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await?;
    ctx.metrics.api_write("secrets", "apply");
    Ok(())
}
