//! What pgferry remembers about its source outside the process: which server (system
//! identifier, timeline, database), which slot, and how far it may have confirmed it.
//!
//! Why: the server resumes a slot from `confirmed_flush_lsn`. A slot that was dropped
//! and silently re-created, a failover to a server without the slot, or a slot someone
//! advanced all look like "a slot at some position" to a process that remembers
//! nothing, and streaming on would skip every change in between without a word. With
//! the remembered state, [`decide`] stops instead, and re-creating a slot becomes the
//! operator's explicit act (`--accept-data-loss`).
//!
//! The rule kept here: a position is recorded *before* the slot is confirmed to it
//! ([`keep`] publishes the recorded position; the source confirms at most that). So the
//! slot can never legitimately be ahead of the record, and one that is was moved by
//! someone else. A slot *behind* the record is normal: the confirm may not have been
//! sent before a crash, and a source server that crashed keeps only the
//! `confirmed_flush_lsn` of its last checkpoint. Resuming from behind re-sends changes
//! that the sink already applied and skips by position, so nothing is lost or doubled.
//!
//! Where it lives is the caller's choice ([`StateStore`]): `run` keeps it on the Kafka
//! topic `<prefix>._state` (`kafka::state`), `tail` in a file ([`FileStore`]).

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::Error;
use crate::lsn::Lsn;
pub use crate::state::{SnapshotState, SourceState, StateStore};

/// Least time between two writes of the state: the slot's confirmation trails
/// durability by at most about this much.
const RECORD_MIN_GAP: Duration = Duration::from_millis(250);
/// How long one write of the state may take before it is reported as slow (and again
/// at this interval while it lasts): Kafka's writes wait for the brokers without limit,
/// and confirmation waits with them.
const SLOW_SAVE: Duration = Duration::from_secs(30);

/// What the server shows now.
#[derive(Debug, Clone)]
pub struct Observed {
    pub system_identifier: String,
    pub timeline: u32,
    pub database: String,
    /// `None`: the slot does not exist. `Some(None)`: it exists without a confirmed LSN.
    pub slot_confirmed: Option<Option<Lsn>>,
}

/// What to do with the slot at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPlan {
    Create,
    Use,
}

/// Compare the remembered state with the server. Errors are the operator's to resolve;
/// `accept_data_loss` turns each into a warning (the operator said so explicitly).
pub fn decide(
    slot: &str,
    where_: &str,
    remembered: Option<&SourceState>,
    now: &Observed,
    accept_data_loss: bool,
) -> Result<SlotPlan, Error> {
    let plan = if now.slot_confirmed.is_some() {
        SlotPlan::Use
    } else {
        SlotPlan::Create
    };
    let Some(prev) = remembered else {
        if plan == SlotPlan::Use {
            tracing::info!(%slot, "no remembered state ({where_}); adopting the existing slot");
        }
        return Ok(plan);
    };
    let remembered_lsn = prev.confirmed()?;
    let refuse = |what: String, hint: &str| -> Result<SlotPlan, Error> {
        if accept_data_loss {
            tracing::warn!(%slot, problem = %what, "--accept-data-loss: going on; the target must be resynchronised");
            Ok(plan)
        } else {
            Err(Error::fatal(what).with_hint(format!(
                "{hint}; the remembered state is in {where_}. If the loss is understood, start once with \
                 --accept-data-loss (then resynchronise the target)"
            )))
        }
    };
    if prev.system_identifier != now.system_identifier {
        return refuse(
            format!(
                "the source server is not the one pgferry streamed from: system identifier {} (database {}), \
                 but slot {slot} was on {} (database {}) at {remembered_lsn}",
                now.system_identifier, now.database, prev.system_identifier, prev.database
            ),
            "point source.url back at that server; a restored or different cluster does not hold the changes \
             pgferry has not read yet",
        );
    }
    match now.slot_confirmed {
        None => refuse(
            format!(
                "replication slot {slot} is gone from the source (pgferry had read it up to {remembered_lsn}); \
                 changes committed since were not kept for pgferry and are lost to it"
            ),
            "a dropped slot, or a failover to a server without it (PostgreSQL < 17 does not carry logical \
             slots to standbys), causes this",
        ),
        Some(confirmed) => {
            let confirmed = confirmed.unwrap_or_default();
            if confirmed > remembered_lsn {
                return refuse(
                    format!(
                        "replication slot {slot} is at {confirmed}, ahead of {remembered_lsn}, the most pgferry \
                         ever confirmed: it was advanced, or dropped and re-created, by someone else, and the \
                         changes in between were skipped"
                    ),
                    "do not advance, share or re-create pgferry's slot",
                );
            }
            if confirmed < remembered_lsn {
                tracing::info!(%slot, %confirmed, remembered = %remembered_lsn,
                    "the slot resumes behind the remembered position (a confirm not yet sent, or a source restart); \
                     changes in between are sent again and skipped by the sink");
            }
            if prev.timeline != now.timeline {
                tracing::warn!(%slot, timeline = now.timeline, remembered_timeline = prev.timeline,
                    "the source changed timeline (a promotion) but kept the slot; streaming on");
            }
            Ok(SlotPlan::Use)
        }
    }
}

/// The source's side of [`keep`]: it asks for positions to be recorded and confirms
/// only what was.
pub struct StateLink {
    pub want: watch::Sender<Lsn>,
    pub recorded: watch::Receiver<Lsn>,
    /// Snapshot progress to record (with the next position, or on its own).
    pub snapshot: std::sync::Arc<watch::Sender<SnapshotState>>,
}

/// Record positions the source asks for, and snapshot progress, at most every
/// [`RECORD_MIN_GAP`], and publish each position once it is durable. Ends with an
/// error when the store fails (the source then stops confirming and stops); ends
/// quietly when the source is gone.
pub async fn keep<S: StateStore>(
    mut store: S,
    mut state: SourceState,
    mut want: watch::Receiver<Lsn>,
    recorded: watch::Sender<Lsn>,
    snapshot: watch::Receiver<SnapshotState>,
) -> Result<(), Error> {
    let where_ = store.describe();
    let mut snapshot = Some(snapshot);
    // Set when the snapshot progress changed (`changed()` marks it seen).
    let mut progressed = false;
    loop {
        let target = *want.borrow_and_update();
        progressed |= snapshot
            .as_mut()
            .is_some_and(|s| s.has_changed().unwrap_or(false));
        let moved = target > *recorded.borrow();
        if moved || progressed {
            if let Some(s) = snapshot.as_mut() {
                state.snapshot = s.borrow_and_update().clone();
            }
            progressed = false;
            if moved {
                state.confirmed_lsn = target.to_string();
            }
            let save = store.save(&state);
            tokio::pin!(save);
            let started = tokio::time::Instant::now();
            let saved = loop {
                match tokio::time::timeout(SLOW_SAVE, &mut save).await {
                    Ok(saved) => break saved,
                    Err(_) => tracing::warn!(
                        waited_s = started.elapsed().as_secs(),
                        "recording the source position in {where_} has taken {} s; the slot \
                         is not confirmed past it until it is written",
                        started.elapsed().as_secs()
                    ),
                }
            };
            if started.elapsed() >= SLOW_SAVE {
                tracing::info!(
                    waited_s = started.elapsed().as_secs(),
                    "the source position is recorded again in {where_}"
                );
            }
            saved.map_err(|e| e.context(format!("recording the source position in {where_}")))?;
            if moved && recorded.send(target).is_err() {
                return Ok(());
            }
            tokio::time::sleep(RECORD_MIN_GAP).await;
            continue;
        }
        tokio::select! {
            changed = want.changed() => if changed.is_err() { return Ok(()) },
            changed = async { snapshot.as_mut().expect("checked").changed().await }, if snapshot.is_some() => {
                match changed {
                    Ok(()) => progressed = true,
                    Err(_) => snapshot = None,
                }
            }
        }
    }
}

/// `tail`'s store: a JSON file, replaced atomically and fsynced.
pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: PathBuf) -> Self {
        FileStore { path }
    }
}

impl StateStore for FileStore {
    fn describe(&self) -> String {
        format!("state file {}", self.path.display())
    }

    async fn load(&mut self) -> Result<Option<SourceState>, Error> {
        let path = self.path.clone();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(
                    Error::operator(format!("reading state file {}", path.display()))
                        .with_source(e),
                )
            }
        };
        serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::operator(format!("state file {} is not valid", path.display()))
                .with_source(e)
                .with_hint(
                    "restore it, or remove it to adopt the slot as it is (changes may be lost)",
                )
        })
    }

    async fn save(&mut self, state: &SourceState) -> Result<(), Error> {
        let path = self.path.clone();
        let text = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::fatal("serializing the source state").with_source(e))?;
        tokio::task::spawn_blocking(move || write_durably(&path, &text))
            .await
            .map_err(|e| Error::fatal("writing the state file").with_source(e))?
    }
}

fn write_durably(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let io = |what: &str, e: std::io::Error| {
        Error::operator(format!("{what} {}", path.display()))
            .with_source(e)
            .with_hint(
                "the state file's directory must be writable; choose another with --state-file",
            )
    };
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("writing", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("replacing", e))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(lsn: &str) -> SourceState {
        SourceState {
            system_identifier: "7300000000000000001".into(),
            timeline: 1,
            database: "ehr".into(),
            slot: "s".into(),
            confirmed_lsn: lsn.into(),
            snapshot: Default::default(),
        }
    }

    fn observed(slot: Option<Option<&str>>) -> Observed {
        Observed {
            system_identifier: "7300000000000000001".into(),
            timeline: 1,
            database: "ehr".into(),
            slot_confirmed: slot.map(|c| c.map(|l| l.parse().unwrap())),
        }
    }

    #[test]
    fn a_first_start_creates_or_adopts_the_slot() {
        let d = |o| decide("s", "f", None, &o, false).unwrap();
        assert_eq!(d(observed(None)), SlotPlan::Create);
        assert_eq!(d(observed(Some(Some("0/10")))), SlotPlan::Use);
    }

    #[test]
    fn a_missing_slot_or_another_server_stops_unless_accepted() {
        let prev = state("0/100");
        let e = decide("s", "f", Some(&prev), &observed(None), false).unwrap_err();
        assert!(e.to_string().contains("is gone"), "{e}");
        assert!(e.hint().unwrap().contains("--accept-data-loss"));
        assert_eq!(
            decide("s", "f", Some(&prev), &observed(None), true).unwrap(),
            SlotPlan::Create
        );
        let mut other = observed(Some(Some("0/100")));
        other.system_identifier = "999".into();
        let e = decide("s", "f", Some(&prev), &other, false).unwrap_err();
        assert!(e.to_string().contains("system identifier 999"), "{e}");
    }

    #[test]
    fn a_slot_ahead_of_the_record_stops_and_one_behind_resumes() {
        let prev = state("0/100");
        let e = decide("s", "f", Some(&prev), &observed(Some(Some("0/101"))), false).unwrap_err();
        assert!(e.to_string().contains("ahead of 0/100"), "{e}");
        for at in ["0/100", "0/50"] {
            assert_eq!(
                decide("s", "f", Some(&prev), &observed(Some(Some(at))), false).unwrap(),
                SlotPlan::Use
            );
        }
    }

    #[tokio::test]
    async fn the_file_store_round_trips_and_names_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("pgferry-state-{}", std::process::id()));
        let path = dir.join("sub").join("tail-s.json");
        let mut store = FileStore::new(path.clone());
        assert_eq!(store.load().await.unwrap(), None);
        store.save(&state("0/42")).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(state("0/42")));
        std::fs::write(&path, "{").unwrap();
        let e = store.load().await.unwrap_err();
        assert!(e.to_string().contains("tail-s.json"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
