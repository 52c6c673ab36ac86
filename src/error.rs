//! The one error type of pgferry: a kind that decides the policy, a context that says
//! what was being done (naming the file, key, table, topic or offset at fault), an
//! optional hint for the operator, and the underlying cause.
//!
//! Policies by kind:
//! - [`ErrorKind::Transient`]: retry after a delay (network, server restart, broker down).
//! - [`ErrorKind::Operator`]: an operator must change something (config, grants, server
//!   settings); retrying will not help. Exit code 2.
//! - [`ErrorKind::Fatal`]: the stage cannot go on safely (a lost slot, a poison event);
//!   stop without moving progress past it. Exit code 1.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth retrying after a delay.
    Transient,
    /// Needs an operator to change configuration, grants or server settings.
    Operator,
    /// Stop the stage; progress must not move past the cause.
    Fatal,
}

impl ErrorKind {
    /// A short label for logs and the `kind` label of `pgferry_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Operator => "operator",
            ErrorKind::Fatal => "fatal",
        }
    }
}

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

pub struct Error {
    kind: ErrorKind,
    context: String,
    hint: Option<String>,
    source: Option<Cause>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            hint: None,
            source: None,
        }
    }

    pub fn transient(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, context)
    }

    pub fn operator(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Operator, context)
    }

    pub fn fatal(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, context)
    }

    pub fn with_source(mut self, source: impl Into<Cause>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Wrap a PostgreSQL client error, classifying it by SQLSTATE (mapped once, here).
    /// The server's own text is kept only where it cannot carry row values (see
    /// [`postgres_summary`]); the whole of it goes to the debug log.
    pub fn postgres(context: impl Into<String>, err: tokio_postgres::Error) -> Self {
        let kind = match err.code() {
            Some(code) => sqlstate_kind(code.code()),
            None => ErrorKind::Transient,
        };
        let mut e = Self::new(kind, context);
        if let Some(db) = err.as_db_error() {
            if let Some(hint) = db.hint().filter(|_| message_is_safe(db.code().code())) {
                e.hint = Some(hint.to_string());
            }
        }
        tracing::debug!(error = %err, context = %e.context, "PostgreSQL error, in full (may carry values)");
        e.with_source(PgSummary(postgres_summary(&err)))
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// Prefix the context with an outer step ("starting replication: …").
    pub fn context(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }
}

/// Classify a SQLSTATE. Connection, resource and shutdown classes are transient;
/// authorization and privilege problems need the operator; the rest is fatal.
pub fn sqlstate_kind(code: &str) -> ErrorKind {
    // object_in_use: e.g. "replication slot is active for PID …" right after a crash,
    // until the server notices the old connection is gone.
    if code == "55006" {
        return ErrorKind::Transient;
    }
    match code.get(..2).unwrap_or("") {
        // connection exception, insufficient resources, operator intervention
        // (admin shutdown, crash recovery), transaction rollback (serialization)
        "08" | "53" | "57" | "40" => ErrorKind::Transient,
        // invalid authorization, invalid catalog name (no such database)
        "28" | "3D" => ErrorKind::Operator,
        // insufficient privilege, undefined table/object, object in use
        "42" | "55" => ErrorKind::Operator,
        _ => ErrorKind::Fatal,
    }
}

/// A PostgreSQL error as pgferry shows it above debug level.
#[derive(Debug)]
struct PgSummary(String);

impl fmt::Display for PgSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PgSummary {}

/// Classes whose messages name objects and settings, never row values. Data exceptions
/// (22), integrity violations (23, whose DETAIL is `Key (mrn)=(…)`) and the rest may
/// quote a value, so only their SQLSTATE and the names of the objects involved show.
fn message_is_safe(code: &str) -> bool {
    matches!(
        code.get(..2).unwrap_or(""),
        "08" | "28" | "3D" | "3F" | "42" | "53" | "55" | "57" | "58"
    )
}

/// A PHI-free description of a PostgreSQL error: SQLSTATE, the objects it names
/// (schema, table, column, constraint, data type) and, where safe, the message. Never
/// DETAIL, which quotes values.
pub fn postgres_summary(err: &tokio_postgres::Error) -> String {
    let Some(db) = err.as_db_error() else {
        // Client-side: I/O, TLS, a closed connection, a protocol problem; no row values.
        let mut text = err.to_string();
        let mut next = std::error::Error::source(err);
        while let Some(cause) = next {
            text.push_str(&format!(": {cause}"));
            next = cause.source();
        }
        return text;
    };
    let code = db.code().code();
    let mut out = if message_is_safe(code) {
        format!("{} (SQLSTATE {code})", db.message())
    } else {
        format!("{} (SQLSTATE {code})", sqlstate_class(code))
    };
    let mut names = Vec::new();
    if let (Some(schema), Some(table)) = (db.schema(), db.table()) {
        names.push(format!("table {schema}.{table}"));
    } else if let Some(table) = db.table() {
        names.push(format!("table {table}"));
    }
    for (what, v) in [
        ("column", db.column()),
        ("constraint", db.constraint()),
        ("type", db.datatype()),
    ] {
        if let Some(v) = v {
            names.push(format!("{what} {v}"));
        }
    }
    if !names.is_empty() {
        out.push_str(&format!(" on {}", names.join(", ")));
    }
    out
}

fn sqlstate_class(code: &str) -> &'static str {
    match code {
        "22001" => "a value is too long for its column",
        "22003" => "a numeric value is out of range for its column",
        "22P02" | "22007" | "22008" => "a value is not valid input for its column's type",
        "23502" => "a NOT NULL column got a null",
        "23503" => "a foreign key is violated",
        "23505" => "a unique constraint is violated",
        "23514" => "a check constraint is violated",
        _ => match code.get(..2).unwrap_or("") {
            "22" => "a data exception",
            "23" => "an integrity constraint is violated",
            "25" | "40" => "the transaction failed",
            "P0" => "a trigger or function raised an error",
            _ => "the server refused the statement",
        },
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
            let mut next = source.source();
            while let Some(cause) = next {
                write!(f, ": {cause}")?;
                next = cause.source();
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {self}", self.kind.as_str())?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_policies() {
        assert_eq!(sqlstate_kind("28P01"), ErrorKind::Operator);
        assert_eq!(sqlstate_kind("08006"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("57P01"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("42501"), ErrorKind::Operator);
        assert_eq!(sqlstate_kind("55006"), ErrorKind::Transient);
        assert_eq!(sqlstate_kind("XX000"), ErrorKind::Fatal);
    }

    #[test]
    fn display_chains_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::transient("connecting to 127.0.0.1:1").with_source(io);
        assert_eq!(e.to_string(), "connecting to 127.0.0.1:1: refused");
        assert!(e.is_transient());
    }
}
