//! raft-rs's [`Storage`] on a redb file, durable before every write method returns.
//!
//! File `<data_dir>/raft.redb`, two tables:
//! - `entries`: `u64` log index → protobuf `eraftpb::Entry`. Always the contiguous range
//!   `snapshot.index + 1 ..= last_index`.
//! - `meta`: `&str` → bytes: `format` (`b"herd-raft-1"`), `hard_state` (protobuf `HardState`),
//!   `conf_state` (protobuf `ConfState`), `snapshot` (protobuf `Snapshot`: metadata — index,
//!   term, conf state — plus the state machine's bytes).
//!
//! Every write method is one redb transaction committed with `Durability::Immediate` (redb's
//! default: the commit fsyncs), so a crash leaves either the old or the new state, and the
//! current hard state is written with every transaction. Reads are served from an in-memory
//! mirror loaded at [`RaftStorage::open`]; the log is short because it is compacted at every
//! snapshot.
//!
//! The state machine is not stored here beyond the snapshot: after a restart it is restored from
//! the snapshot and the committed entries after the snapshot's index are applied again. So the
//! durable "applied index" is the snapshot's index, and nothing is applied twice.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt::Display;
use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::RaftError;

/// The database file inside the data directory.
pub const FILE_NAME: &str = "raft.redb";

const FORMAT: &[u8] = b"herd-raft-1";
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_FORMAT: &str = "format";
const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_SNAPSHOT: &str = "snapshot";

fn storage_err(e: impl Display) -> RaftError {
    RaftError::Storage(e.to_string())
}

/// Durable raft log, hard state, conf state and latest snapshot.
pub struct RaftStorage {
    db: Database,
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot (default: index 0, no data).
    snapshot: Snapshot,
    /// `entries[0].index == snapshot index + 1`, contiguous.
    entries: VecDeque<Entry>,
    /// Set when raft asked for a snapshot newer than the one we have.
    snapshot_wanted: Cell<bool>,
}

impl std::fmt::Debug for RaftStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftStorage")
            .field("hard_state", &self.hard_state)
            .field("conf_state", &self.conf_state)
            .field("snapshot_index", &self.snapshot_index())
            .field("first_index", &self.first())
            .field("last_index", &self.last())
            .finish()
    }
}

impl RaftStorage {
    /// Opens (or creates) the storage in `dir`, loads it and checks its invariants.
    pub fn open(dir: &Path) -> Result<Self, RaftError> {
        std::fs::create_dir_all(dir).map_err(|e| storage_err(format!("create {}: {e}", dir.display())))?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(|e| storage_err(format!("open {}: {e}", path.display())))?;
        {
            let txn = db.begin_write().map_err(storage_err)?;
            {
                txn.open_table(ENTRIES).map_err(storage_err)?;
                let mut meta = txn.open_table(META).map_err(storage_err)?;
                let format = meta.get(KEY_FORMAT).map_err(storage_err)?.map(|v| v.value().to_vec());
                match format {
                    None => {
                        meta.insert(KEY_FORMAT, FORMAT).map_err(storage_err)?;
                    }
                    Some(f) if f == FORMAT => {}
                    Some(f) => return Err(storage_err(format!("unknown format {:?}", String::from_utf8_lossy(&f)))),
                }
            }
            txn.commit().map_err(storage_err)?;
        }

        let txn = db.begin_read().map_err(storage_err)?;
        let meta = txn.open_table(META).map_err(storage_err)?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, RaftError> {
            Ok(meta.get(key).map_err(storage_err)?.map(|v| v.value().to_vec()))
        };
        let hard_state = match get(KEY_HARD_STATE)? {
            Some(b) => HardState::parse_from_bytes(&b).map_err(storage_err)?,
            None => HardState::default(),
        };
        let conf_state = match get(KEY_CONF_STATE)? {
            Some(b) => ConfState::parse_from_bytes(&b).map_err(storage_err)?,
            None => ConfState::default(),
        };
        let snapshot = match get(KEY_SNAPSHOT)? {
            Some(b) => Snapshot::parse_from_bytes(&b).map_err(storage_err)?,
            None => Snapshot::default(),
        };
        let table = txn.open_table(ENTRIES).map_err(storage_err)?;
        let mut entries = VecDeque::new();
        for (expect, item) in (snapshot.get_metadata().index + 1..).zip(table.iter().map_err(storage_err)?) {
            let (k, v) = item.map_err(storage_err)?;
            let e = Entry::parse_from_bytes(v.value()).map_err(storage_err)?;
            if k.value() != expect || e.index != expect {
                return Err(storage_err(format!(
                    "log not contiguous: expected index {expect}, found key {} holding entry {}",
                    k.value(),
                    e.index
                )));
            }
            entries.push_back(e);
        }
        drop(table);
        drop(meta);
        drop(txn);

        let s = RaftStorage { db, hard_state, conf_state, snapshot, entries, snapshot_wanted: Cell::new(false) };
        let (commit, snap, last) = (s.hard_state.commit, s.snapshot_index(), s.last());
        if commit < snap || commit > last {
            return Err(storage_err(format!("commit {commit} outside [snapshot {snap}, last {last}]")));
        }
        Ok(s)
    }

    /// Whether this storage has ever been given a configuration or any log.
    pub fn is_initialized(&self) -> bool {
        self.conf_state != ConfState::default() || self.last() > 0 || self.hard_state != HardState::default()
    }

    /// Starts a founding member's log: a snapshot at index 1, term 1, holding the founding
    /// voters and the state machine's initial state. Every founder writes the same one, and a
    /// node added later starts from it (or a later snapshot), since a configuration can only
    /// reach a node through a snapshot or the conf changes in the log.
    pub fn bootstrap(&mut self, voters: &[u64], initial_state: Vec<u8>) -> Result<(), RaftError> {
        if self.is_initialized() {
            return Err(storage_err("bootstrap of an initialised raft storage"));
        }
        let mut snapshot = Snapshot { data: initial_state.into(), ..Snapshot::default() };
        let meta = snapshot.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().set_voters(voters.to_vec());
        self.apply_snapshot(&snapshot, None)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        self.snapshot.get_metadata()
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    /// The state machine bytes of the latest snapshot.
    pub fn snapshot_data(&self) -> &[u8] {
        &self.snapshot.data
    }

    pub fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    pub fn last(&self) -> u64 {
        self.entries.back().map_or(self.snapshot_index(), |e| e.index)
    }

    /// The entry at `index`, if it is in the log.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        let first = self.first();
        if index < first {
            return None;
        }
        self.entries.get((index - first) as usize)
    }

    /// Whether raft asked for a newer snapshot than we have since the last call.
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// Appends `entries` (replacing any conflicting suffix) and records `hs` if given; durable on
    /// return. Step 4 of the Ready order.
    pub fn append(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), RaftError> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let (first, last) = (self.first(), self.last());
        if let Some(e) = entries.first() {
            if e.index < first || e.index > last + 1 {
                return Err(storage_err(format!("append at {} outside [{first}, {}]", e.index, last + 1)));
            }
            if entries.windows(2).any(|w| w[1].index != w[0].index + 1) {
                return Err(storage_err("append of non-contiguous entries"));
            }
        }
        let mut hard_state = hs.cloned().unwrap_or_else(|| self.hard_state.clone());
        // A commit index learnt from a LightReady (kept in memory only) is never lowered.
        hard_state.commit = hard_state.commit.max(self.hard_state.commit);
        let txn = self.db.begin_write().map_err(storage_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(storage_err)?;
            if let Some(e) = entries.first() {
                for stale in e.index..=last {
                    table.remove(stale).map_err(storage_err)?;
                }
            }
            for e in entries {
                let bytes = e.write_to_bytes().map_err(storage_err)?;
                table.insert(e.index, bytes.as_slice()).map_err(storage_err)?;
            }
            let mut meta = txn.open_table(META).map_err(storage_err)?;
            meta.insert(KEY_HARD_STATE, hard_state.write_to_bytes().map_err(storage_err)?.as_slice())
                .map_err(storage_err)?;
        }
        txn.commit().map_err(storage_err)?;
        if let Some(e) = entries.first() {
            self.entries.truncate((e.index - first) as usize);
            self.entries.extend(entries.iter().cloned());
        }
        self.hard_state = hard_state;
        Ok(())
    }

    /// Records a newer commit index (from a `LightReady`) in memory; it reaches the disk with
    /// the next transaction. A stale commit index on disk is safe: raft learns it again.
    pub fn set_commit(&mut self, commit: u64) {
        self.hard_state.commit = self.hard_state.commit.max(commit);
    }

    /// Records the configuration after an applied conf change; durable on return.
    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), RaftError> {
        let txn = self.db.begin_write().map_err(storage_err)?;
        {
            let mut meta = txn.open_table(META).map_err(storage_err)?;
            meta.insert(KEY_CONF_STATE, cs.write_to_bytes().map_err(storage_err)?.as_slice()).map_err(storage_err)?;
            meta.insert(KEY_HARD_STATE, self.hard_state.write_to_bytes().map_err(storage_err)?.as_slice())
                .map_err(storage_err)?;
        }
        txn.commit().map_err(storage_err)?;
        self.conf_state = cs;
        Ok(())
    }

    /// Installs a snapshot received from the leader: it replaces the whole log and the
    /// configuration; `hs` is the Ready's hard state, if it has one. Durable on return.
    pub fn apply_snapshot(&mut self, snapshot: &Snapshot, hs: Option<&HardState>) -> Result<(), RaftError> {
        let meta = snapshot.get_metadata();
        if meta.index < self.snapshot_index() {
            return Err(storage_err(format!("snapshot {} older than ours {}", meta.index, self.snapshot_index())));
        }
        let mut hard_state = hs.cloned().unwrap_or_else(|| self.hard_state.clone());
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = hard_state.commit.max(meta.index);
        let last = self.last();
        let txn = self.db.begin_write().map_err(storage_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(storage_err)?;
            for stale in self.first()..=last {
                table.remove(stale).map_err(storage_err)?;
            }
            let mut m = txn.open_table(META).map_err(storage_err)?;
            m.insert(KEY_SNAPSHOT, snapshot.write_to_bytes().map_err(storage_err)?.as_slice()).map_err(storage_err)?;
            m.insert(KEY_CONF_STATE, meta.get_conf_state().write_to_bytes().map_err(storage_err)?.as_slice())
                .map_err(storage_err)?;
            m.insert(KEY_HARD_STATE, hard_state.write_to_bytes().map_err(storage_err)?.as_slice())
                .map_err(storage_err)?;
        }
        txn.commit().map_err(storage_err)?;
        self.entries.clear();
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snapshot.clone();
        self.hard_state = hard_state;
        Ok(())
    }

    /// Log compaction: stores `data` (the state machine at `index`, which must be applied and
    /// in the log) as the latest snapshot with configuration `conf_state`, and deletes the
    /// entries up to `index`, in one durable transaction.
    pub fn compact_with_snapshot(&mut self, index: u64, conf_state: ConfState, data: Vec<u8>) -> Result<(), RaftError> {
        let term = match self.entry(index) {
            Some(e) => e.term,
            None => return Err(storage_err(format!("snapshot at {index}, outside the log"))),
        };
        let mut snapshot = Snapshot { data: data.into(), ..Snapshot::default() };
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = hard_state.commit.max(index);
        let txn = self.db.begin_write().map_err(storage_err)?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(storage_err)?;
            for old in self.first()..=index {
                table.remove(old).map_err(storage_err)?;
            }
            let mut m = txn.open_table(META).map_err(storage_err)?;
            m.insert(KEY_SNAPSHOT, snapshot.write_to_bytes().map_err(storage_err)?.as_slice()).map_err(storage_err)?;
            m.insert(KEY_HARD_STATE, hard_state.write_to_bytes().map_err(storage_err)?.as_slice())
                .map_err(storage_err)?;
        }
        txn.commit().map_err(storage_err)?;
        let drop_count = (index + 1 - self.first()) as usize;
        self.entries.drain(..drop_count);
        self.snapshot = snapshot;
        self.hard_state = hard_state;
        Ok(())
    }
}

impl Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.first();
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut out: Vec<Entry> =
            self.entries.range((low - first) as usize..(high - first) as usize).cloned().collect();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entry(idx) {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    /// The latest snapshot, unless it is older than `request_index` or its configuration lacks
    /// `to` (a node just added: raft-rs's follower rejects a snapshot whose configuration does not
    /// contain it). Then the node thread is asked for a fresh one and raft retries later.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let meta = self.snapshot.get_metadata();
        let cs = meta.get_conf_state();
        let has_to = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners_next)
            .any(|id| *id == to);
        if meta.index == 0 || meta.index < request_index || !has_to {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry { index, term, data: data.as_bytes().to_vec().into(), ..Entry::default() }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState { term, vote, commit, ..HardState::default() }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    #[test]
    fn append_overwrite_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let mut s = RaftStorage::open(dir.path()).expect("open");
            assert!(!s.is_initialized());
            s.bootstrap(&[1, 2, 3], b"init".to_vec()).expect("bootstrap");
            assert!(s.bootstrap(&[1], vec![]).is_err());
            assert_eq!((s.first(), s.last(), s.hard_state().term, s.hard_state().commit), (2, 1, 1, 1));
            s.append(&[entry(2, 1, "a"), entry(3, 1, "b"), entry(4, 1, "c")], Some(&hs(1, 1, 3))).expect("append");
            // A new leader overwrites the uncommitted suffix from index 4.
            s.append(&[entry(4, 2, "C"), entry(5, 2, "D")], Some(&hs(2, 2, 3))).expect("append");
            assert!(s.append(&[entry(9, 2, "gap")], None).is_err());
            assert!(s.append(&[entry(1, 2, "compacted")], None).is_err());
            s.set_commit(5);
        }
        let s = RaftStorage::open(dir.path()).expect("reopen");
        assert!(s.is_initialized());
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        // The in-memory-only commit index from set_commit was not written: 3 is on disk.
        assert_eq!(s.hard_state(), &hs(2, 2, 3));
        assert_eq!((s.first_index().expect("first"), s.last_index().expect("last")), (2, 5));
        let got = s.entries(2, 6, None, ctx()).expect("entries");
        let datas: Vec<&[u8]> = got.iter().map(|e| &e.data[..]).collect();
        assert_eq!(datas, [&b"a"[..], b"b", b"C", b"D"]);
        assert_eq!(s.term(4).expect("term"), 2);
        assert_eq!(s.term(1).expect("the bootstrap snapshot's term"), 1);
        assert!(matches!(s.term(0), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(s.entries(2, 7, None, ctx()).is_err(), "past the end is an error, not a panic");
        assert_eq!(s.snapshot(0, 2).expect("bootstrap snapshot").data.as_ref(), b"init");
        assert!(s.snapshot(0, 4).is_err(), "node 4 is not in the snapshot's configuration");
        assert!(s.take_snapshot_request());
        assert!(matches!(s.snapshot(5, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))));
        assert!(s.take_snapshot_request());
        assert!(!s.take_snapshot_request());
    }

    #[test]
    fn compaction_and_installed_snapshots_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let mut s = RaftStorage::open(dir.path()).expect("open");
            s.bootstrap(&[1], vec![]).expect("bootstrap");
            let ents: Vec<Entry> = (2..=10).map(|i| entry(i, 1 + i / 5, "x")).collect();
            s.append(&ents, Some(&hs(3, 1, 8))).expect("append");
            let mut cs = ConfState::default();
            cs.set_voters(vec![1]);
            s.compact_with_snapshot(6, cs, b"state@6".to_vec()).expect("compact");
            assert_eq!((s.first(), s.last()), (7, 10));
            assert!(matches!(s.term(5), Err(raft::Error::Store(StorageError::Compacted))));
            assert_eq!(s.term(6).expect("snapshot term"), 2);
            assert!(matches!(s.entries(6, 8, None, ctx()), Err(raft::Error::Store(StorageError::Compacted))));
            let snap = s.snapshot(0, 1).expect("snapshot");
            assert_eq!((snap.get_metadata().index, &snap.data[..]), (6, &b"state@6"[..]));
        }
        {
            let mut s = RaftStorage::open(dir.path()).expect("reopen");
            assert_eq!((s.first(), s.last(), s.snapshot_data()), (7, 10, &b"state@6"[..]));
            assert_eq!(s.hard_state().commit, 8);
            // A snapshot from a leader at 20 replaces everything.
            let mut snap = Snapshot { data: b"state@20".to_vec().into(), ..Snapshot::default() };
            snap.mut_metadata().index = 20;
            snap.mut_metadata().term = 4;
            snap.mut_metadata().mut_conf_state().set_voters(vec![1, 2]);
            s.apply_snapshot(&snap, None).expect("install");
            s.append(&[entry(21, 4, "y")], None).expect("append after snapshot");
        }
        let s = RaftStorage::open(dir.path()).expect("reopen");
        assert_eq!((s.first(), s.last(), s.snapshot_data()), (21, 21, &b"state@20"[..]));
        assert_eq!(s.conf_state().voters, vec![1, 2]);
        assert_eq!((s.hard_state().term, s.hard_state().commit), (4, 20));
    }

    #[test]
    fn limit_size_keeps_at_least_one_entry() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut s = RaftStorage::open(dir.path()).expect("open");
        s.bootstrap(&[1], vec![]).expect("bootstrap");
        let big = "z".repeat(100);
        s.append(&[entry(2, 1, &big), entry(3, 1, &big), entry(4, 1, &big)], None).expect("append");
        assert_eq!(s.entries(2, 5, Some(1), ctx()).expect("entries").len(), 1);
        assert_eq!(s.entries(2, 5, Some(250), ctx()).expect("entries").len(), 2);
        assert_eq!(s.entries(3, 3, None, ctx()).expect("empty").len(), 0);
    }
}
