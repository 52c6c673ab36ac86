//! The Kafka side: the producer stage with durable-ack tracking and backpressure, and
//! the sink's consumer, and the schema registry client.

pub mod acks;
pub mod consumer;
pub mod producer;
pub mod registry;
pub mod state;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// A client-level error that retrying cannot fix: wrong credentials, a certificate
/// that is not trusted, a missing ACL, or librdkafka's own fatal state. librdkafka
/// retries these forever by itself; pgferry stops with the message instead.
pub(crate) fn permanent_client_error(error: &KafkaError, reason: &str) -> bool {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::GroupAuthorizationFailed
            | RDKafkaErrorCode::Fatal,
        ) => true,
        // A handshake cut by a restarting broker is an SSL error too: only a
        // certificate that does not verify is permanent.
        Some(RDKafkaErrorCode::SSL) => reason.contains("certificate"),
        _ => false,
    }
}

/// The operator's message for a permanent client error.
pub(crate) fn permanent_client_message(error: &KafkaError, reason: &str) -> String {
    format!(
        "Kafka refused pgferry: {error}: {reason}; check [kafka.properties] security.protocol, \
         sasl.* credentials, ssl.* certificates and the brokers' ACLs"
    )
}
