//! pgferry: change-data-capture from PostgreSQL to Kafka and back into PostgreSQL.
//!
//! ```text
//! EHR Postgres ──(replication, pgoutput)──▶ source ──▶ codec (Avro) ──▶ kafka producer ──▶ topics
//!                                             ▲                                   │
//!                           confirm LSN ◀─────┴────── durable acks ◀──────────────┘
//! topics ──▶ kafka consumer ──▶ codec ──▶ sink (map, batch apply + checkpoint) ──▶ hospital Postgres
//! ```
//!
//! One event model ([`event`]) flows through every stage; stages talk through bounded
//! channels; the wiring lives in [`pipeline`].

pub mod budget;
pub mod codec;
pub mod config;
pub mod error;
pub mod event;
pub mod generate;
pub mod health;
pub mod http;
pub mod inspect;
pub mod kafka;
pub mod lsn;
pub mod metrics;
pub mod pg;
pub mod pipeline;
pub mod sink;
pub mod source;
pub mod state;
pub mod systemd;
pub mod timestamp;
