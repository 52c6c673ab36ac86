//! The Kafka side: the producer stage with durable-ack tracking and backpressure, and
//! the sink's consumer, and the schema registry client.

pub mod acks;
pub mod consumer;
pub mod producer;
pub mod registry;
pub mod state;
