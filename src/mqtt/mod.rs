//! MQTT: the wire types proplets speak, the topic layout, and the operator's one broker connection.
pub mod address;
pub mod client;
pub mod topics;
pub mod wire;

pub use client::{MqttClient, MqttSettings};
