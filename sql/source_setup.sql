-- Source (EHR) setup for pgferry: a least-privilege replication role, the
-- publication, and the replica identity of each published table.
-- Run as a superuser (or the tables' owner with CREATEROLE), after sql/ehr_schema.sql:
--   psql "$PGFERRY_SOURCE_URL" -v password="'…'" -f sql/source_setup.sql
-- Without -v password the role's password is left as it is.
-- Idempotent: re-running it changes nothing that is already in place.
-- postgresql.conf must have wal_level = logical (restart needed), and enough
-- max_replication_slots / max_wal_senders for one more of each.
\set ON_ERROR_STOP on

-- The role pgferry connects as: it may stream changes (REPLICATION) and read the
-- published tables (SELECT, for the initial copy, `check` and `verify`), nothing
-- else: no superuser, no ownership, no write privilege on any table.
do $$
begin
  create role pgferry login replication;
exception when duplicate_object then
  alter role pgferry login replication;
end $$;
\if :{?password}
alter role pgferry password :password;
\endif

grant select on
  public.patients, public.allergies, public.medications,
  public.doctor_notes, public.visits, public.lab_results
to pgferry;

-- The publication is created here, by the tables' owner, so pgferry's role needs no
-- ownership: pgferry only creates the publication or adds configured tables it
-- lacks (which needs ownership), and with this publication in place it never has to.
-- It publishes inserts, updates, deletes and truncates (the default).
do $$
begin
  if not exists (select from pg_publication where pubname = 'pgferry') then
    create publication pgferry for table
      public.patients, public.allergies, public.medications,
      public.doctor_notes, public.visits, public.lab_results;
  end if;
end $$;

-- An existing publication (e.g. from an earlier version of this file) gets the
-- tables it lacks; tables already in it are left alone.
do $$
declare
  t text;
begin
  foreach t in array array['patients', 'allergies', 'medications',
                           'doctor_notes', 'visits', 'lab_results'] loop
    if not exists (select from pg_publication_tables
                   where pubname = 'pgferry' and schemaname = 'public' and tablename = t) then
      execute format('alter publication pgferry add table public.%I', t);
    end if;
  end loop;
end $$;

-- Replica identity: what the WAL records of a row's old version for UPDATE/DELETE.
--
-- DEFAULT (the primary key) on every table: each of the six has a primary key, and
-- the key is all pgferry needs to apply an update or delete to the target, so WAL
-- stays small. pgferry reads the key of an update from the new row, and PostgreSQL
-- sends the old key only when it changed.
--
-- FULL would log the whole old row on every update and delete: much more WAL
-- (for doctor_notes, the whole note, de-TOASTed, on every update), for before
-- images nobody here needs. Choose it only for a table without a primary key or
-- usable unique index, or when consumers need complete before images.
--
-- doctor_notes.notes is TOASTed (storage external). With DEFAULT, an update that
-- leaves notes unchanged does not send it: pgoutput marks it "unchanged", pgferry
-- carries it as unchanged (never null, never a placeholder), and the sink leaves
-- the target's note_text untouched, which is its correct value. So FULL, which
-- would let pgferry fill the value from the old row, is not needed for correctness.
alter table public.patients     replica identity default;
alter table public.allergies    replica identity default;
alter table public.medications  replica identity default;
alter table public.doctor_notes replica identity default;
alter table public.visits       replica identity default;
alter table public.lab_results  replica identity default;
