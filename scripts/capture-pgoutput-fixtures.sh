#!/usr/bin/env bash
# Recapture the pgoutput fixtures that the decoder's unit tests read
# (tests/fixtures/pgoutput/*.txt), from a real server with wal_level=logical.
#
#   scripts/capture-pgoutput-fixtures.sh [URL]     (default: $PGFERRY_SOURCE_URL)
#
# Each fixture line is "<lsn> <hex payload>", exactly as pgoutput (proto_version 1,
# messages on) produced it; pg_logical_slot_get_binary_changes gives us the payloads
# without any framing of our own. LSNs, xids and OIDs change from one capture to the
# next, so the tests assert structure and values, never those numbers.
set -euo pipefail

url=${1:-${PGFERRY_SOURCE_URL:?pass a URL or eval "\$(scripts/services.sh env)" first}}
out=$(cd "$(dirname "$0")/.." && pwd)/tests/fixtures/pgoutput
mkdir -p "$out"
slot=pgferry_fixtures
psql_() { PGOPTIONS='-c client_min_messages=warning' psql "$url" -v ON_ERROR_STOP=1 -qAt "$@"; }

psql_ >/dev/null <<'SQL'
select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = 'pgferry_fixtures';
drop schema if exists fixtures cascade;
drop publication if exists pgferry_fixtures;
create schema fixtures;
create type fixtures.mood as enum ('calm', 'tense');
create table fixtures.patients (id int primary key, name text not null, mood fixtures.mood, notes text);
create table fixtures.audit (id bigint primary key, what text, big text);
alter table fixtures.audit replica identity full;
create table fixtures.types (
  id int primary key, b bool, i2 int2, i8 int8, f4 float4, f8 float8, n numeric(12,4),
  nn numeric, m money, u uuid, j jsonb, d date, ts timestamp, tz timestamptz, iv interval,
  by bytea, ai int[], at text[]
);
create table fixtures.toasted (id int primary key, counter int not null, scan text);
alter table fixtures.toasted alter column scan set storage external;
create publication pgferry_fixtures for table fixtures.patients, fixtures.audit, fixtures.types, fixtures.toasted;
select 'x' from pg_create_logical_replication_slot('pgferry_fixtures', 'pgoutput');
SQL

# The workload: each statement outside begin/commit is its own transaction.
psql_ >/dev/null <<'SQL'
begin;
insert into fixtures.patients values (1, 'Ada', 'calm', null), (2, 'Grace', 'tense', 'x');
insert into fixtures.audit values (10, 'created', 'small');
update fixtures.patients set notes = 'seen' where id = 1;
update fixtures.patients set id = 3 where id = 2;
update fixtures.audit set what = 'changed' where id = 10;
delete from fixtures.patients where id = 1;
delete from fixtures.audit where id = 10;
commit;
truncate fixtures.patients, fixtures.audit;
insert into fixtures.types values
  (1, true, -32768, 9223372036854775807, 'NaN', '-Infinity', 12345678.1234, 'NaN', '$1,234.56',
   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"k": [1, "é"]}', 'infinity', '-infinity',
   '2026-11-22 01:02:03.123456+00', '1 year 2 mons 3 days 04:05:06.5', '\x00ff00',
   '{1,NULL,3}', '{"a b","NULL",NULL,"q\"uote"}'),
  (2, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null, null);
insert into fixtures.toasted
  select 1, 0, string_agg(md5(g::text || random()::text), '') from generate_series(1, 400) g;
update fixtures.toasted set counter = counter + 1 where id = 1;
select 'x' from pg_logical_emit_message(false, 'pgferry', 'heartbeat');
begin;
select 'x' from pg_logical_emit_message(true, 'app', 'inside');
insert into fixtures.patients values (5, 'Émilie 🩺', null, null);
commit;
SQL

psql_ -c "select lsn, encode(data, 'hex') from pg_logical_slot_get_binary_changes(
    '$slot', null, null, 'proto_version', '1', 'publication_names', 'pgferry_fixtures', 'messages', 'true')" \
  | tr '|' ' ' > "$out/workload.txt"

psql_ >/dev/null <<'SQL'
select pg_drop_replication_slot('pgferry_fixtures');
drop publication pgferry_fixtures;
drop schema fixtures cascade;
SQL
echo "wrote $(wc -l < "$out/workload.txt") messages to $out/workload.txt" >&2
