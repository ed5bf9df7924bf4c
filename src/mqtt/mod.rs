//! MQTT: the wire types proplets speak, the topic layout, the operator's broker connection and what it
//! subscribes to.
pub mod address;
pub mod backlog;
pub mod client;
pub mod subscriptions;
pub mod topics;
pub mod wire;

pub use client::{MqttClient, MqttSettings};
