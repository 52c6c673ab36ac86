-- Source (EHR) setup for pgferry: a least-privilege replication role, the
-- publication, and the replica identity of each published table.
-- Run as a superuser or the tables' owner:
--   psql "$PGFERRY_SOURCE_URL" -v password="'…'" -f sql/source_setup.sql
-- postgresql.conf must have wal_level = logical (restart needed), and enough
-- max_replication_slots / max_wal_senders for one more of each.

-- The role pgferry connects as: it may stream changes (REPLICATION) and read the
-- published tables (SELECT, for checks and verification), nothing else.
do $$
begin
  create role pgferry login replication;
exception when duplicate_object then
  alter role pgferry login replication;
end $$;
\if :{?password}
alter role pgferry password :password;
\endif

-- The publication is created by the owner, so pgferry's role needs no ownership.
-- pgferry only adds configured tables that are missing (which needs ownership);
-- with this publication in place it never has to.
create publication pgferry for table public.patients;
grant select on public.patients to pgferry;

-- Replica identity: DEFAULT (the primary key) is enough for pgferry to key every
-- update and delete, and keeps WAL small. Choose FULL only for tables without a
-- primary key, or when consumers need complete before images; FULL also lets
-- pgferry fill unchanged TOASTed values from the old row.
alter table public.patients replica identity default;
