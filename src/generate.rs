//! `pgferry generate`: realistic EHR activity for the demo and for load — new
//! patients, visits, doctor notes (some large enough to be TOASTed), medication starts
//! and stops, allergies, lab results, and some deletes. Deterministic for a seed (the
//! same choices and values in the same order), and it refers only to rows that exist:
//! it tracks the ids it reads at start and creates or deletes as it goes.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::error::Error;
use crate::pg::PgUrl;

/// splitmix64: small, fast, and the same sequence for the same seed everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn uuid(&mut self) -> String {
        let (a, b) = (self.next(), self.next());
        let b = (b & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
        let a = (a & 0xFFFF_FFFF_FFFF_0FFF) | 0x4000;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xFFFF,
            a & 0xFFFF,
            b >> 48,
            b & 0xFFFF_FFFF_FFFF
        )
    }
}

const FIRST: &[&str] = &[
    "Ada", "Grace", "Alan", "Mary", "John", "Fatima", "Wei", "Olga", "Kwame", "Priya", "Lucas",
    "Sofia",
];
const LAST: &[&str] = &[
    "Smith", "Jones", "Khan", "Nguyen", "Garcia", "Okafor", "Müller", "Rossi", "Tanaka", "Silva",
];
const ALLERGIES: &[&str] = &[
    "Penicillin",
    "Peanuts",
    "Latex",
    "Shellfish",
    "Pollen",
    "Aspirin",
];
const SEVERITY: &[&str] = &["Low", "Medium", "High"];
const DRUGS: &[&str] = &[
    "Amoxicillin",
    "Metformin",
    "Atorvastatin",
    "Lisinopril",
    "Omeprazole",
    "Salbutamol",
];
const VISIT_TYPES: &[&str] = &["routine", "emergency", "follow_up", "telehealth"];
const TESTS: &[(&str, &str)] = &[
    ("HbA1c", "%"),
    ("Creatinine", "mg/dL"),
    ("Potassium", "mmol/L"),
    ("CRP", "mg/L"),
];
const PHRASES: &[&str] = &[
    "Patient reports improvement since last visit.",
    "Blood pressure within normal range.",
    "Advised to continue current medication and return in four weeks.",
    "Mild oedema noted in both ankles.",
    "Discussed diet and exercise plan in detail.",
];

/// What one run did, by kind.
#[derive(Debug, Default)]
struct Counts {
    patients: u64,
    visits: u64,
    notes: u64,
    medications: u64,
    allergies: u64,
    labs: u64,
    deletes: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.patients
            + self.visits
            + self.notes
            + self.medications
            + self.allergies
            + self.labs
            + self.deletes
    }
}

pub struct Options {
    pub url: String,
    pub rate: u32,
    pub duration: Duration,
    pub seed: u64,
    /// Patients to insert first, each with a history (visits, notes, medications,
    /// allergies, lab results), in a few set-based statements.
    pub preload: u64,
}

/// A history of `n` patients, as an EHR that has been in use for years holds it: per
/// patient three visits, two doctor notes (one in five long enough to be TOASTed),
/// one or two medications, four lab results, and for one in three an allergy.
async fn preload(client: &Client, n: u64, seed: u64) -> Result<(), Error> {
    let started = Instant::now();
    let seed = (seed % 1000) as f64 / 1000.0;
    let sql = format!(
        "select setseed({seed});
         insert into patients (name, dob, gender, contact_number, email, address, ssn, created_at)
         select (array['Margaret','James','Aisha','Oliver','Priya','Thomas','Chloe','Mohammed','Eleanor','Daniel'])[1 + g % 10]
                  || ' ' || (array['Smith','O''Connell','Patel','Jones','Nowak','Williams','Okafor','Brown','Taylor','Whitfield'])[1 + (g / 10) % 10],
                date '1930-01-01' + (random() * 32000)::int,
                case when g % 2 = 0 then 'F' else 'M' end,
                '+44 7' || lpad((g * 7919 % 1000000000)::text, 9, '0'),
                'patient' || g || '@example.org',
                (g % 240 + 1) || ' ' || (array['Harbour View Road','Mill Lane','Station Road','Church Street'])[1 + g % 4] || ', Leeds',
                lpad((g::bigint * 104729 % 1000000000)::text, 9, '0'),
                now() - (random() * 3650)::int * interval '1 day'
         from generate_series(1, {n}) g;
         create temp table preloaded on commit drop as
           select id, (row_number() over (order by created_at, id))::int as g from patients;
         insert into visits (patient_id, doctor_id, type_of_visit, visit_date, notes)
         select p.id, 1 + (p.g * 7 + v) % 40, (array['routine','emergency','follow_up','telehealth']::visit_type[])[1 + (p.g + v) % 4],
                now() - (random() * 1800)::int * interval '1 day', 'Visit ' || v || ': seen and examined.'
         from preloaded p cross join generate_series(1, 3) v;
         insert into doctor_notes (patient_id, doctor_id, visit_date, notes, detail)
         select p.id, 1 + (p.g + v) % 40, now() - (random() * 1800)::int * interval '1 day',
                case when (p.g + v) % 5 = 0
                     then (select string_agg(md5(p.g::text || v::text || k::text), ' ') from generate_series(1, 400) k)
                     else 'Reviewed; plan unchanged. Follow up in ' || (p.g % 12 + 1) || ' weeks.' end,
                jsonb_build_object('bp', 110 + p.g % 40, 'pulse', 60 + p.g % 30)
         from preloaded p cross join generate_series(1, 2) v;
         insert into medications (patient_id, medication_name, dosage, frequency, start_date, end_date)
         select p.id, (array['metformin','amlodipine','atorvastatin','salbutamol','levothyroxine'])[1 + (p.g + v) % 5],
                (5 * (1 + p.g % 8)) || ' mg', (array['OD','BD','TDS'])[1 + p.g % 3],
                current_date - (p.g % 900), case when v = 2 then current_date - (p.g % 30) end
         from preloaded p cross join generate_series(1, 1 + p.g % 2) v;
         insert into allergies (patient_id, allergy_type, severity, notes)
         select p.id, (array['penicillin','peanuts','latex','shellfish'])[1 + p.g % 4],
                (array['Low','Medium','High'])[1 + p.g % 3], 'Reported by patient'
         from preloaded p where p.g % 3 = 0;
         insert into lab_results (patient_id, test_name, value, unit, taken_at)
         select p.id, (array['HbA1c','Potassium','Creatinine','Haemoglobin'])[1 + v % 4],
                round((random() * 100)::numeric, 3), (array['mmol/mol','mmol/L','umol/L','g/L'])[1 + v % 4],
                now() - (random() * 1800)::int * interval '1 day'
         from preloaded p cross join generate_series(1, 4) v;"
    );
    client
        .batch_execute(&format!("begin; {sql} commit;"))
        .await
        .map_err(|e| Error::postgres("preloading the EHR history", e))?;
    eprintln!(
        "generate: preloaded {n} patients with their visits, notes, medications, allergies and lab results in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn generate(opts: Options) -> Result<(), Error> {
    let url = PgUrl::parse(&opts.url).map_err(|e| Error::operator(format!("--url: {e}")))?;
    let client = crate::pg::connect(&url, "generate").await?;
    let has_schema: bool = client
        .query_one("select to_regclass('public.patients') is not null and to_regclass('public.lab_results') is not null", &[])
        .await
        .map_err(|e| Error::postgres("checking the EHR schema", e))?
        .get(0);
    if !has_schema {
        return Err(Error::operator(format!("{url} has no EHR schema"))
            .with_hint("load it first: psql \"$URL\" -f sql/ehr_schema.sql"));
    }
    if opts.preload > 0 {
        preload(&client, opts.preload, opts.seed).await?;
    }
    let mut patients: Vec<String> = client
        .query("select id::text from patients order by id", &[])
        .await
        .map_err(|e| Error::postgres("reading patients", e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut rng = Rng(opts.seed);
    let mut counts = Counts::default();
    let period = Duration::from_secs_f64(1.0 / f64::from(opts.rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut last_report = Instant::now();
    let shutdown = tokio_util::sync::CancellationToken::new();
    crate::pipeline::cancel_on_signals(shutdown.clone());
    while start.elapsed() < opts.duration && !shutdown.is_cancelled() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        step(&client, &mut rng, &mut patients, &mut counts).await?;
        if last_report.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "generate: {} changes in {:.0}s of {:.0}s (patients {}, visits {}, notes {}, medications {}, allergies {}, labs {}, deletes {})",
                counts.total(),
                start.elapsed().as_secs_f64(),
                opts.duration.as_secs_f64(),
                counts.patients,
                counts.visits,
                counts.notes,
                counts.medications,
                counts.allergies,
                counts.labs,
                counts.deletes
            );
            last_report = Instant::now();
        }
    }
    eprintln!(
        "generate: done, {} changes ({} patients now)",
        counts.total(),
        patients.len()
    );
    Ok(())
}

async fn step(
    client: &Client,
    rng: &mut Rng,
    patients: &mut Vec<String>,
    counts: &mut Counts,
) -> Result<(), Error> {
    let pg = |what: &'static str| move |e| Error::postgres(format!("generate: {what}"), e);
    // Too few patients: create one whatever the dice say, so others have someone to refer to.
    let roll = if patients.len() < 5 {
        0
    } else {
        rng.below(100)
    };
    match roll {
        0..=14 => {
            let id = rng.uuid();
            let name = format!("{} {}", rng.pick(FIRST), rng.pick(LAST));
            let dob = format!(
                "{}-{:02}-{:02}",
                1930 + rng.below(90),
                1 + rng.below(12),
                1 + rng.below(28)
            );
            let gender = rng.pick(&["M", "F"]);
            let phone = format!("+44 7{:09}", rng.below(1_000_000_000));
            let email = format!(
                "{}{}@example.org",
                name.to_lowercase().replace(' ', "."),
                rng.below(1000)
            );
            let address = format!("{} {} Road, Leeds", 1 + rng.below(300), rng.pick(LAST));
            let ssn = format!(
                "{:03}-{:02}-{:04}",
                rng.below(1000),
                rng.below(100),
                rng.below(10000)
            );
            client
                .execute(
                    "insert into patients (id, name, dob, gender, contact_number, email, address, ssn) \
                     values ($1::text::uuid, $2, $3::text::date, $4, $5, $6, $7, $8)",
                    &[&id, &name, &dob, &gender, &phone, &email, &address, &ssn],
                )
                .await
                .map_err(pg("inserting a patient"))?;
            patients.push(id);
            counts.patients += 1;
        }
        15..=39 => {
            let patient = &patients[rng.below(patients.len())];
            let id = rng.uuid();
            let kind = rng.pick(VISIT_TYPES);
            let doctor = 1 + rng.below(10) as i32;
            client
                .execute(
                    "insert into visits (visit_id, patient_id, doctor_id, type_of_visit, visit_date, notes) \
                     values ($1::text::uuid, $2::text::uuid, $3, $4::text::visit_type, now(), $5)",
                    &[&id, patient, &doctor, &kind, &rng.pick(PHRASES)],
                )
                .await
                .map_err(pg("inserting a visit"))?;
            counts.visits += 1;
        }
        40..=59 => {
            let patient = &patients[rng.below(patients.len())];
            // One note in five is long enough to be stored out of line (TOAST).
            let sentences = if rng.below(5) == 0 { 400 } else { 3 };
            let text: Vec<&str> = (0..sentences).map(|_| rng.pick(PHRASES)).collect();
            let detail = format!(
                "{{\"bp\": [{}, {}], \"pain\": {}}}",
                100 + rng.below(60),
                60 + rng.below(30),
                rng.below(10)
            );
            let doctor = 1 + rng.below(10) as i32;
            client
                .execute(
                    "insert into doctor_notes (patient_id, doctor_id, visit_date, notes, detail) \
                     values ($1::text::uuid, $2, now(), $3, $4::text::jsonb)",
                    &[patient, &doctor, &text.join(" "), &detail],
                )
                .await
                .map_err(pg("inserting a doctor note"))?;
            counts.notes += 1;
        }
        60..=71 => {
            let patient = &patients[rng.below(patients.len())];
            if rng.below(3) == 0 {
                // Stop a running medication of this patient, if any.
                client
                    .execute(
                        "update medications set end_date = current_date where medication_id = \
                         (select medication_id from medications where patient_id = $1::text::uuid and end_date is null \
                          order by medication_id limit 1)",
                        &[patient],
                    )
                    .await
                    .map_err(pg("stopping a medication"))?;
            } else {
                let dose = format!("{} mg", 5 * (1 + rng.below(100)));
                client
                    .execute(
                        "insert into medications (patient_id, medication_name, dosage, frequency, start_date) \
                         values ($1::text::uuid, $2, $3, $4, current_date)",
                        &[patient, &rng.pick(DRUGS), &dose, &rng.pick(&["once daily", "twice daily", "as needed"])],
                    )
                    .await
                    .map_err(pg("starting a medication"))?;
            }
            counts.medications += 1;
        }
        72..=83 => {
            let patient = &patients[rng.below(patients.len())];
            let allergy = rng.pick(ALLERGIES);
            let severity = rng.pick(SEVERITY);
            // Update the patient's allergy of that type, or record a new one.
            let updated = client
                .execute(
                    "update allergies set severity = $3 where patient_id = $1::text::uuid and allergy_type = $2",
                    &[patient, &allergy, &severity],
                )
                .await
                .map_err(pg("updating an allergy"))?;
            if updated == 0 {
                let id = rng.uuid();
                client
                    .execute(
                        "insert into allergies (id, patient_id, allergy_type, severity, notes) \
                         values ($1::text::uuid, $2::text::uuid, $3, $4, $5)",
                        &[&id, patient, &allergy, &severity, &"reported by patient"],
                    )
                    .await
                    .map_err(pg("inserting an allergy"))?;
            }
            counts.allergies += 1;
        }
        84..=95 => {
            let patient = &patients[rng.below(patients.len())];
            let (test, unit) = TESTS[rng.below(TESTS.len())];
            let value = format!("{}.{:03}", rng.below(200), rng.below(1000));
            client
                .execute(
                    "insert into lab_results (patient_id, test_name, value, unit, taken_at) \
                     values ($1::text::uuid, $2, $3::text::numeric, $4, now())",
                    &[patient, &test, &value, &unit],
                )
                .await
                .map_err(pg("inserting a lab result"))?;
            counts.labs += 1;
        }
        _ => {
            // Deletes: mostly a visit, now and then a whole patient (cascading).
            if rng.below(4) == 0 && patients.len() > 5 {
                let i = rng.below(patients.len());
                let patient = patients.swap_remove(i);
                client
                    .execute(
                        "delete from patients where id = $1::text::uuid",
                        &[&patient],
                    )
                    .await
                    .map_err(pg("deleting a patient"))?;
            } else {
                let patient = &patients[rng.below(patients.len())];
                client
                    .execute(
                        "delete from visits where visit_id = \
                         (select visit_id from visits where patient_id = $1::text::uuid order by visit_id limit 1)",
                        &[patient],
                    )
                    .await
                    .map_err(pg("deleting a visit"))?;
            }
            counts.deletes += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_values() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        for _ in 0..100 {
            assert_eq!(a.uuid(), b.uuid());
        }
        assert_ne!(Rng(7).uuid(), Rng(8).uuid());
        let u = Rng(1).uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4", "version 4 layout: {u}");
    }
}
