//! A hub operator's member clusters: registered by Secrets in its namespace ([`registration`]: a
//! kubeconfig of ours, or Argo CD's cluster Secret), probed for what a user needs to see ([`probe`]).
//! Their status lives in `MemberCluster` objects (written by `controllers::member_cluster`).
pub mod probe;
pub mod registration;
