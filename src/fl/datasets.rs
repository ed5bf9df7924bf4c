//! Participants' training data, served to proplets at `DATA_STORE_URL/datasets/{clientId}`: ConfigMaps in
//! the experiment's namespace labelled with the FederatedJob's `spec.dataset`, each key `{clientId}.json`
//! one participant's data. One ConfigMap per participant or one holding every participant: the same rule.
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};

/// The label naming the dataset a ConfigMap belongs to.
pub const DATASET_LABEL: &str = "propeller.propeller.abstractmachines.fr/dataset";

/// The ConfigMap key holding `client_id`'s data.
pub fn key_for(client_id: &str) -> String {
    format!("{client_id}.json")
}

/// `client_id`'s data in `dataset`, if a ConfigMap of that dataset has it (the first in name order wins).
pub async fn participant_data(
    client: &kube::Client,
    namespace: &str,
    dataset: &str,
    client_id: &str,
) -> Result<Option<String>, kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{DATASET_LABEL}={dataset}");
    let mut maps = api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    maps.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let key = key_for(client_id);
    Ok(maps
        .into_iter()
        .find_map(|m| m.data.and_then(|mut d| d.remove(&key))))
}
