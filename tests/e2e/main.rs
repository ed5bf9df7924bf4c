//! End-to-end tests on real parts: a kube-apiserver + etcd + kube-controller-manager (or the cluster named
//! by `E2E_KUBECONFIG`) and Debian's mosquitto. One test binary, so all tests share one local cluster.
mod core;
mod durability;
mod federated;
mod federated_cli;
mod fleet;
mod hub;
mod job_backend;
mod multicluster;
mod observability;
mod parity;
mod samples;
mod secrets;
mod sharding;
mod support;
mod testbed_smoke;
mod validation;
mod workflows;
