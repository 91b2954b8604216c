//! The scheduler's journal in redb: the sans-IO scheduler's records, the submitters'
//! results and the listing's task rows, written in one transaction before the scheduler
//! acts on them.
//!
//! Why redb: it is an embedded, ACID, crash-safe store in pure Rust (no C library to
//! build, unlike SQLite), with copy-on-write B-trees and a durable commit per
//! transaction, which is all a journal of small records needs.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use strata_sched::{JournalRecord, TaskId};

use super::{TaskOutcome, TaskRow, decode, encode};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const RESULTS: TableDefinition<u64, &[u8]> = TableDefinition::new("results");
const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");

/// What a journal held when it was opened.
pub(crate) struct Recovered {
    pub(crate) records: Vec<JournalRecord>,
    pub(crate) results: BTreeMap<TaskId, TaskOutcome>,
    pub(crate) rows: BTreeMap<TaskId, TaskRow>,
}

/// The open journal.
pub(crate) struct Journal {
    db: Database,
    next: u64,
    /// Log records written since the last compaction.
    pub(crate) since_compaction: u64,
}

fn err(e: impl std::fmt::Display) -> String {
    format!("journal: {e}")
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads everything back.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Recovered), String> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        let db = Database::create(dir.join("scheduler.redb")).map_err(err)?;
        let w = db.begin_write().map_err(err)?;
        {
            w.open_table(LOG).map_err(err)?;
            w.open_table(RESULTS).map_err(err)?;
            w.open_table(ROWS).map_err(err)?;
        }
        w.commit().map_err(err)?;
        let r = db.begin_read().map_err(err)?;
        let mut rec = Recovered { records: Vec::new(), results: BTreeMap::new(), rows: BTreeMap::new() };
        let mut next = 0;
        for e in r.open_table(LOG).map_err(err)?.iter().map_err(err)? {
            let (k, v) = e.map_err(err)?;
            next = k.value() + 1;
            rec.records.push(decode(v.value()).map_err(|e| err(format!("record {}: {e}", k.value())))?);
        }
        for e in r.open_table(RESULTS).map_err(err)?.iter().map_err(err)? {
            let (k, v) = e.map_err(err)?;
            rec.results.insert(TaskId(k.value()), decode(v.value()).map_err(err)?);
        }
        for e in r.open_table(ROWS).map_err(err)?.iter().map_err(err)? {
            let (k, v) = e.map_err(err)?;
            rec.rows.insert(TaskId(k.value()), decode(v.value()).map_err(err)?);
        }
        Ok((Self { db, next, since_compaction: 0 }, rec))
    }

    /// Appends records and stores results and rows, durably, in one transaction.
    pub(crate) fn commit(
        &mut self,
        records: &[JournalRecord],
        results: &[(TaskId, TaskOutcome)],
        rows: &[&TaskRow],
    ) -> Result<(), String> {
        if records.is_empty() && results.is_empty() && rows.is_empty() {
            return Ok(());
        }
        let w = self.db.begin_write().map_err(err)?;
        {
            let mut log = w.open_table(LOG).map_err(err)?;
            for r in records {
                log.insert(self.next, encode(r).as_slice()).map_err(err)?;
                self.next += 1;
            }
            let mut res = w.open_table(RESULTS).map_err(err)?;
            for (id, o) in results {
                res.insert(id.0, encode(o).as_slice()).map_err(err)?;
            }
            let mut rt = w.open_table(ROWS).map_err(err)?;
            for row in rows {
                rt.insert(row.id.0, encode(*row).as_slice()).map_err(err)?;
            }
        }
        w.commit().map_err(err)?;
        self.since_compaction += records.len() as u64;
        Ok(())
    }

    /// Replaces the log by a snapshot, and keeps only the newest `keep` results and rows.
    pub(crate) fn compact(&mut self, snapshot: &[JournalRecord], keep: usize) -> Result<(), String> {
        let w = self.db.begin_write().map_err(err)?;
        {
            let mut log = w.open_table(LOG).map_err(err)?;
            log.retain(|_, _| false).map_err(err)?;
            self.next = 0;
            for r in snapshot {
                log.insert(self.next, encode(r).as_slice()).map_err(err)?;
                self.next += 1;
            }
            for table in [RESULTS, ROWS] {
                let mut t = w.open_table(table).map_err(err)?;
                let len = t.len().map_err(err)? as usize;
                if len > keep {
                    let mut drop = len - keep;
                    t.retain(|_, _| {
                        if drop > 0 {
                            drop -= 1;
                            false
                        } else {
                            true
                        }
                    })
                    .map_err(err)?;
                }
            }
        }
        w.commit().map_err(err)?;
        self.since_compaction = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints what one durable commit costs here (not a pass/fail figure).
    #[test]
    #[ignore]
    fn commit_cost() {
        let dir = tempfile::tempdir_in(std::env::var("JOURNAL_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        let rec = JournalRecord::Released { task: TaskId(1), attempt: 1 };
        let t = std::time::Instant::now();
        for _ in 0..200 {
            j.commit(std::slice::from_ref(&rec), &[], &[]).unwrap();
        }
        eprintln!("{:.3} ms per commit", t.elapsed().as_secs_f64() * 1e3 / 200.0);
    }
}
