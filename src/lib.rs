//! propeller-operator: runs Propeller WebAssembly workloads from Kubernetes custom resources.
pub mod api;
pub mod testbed;
