//! The Kafka side: the producer stage with durable-ack tracking and backpressure, and
//! the schema registry client. (The consumer arrives with the sink stage.)

pub mod acks;
pub mod producer;
pub mod registry;
