//! A hub operator's member clusters: registered by Secrets in its namespace ([`registration`]: a
//! kubeconfig of ours, or Argo CD's cluster Secret), probed for what a user needs to see ([`probe`]).
//! Their status lives in `MemberCluster` objects (written by `controllers::member_cluster`). A hub
//! FederatedJob runs on them through `fl::federation` (member jobs, hierarchical aggregation) and
//! `fl::member_models` (member models kept on the hub); [`clients`] holds the hub's client per member.
pub mod clients;
pub mod probe;
pub mod registration;
