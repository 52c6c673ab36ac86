//! Read-only commands that inspect what pgferry would do: `pgferry schema` prints the
//! Avro key and value schemas of the configured tables as the Kafka stage derives them.

use std::io::Write;

use crate::codec::avro;
use crate::config::{parse_table_name, Config};
use crate::error::Error;
use crate::source::relation::{describe, RelationCache};

/// Print `{"table", "topic", "key", "value"}` for each configured table (or `only`).
pub async fn schema(config: &Config, only: Option<&str>) -> Result<(), Error> {
    let only = match only {
        Some(t) => Some(parse_table_name(t).map_err(|m| Error::operator(format!("--table: {m}")))?),
        None => None,
    };
    let tables: Vec<_> = config
        .tables
        .iter()
        .filter(|t| only.as_ref().is_none_or(|o| &t.source == o))
        .collect();
    if tables.is_empty() {
        return Err(Error::operator(match &only {
            Some(t) => format!("table {t} is not configured in {}", config.path.display()),
            None => format!("{} configures no tables", config.path.display()),
        }));
    }
    let catalog = crate::pg::connect(&config.source.url, "schema").await?;
    let mut cache = RelationCache::new();
    let prefix = &config.kafka.topic_prefix;
    let mut out = std::io::stdout().lock();
    for table in tables {
        let relation = describe(&catalog, table).await?;
        let state = cache.update(&catalog, config, relation).await?;
        let schemas = avro::derive(&state.schema, prefix);
        let doc = serde_json::json!({
            "table": table.source.to_string(),
            "topic": format!("{prefix}.{}.{}", table.source.schema, table.source.name),
            "key": schemas.key,
            "value": schemas.value,
        });
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        writeln!(out, "{text}").map_err(|e| Error::fatal("writing to stdout").with_source(e))?;
    }
    Ok(())
}
