//! `pgferry check` for the source: every prerequisite of logical replication that an
//! operator can get wrong, reported one problem per line so all can be fixed at once.

use tokio_postgres::Client;

use super::slot;
use crate::config::Config;
use crate::error::Error;

/// Warnings that do not stop pgferry but that an operator should know: connections
/// whose server certificate is not verified (`sslmode` `disable`, `prefer` or
/// `require`), over which a man in the middle could read PHI or the password.
pub fn warnings(config: &Config) -> Vec<String> {
    use crate::pg::url::SslMode;
    let mut out = Vec::new();
    let urls = std::iter::once(("source.url", &config.source.url))
        .chain(config.sink.as_ref().map(|s| ("sink.url", &s.url)));
    for (key, url) in urls {
        let what = match url.sslmode {
            SslMode::Disable => "sends everything, the password too, in clear text",
            SslMode::Prefer => "falls back to clear text when the server offers no TLS, and does not verify the server",
            SslMode::Require => "encrypts but does not verify the server's certificate",
            SslMode::VerifyCa | SslMode::VerifyFull => continue,
        };
        if url.host.starts_with('/') {
            continue; // a Unix socket never leaves the machine
        }
        out.push(format!(
            "{key}: sslmode={} {what}; use sslmode=verify-full with sslrootcert=<CA file>",
            url.sslmode.as_str()
        ));
    }
    out
}

/// Problems found on the source (empty = ready).
pub async fn check(config: &Config) -> Vec<String> {
    let client = match crate::pg::connect(&config.source.url, "check").await {
        Ok(c) => c,
        Err(e) => {
            let hint = e
                .hint()
                .map(|h| format!(" (hint: {h})"))
                .unwrap_or_default();
            return vec![format!("source.url: cannot connect: {e}{hint}")];
        }
    };
    let mut problems = Vec::new();
    if let Err(e) = run_checks(&client, config, &mut problems).await {
        problems.push(format!("source: a check query failed: {e}"));
    }
    problems
}

fn pg(context: &str) -> impl FnOnce(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::postgres(context.to_string(), e)
}

async fn run_checks(
    client: &Client,
    config: &Config,
    problems: &mut Vec<String>,
) -> Result<(), Error> {
    let source = &config.source;
    let level = slot::show(client, "wal_level").await?;
    if level != "logical" {
        problems.push(format!(
            "source: wal_level is {level}; set wal_level = logical in postgresql.conf and restart PostgreSQL"
        ));
    }

    let encoding = slot::show(client, "server_encoding").await?;
    if encoding != "UTF8" {
        problems.push(format!(
            "source: server_encoding is {encoding}; pgferry supports UTF8 databases only"
        ));
    }

    let slot_exists = slot::slot_info(client, &source.slot).await?;
    let row = client
        .query_one(
            "select current_setting('max_replication_slots')::int, \
                    (select count(*) from pg_replication_slots)::int, \
                    current_setting('max_wal_senders')::int, \
                    (select count(*) from pg_stat_replication)::int",
            &[],
        )
        .await
        .map_err(pg("reading replication limits"))?;
    let (max_slots, slots, max_senders, senders): (i32, i32, i32, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if slot_exists.is_none() && slots >= max_slots {
        problems.push(format!(
            "source: all {max_slots} replication slots are in use (max_replication_slots) and slot {} does not exist yet; \
             raise max_replication_slots or drop an unused slot",
            source.slot
        ));
    }
    if senders >= max_senders {
        problems.push(format!(
            "source: all {max_senders} WAL senders are busy (max_wal_senders); raise max_wal_senders"
        ));
    }

    let row = client
        .query_one(
            "select rolname::text, rolreplication, rolsuper from pg_roles where rolname = current_user",
            &[],
        )
        .await
        .map_err(pg("reading the role"))?;
    let (role, replication, superuser): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
    if !replication && !superuser {
        problems.push(format!(
            "source: role {role} has neither REPLICATION nor SUPERUSER; run ALTER ROLE {role} REPLICATION"
        ));
    }

    for t in &config.tables {
        let at = format!("{} ({})", t.source, t.origin.display());
        let row = client
            .query_opt(
                "select c.oid, c.relreplident::text, \
                        has_table_privilege(c.oid, 'SELECT'), \
                        exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary), \
                        exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisreplident) \
                 from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                 where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')",
                &[&t.source.schema, &t.source.name],
            )
            .await
            .map_err(pg("reading configured tables"))?;
        let Some(row) = row else {
            problems.push(format!("table {at}: does not exist on the source"));
            continue;
        };
        let (identity, select, has_pk, has_identity_index): (String, bool, bool, bool) =
            (row.get(1), row.get(2), row.get(3), row.get(4));
        if !select {
            problems.push(format!(
                "table {at}: role {role} lacks SELECT; run GRANT SELECT ON {} TO {role}",
                t.source.quoted()
            ));
        }
        let usable = match identity.as_str() {
            "d" => has_pk,
            "i" => has_identity_index,
            "f" => true,
            _ => false,
        };
        if !usable {
            let what = match identity.as_str() {
                "n" => "REPLICA IDENTITY NOTHING".to_string(),
                "i" => "a REPLICA IDENTITY index that no longer exists".to_string(),
                _ => "no primary key".to_string(),
            };
            problems.push(format!(
                "table {at}: has {what}, so its updates and deletes cannot be replicated; \
                 add a primary key or run ALTER TABLE {} REPLICA IDENTITY FULL",
                t.source.quoted()
            ));
        } else if !has_pk && t.key.is_none() && identity == "f" {
            problems.push(format!(
                "table {at}: has no primary key; set `key = [...]` in its table file so events have a key"
            ));
        }
        if let Some(p) = slot::key_problem(client, t).await? {
            problems.push(p);
        }
        problems.extend(slot::transform_problems(client, t).await?);
        let oid: u32 = row.get(0);
        let attrs = client
            .query(
                "select attname::text from pg_attribute where attrelid = $1 and attnum > 0 and not attisdropped",
                &[&oid],
            )
            .await
            .map_err(pg("reading table columns"))?;
        let names: Vec<String> = attrs.iter().map(|r| r.get(0)).collect();
        for c in t
            .key
            .iter()
            .flatten()
            .chain(&t.exclude)
            .chain(t.rename.keys())
        {
            if !names.contains(c) {
                problems.push(format!(
                    "table {at}: has no column {c:?} (named in its key, exclude or rename)"
                ));
            }
        }
    }

    if let Some(info) = slot_exists {
        if let Err(e) = slot::check_slot_health(&source.slot, &info) {
            problems.push(format!("source.slot: {e}"));
        } else if info.wal_status.as_deref() == Some("unreserved") {
            problems.push(format!(
                "source.slot: slot {} has wal_status = unreserved: WAL it needs is about to be removed; \
                 let pgferry catch up now or raise max_slot_wal_keep_size",
                source.slot
            ));
        }
        if info.slot_type != "logical" || info.plugin.as_deref() != Some("pgoutput") {
            problems.push(format!(
                "source.slot: slot {} exists but is not a logical pgoutput slot",
                source.slot
            ));
        }
    }
    Ok(())
}
