//! A hub operator's member clusters: registered by Secrets in its namespace ([`registration`]: a
//! kubeconfig of ours, or Argo CD's cluster Secret), probed for what a user needs to see ([`probe`]).
//! Their status lives in `MemberCluster` objects (written by `controllers::member_cluster`). A hub
//! FederatedJob runs on them through [`fanout`] (member jobs, hierarchical aggregation) and [`hub_store`]
//! (member models kept on the hub).
pub mod clients;
pub mod fanout;
pub mod hub_store;
pub mod probe;
pub mod registration;
