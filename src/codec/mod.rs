//! Encodings of the event model. No I/O here: encoders write into buffers the caller
//! owns.

pub mod array;
pub mod avro;
pub mod connect;
pub mod json;
pub mod pgtext;
