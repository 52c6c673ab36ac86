-- EHR (source) demo schema: the clinical system of record that pgferry reads.
--   psql "$PGFERRY_SOURCE_URL" -f sql/ehr_schema.sql
-- Idempotent: every object is created only if missing, so re-running it is safe.
-- Then run sql/source_setup.sql (replication role, publication, replica identity).
-- gen_random_uuid() is built in since PostgreSQL 13 (no pgcrypto needed).

-- The kind of visit. Enum values travel as their label text; the hospital target
-- has the same type (sql/hospital_schema.sql), so the label is cast back exactly.
do $$
begin
  create type public.visit_type as enum ('routine', 'emergency', 'follow_up', 'telehealth');
exception when duplicate_object then null;
end $$;

create table if not exists public.patients (
  id             uuid primary key default gen_random_uuid(),
  name           text not null,
  dob            date not null,
  gender         text check (gender in ('M', 'F')),
  contact_number text,
  email          text,
  address        text,
  -- Social security number: needed by the EHR (billing, identity checks) but the
  -- hospital must never receive it. config/tables/public.patients.toml excludes it,
  -- so it is dropped in pgferry's source stage and never reaches Kafka.
  ssn            text,
  created_at     timestamptz default now()
);

create table if not exists public.allergies (
  id           uuid primary key default gen_random_uuid(),
  patient_id   uuid references public.patients on delete cascade,
  allergy_type text,
  severity     text check (severity in ('Low', 'Medium', 'High')),
  notes        text
);

create table if not exists public.medications (
  -- GENERATED ALWAYS: ids come only from the EHR's own sequence. (The target
  -- column is a plain int: there the values come from the EHR.)
  medication_id   int generated always as identity primary key,
  patient_id      uuid references public.patients on delete cascade,
  medication_name text,
  dosage          text,
  frequency       text,
  start_date      date,
  end_date        date
);

create table if not exists public.doctor_notes (
  note_id    serial primary key,
  patient_id uuid references public.patients on delete cascade,
  -- Refers to the hospital's doctors table (a hospital-only table), so no foreign key here.
  doctor_id  int,
  visit_date timestamptz,
  -- Large free-text clinical note (often tens of kB): it is TOASTed, out of line.
  notes      text,
  detail     jsonb
);
-- STORAGE EXTERNAL: notes are moved out of line without compression once a row
-- exceeds the TOAST threshold (~2 kB), so large notes always live in the TOAST
-- table. That is what makes "unchanged TOAST" updates appear in the demo: an update
-- of another column leaves the TOAST pointer as is, and with REPLICA IDENTITY
-- DEFAULT pgoutput does not resend the value (see sql/source_setup.sql).
-- Re-running this is a no-op; it affects values written from then on.
alter table public.doctor_notes alter column notes set storage external;

create table if not exists public.visits (
  visit_id      uuid primary key default gen_random_uuid(),
  patient_id    uuid references public.patients on delete cascade,
  doctor_id     int,
  type_of_visit public.visit_type,
  visit_date    timestamptz,
  notes         text
);

create table if not exists public.lab_results (
  result_id  bigserial primary key,
  patient_id uuid references public.patients on delete cascade,
  test_name  text,
  -- numeric(10,3): exact decimal lab values (e.g. 5.125 mmol/L), never a float;
  -- pgferry carries it as an Avro decimal with precision 10, scale 3.
  value      numeric(10, 3),
  unit       text,
  taken_at   timestamptz
);

-- Foreign keys do not index the referencing side: these keep ON DELETE CASCADE
-- (deleting a patient) and per-patient lookups from scanning whole tables.
create index if not exists allergies_patient_id_idx    on public.allergies (patient_id);
create index if not exists medications_patient_id_idx  on public.medications (patient_id);
create index if not exists doctor_notes_patient_id_idx on public.doctor_notes (patient_id);
create index if not exists visits_patient_id_idx       on public.visits (patient_id);
create index if not exists lab_results_patient_id_idx  on public.lab_results (patient_id);
