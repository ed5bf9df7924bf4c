//! propeller-operator: runs Propeller WebAssembly workloads from Kubernetes custom resources.
pub mod api;
pub mod config;
pub mod controllers;
pub mod embedded_broker;
pub mod error;
pub mod indexes;
pub mod liveness;
pub mod mqtt;
pub mod naming;
pub mod router;
pub mod run;
pub mod runner;
pub mod sharding;
pub mod sim;
pub mod telemetry;
pub mod testbed;
pub mod wasm;
