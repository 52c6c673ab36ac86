-- Hospital (target) demo schema: where pgferry's sink applies the EHR's changes.
--   psql "$PGFERRY_TARGET_URL" -f sql/hospital_schema.sql
-- Idempotent: every object is created only if missing, so re-running it is safe.
--
-- Tables fed from the EHR (patients, allergies, medications, doctor_notes, visits,
-- lab_results) have the source's primary keys and column types, so the sink's
-- INSERT ... ON CONFLICT (key) and its casts of the PostgreSQL text of each value
-- are exact. Some columns carry the hospital's own names; config/tables/*.toml maps
-- them with `rename`. The EHR's patients.ssn does not exist here (it is excluded at
-- the source).
--
-- Deliberately absent on the replicated tables:
--   * foreign keys: each source table is its own Kafka topic and the sink applies
--     topics independently, so an allergy may arrive before its patient, or a
--     patient's delete before its allergies' deletes. A foreign key would turn that
--     transient order into a refused ("poison") event. The EHR enforces them.
--   * defaults, identities and sequences: every value comes from the EHR.
-- Check constraints are the EHR's own, so any row the EHR accepts is accepted here.
-- pgferry creates its own pgferry.checkpoints table on first start.

-- Same labels, same order as the EHR's type: values are cast from their label.
do $$
begin
  create type public.visit_type as enum ('routine', 'emergency', 'follow_up', 'telehealth');
exception when duplicate_object then null;
end $$;

-- ------------------------------------------------------- fed from the EHR --

create table if not exists public.patients (
  id             uuid primary key,
  full_name      text not null,          -- EHR: name
  dob            date not null,
  gender         text check (gender in ('M', 'F')),
  phone          text,                   -- EHR: contact_number
  email          text,
  address        text,
  created_at     timestamptz
);

create table if not exists public.allergies (
  id           uuid primary key,
  patient_id   uuid,
  allergy_type text,
  severity     text check (severity in ('Low', 'Medium', 'High')),
  notes        text
);

create table if not exists public.medications (
  medication_id   int primary key,       -- EHR: identity column; here a plain int
  patient_id      uuid,
  medication_name text,
  dosage          text,
  frequency       text,
  start_date      date,
  end_date        date
);

create table if not exists public.doctor_notes (
  note_id    int primary key,            -- EHR: serial; here a plain int
  patient_id uuid,
  doctor_id  int,
  visit_date timestamptz,
  -- EHR: notes. An update in the EHR that leaves the (TOASTed) note unchanged
  -- does not carry it; the sink then leaves this column as it is.
  note_text  text,
  detail     jsonb
);

create table if not exists public.visits (
  visit_id   uuid primary key,
  patient_id uuid,
  doctor_id  int,
  visit_type public.visit_type,          -- EHR: type_of_visit
  visit_date timestamptz,
  notes      text
);

create table if not exists public.lab_results (
  result_id  bigint primary key,         -- EHR: bigserial; here a plain bigint
  patient_id uuid,
  test_name  text,
  value      numeric(10, 3),             -- same precision and scale as the EHR
  unit       text,
  taken_at   timestamptz
);

-- The hospital looks records up by patient.
create index if not exists allergies_patient_id_idx    on public.allergies (patient_id);
create index if not exists medications_patient_id_idx  on public.medications (patient_id);
create index if not exists doctor_notes_patient_id_idx on public.doctor_notes (patient_id);
create index if not exists visits_patient_id_idx       on public.visits (patient_id);
create index if not exists lab_results_patient_id_idx  on public.lab_results (patient_id);

-- ------------------------------------ the hospital's own: pgferry never touches --

create table if not exists public.doctors (
  doctor_id      int primary key,
  name           text not null,
  specialization text,
  contact_number text,
  email          text
);

-- No foreign keys to the replicated patients / medications: they would make the
-- sink's delete of an EHR row fail while an order still refers to it.
create table if not exists public.pharmacy_orders (
  order_id      serial primary key,
  patient_id    uuid,
  medication_id int,
  quantity      int check (quantity > 0),
  order_date    timestamptz default now(),
  status        text not null default 'Pending'
                check (status in ('Pending', 'Delivered', 'Cancelled'))
);
create index if not exists pharmacy_orders_patient_id_idx on public.pharmacy_orders (patient_id);

-- The demo's doctors (the EHR's doctor_id values are 1..10). Existing rows are kept.
insert into public.doctors (doctor_id, name, specialization, contact_number, email) values
  (1,  'Dr. Amara Okafor',    'Cardiology',       '+1-555-0101', 'a.okafor@hospital.example'),
  (2,  'Dr. Lukas Brandt',    'Emergency',        '+1-555-0102', 'l.brandt@hospital.example'),
  (3,  'Dr. Mei Tanaka',      'Pediatrics',       '+1-555-0103', 'm.tanaka@hospital.example'),
  (4,  'Dr. Rafael Ortega',   'Internal Medicine','+1-555-0104', 'r.ortega@hospital.example'),
  (5,  'Dr. Ingrid Solberg',  'Neurology',        '+1-555-0105', 'i.solberg@hospital.example'),
  (6,  'Dr. Kwame Mensah',    'Oncology',         '+1-555-0106', 'k.mensah@hospital.example'),
  (7,  'Dr. Priya Raman',     'Endocrinology',    '+1-555-0107', 'p.raman@hospital.example'),
  (8,  'Dr. Tomasz Nowak',    'Orthopedics',      '+1-555-0108', 't.nowak@hospital.example'),
  (9,  'Dr. Sofia Esposito',  'Dermatology',      '+1-555-0109', 's.esposito@hospital.example'),
  (10, 'Dr. Daniel Cohen',    'General Practice', '+1-555-0110', 'd.cohen@hospital.example')
on conflict (doctor_id) do nothing;
