//! Liveness and readiness shared between the stages and the HTTP server.
//! A stage sets its flag when it is streaming and clears it when it is not.

use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
pub struct Health {
    source_streaming: AtomicBool,
    sink_streaming: AtomicBool,
    /// Which stages this process runs (set once at start).
    sink_enabled: AtomicBool,
    source_enabled: AtomicBool,
}

impl Health {
    pub fn new(source: bool, sink: bool) -> Self {
        let h = Health::default();
        h.source_enabled.store(source, Ordering::Relaxed);
        h.sink_enabled.store(sink, Ordering::Relaxed);
        h
    }

    pub fn set_source_streaming(&self, on: bool) {
        self.source_streaming.store(on, Ordering::Relaxed);
    }

    pub fn set_sink_streaming(&self, on: bool) {
        self.sink_streaming.store(on, Ordering::Relaxed);
    }

    pub fn source_streaming(&self) -> bool {
        self.source_streaming.load(Ordering::Relaxed)
    }

    /// Ready when every enabled stage is streaming.
    pub fn ready(&self) -> bool {
        let source = !self.source_enabled.load(Ordering::Relaxed)
            || self.source_streaming.load(Ordering::Relaxed);
        let sink = !self.sink_enabled.load(Ordering::Relaxed)
            || self.sink_streaming.load(Ordering::Relaxed);
        source && sink
    }
}
