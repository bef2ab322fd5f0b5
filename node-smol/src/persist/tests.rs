use super::*;
use crate::persist::frame::{cbor, frame_into};
use crate::persist::snapshot::SNAP_MAGIC;
use ddpush_proto::Content;
use ddpush_proto::{Config, Recovery};
use ddpush_proto::{Kind, PushMsg, RecordState, Time, Uuid};

fn rec(i: u8) -> RecordState {
    RecordState {
        uuid: Uuid([i; 16]),
        last_heartbeat: Some(Time::from_secs(1000 + u64::from(i))),
        last_active: Time::from_secs(1000 + u64::from(i)),
        last_push: None,
        addr: Some("10.0.0.1:4000".parse().unwrap()),
        notify: i.is_multiple_of(2),
        bits: u64::from(i),
        payload: i
            .is_multiple_of(3)
            .then(|| Content::new(vec![i; 10]).unwrap()),
    }
}

#[test]
fn snapshot_round_trip_and_corruption_is_refused_with_offset() {
    let recs: Vec<_> = (0..10).map(rec).collect();
    let bytes = encode_snapshot(3, 42, recs.clone().into_iter());
    let mut back = Vec::new();
    let h = read_snapshot("s", &bytes, |r| back.push(r)).unwrap();
    assert_eq!(h.gen, 3);
    assert_eq!(back, recs);
    let mut bad = bytes.clone();
    let mid = bytes.len() / 2;
    bad[mid] ^= 0xFF;
    let e = read_snapshot("s", &bad, |_| {}).unwrap_err().to_string();
    assert!(e.contains("corrupt at byte offset"), "{e}");
    let cut = &bytes[..bytes.len() - 3];
    assert!(read_snapshot("s", cut, |_| {}).is_err());
}

#[test]
fn snapshot_v2_keeps_every_field_and_v1_is_still_read() {
    let mut recs: Vec<_> = (0..7).map(rec).collect();
    // No scope id: CBOR (version 1) does not keep it; version 2 does.
    recs[1].addr = Some("[2001:db8::1]:9966".parse().unwrap());
    recs[2].addr = None;
    recs[3].last_heartbeat = None;
    recs[4].last_push = Some(Time::from_millis(123_456));
    recs[5].payload = Some(Content::new(vec![7u8; 500]).unwrap());
    let bytes = encode_snapshot(9, 1, recs.clone().into_iter());
    let mut back = Vec::new();
    read_snapshot("s", &bytes, |r| back.push(r)).unwrap();
    assert_eq!(back, recs);

    // A version-1 (CBOR) snapshot, as earlier releases wrote it.
    let mut v1 = Vec::new();
    v1.extend_from_slice(SNAP_MAGIC);
    v1.extend_from_slice(&1u32.to_be_bytes());
    frame_into(
        &mut v1,
        &cbor(&SnapHeader {
            gen: 9,
            taken_ms: 1,
        }),
    );
    frame_into(&mut v1, &cbor(&recs));
    frame_into(
        &mut v1,
        &cbor(&SnapEnd {
            records: 7,
            keys: 0,
            removed: 0,
        }),
    );
    let mut back = Vec::new();
    assert_eq!(read_snapshot("s", &v1, |r| back.push(r)).unwrap().gen, 9);
    assert_eq!(back, recs);
}

fn recovery() -> Recovery {
    Recovery::new(Config::default(), Time::from_secs(1_000_000)).unwrap()
}

fn pushed(i: u8) -> Change {
    Change::Pushed {
        uuid: Uuid([i; 16]),
        at: Time::from_secs(1),
        msg: PushMsg::Bits(u64::from(i)),
    }
}

fn journal_path(st: &Store) -> PathBuf {
    st.dir().join(journal_name(st.gen))
}

fn read_all(path: &Path) -> (Vec<Change>, Tail) {
    let mut got = Vec::new();
    let (_, tail) = read_journal("j", &fs::read(path).unwrap(), |c| got.push(c)).unwrap();
    (got, tail)
}

#[test]
fn journal_torn_tail_is_dropped_but_middle_damage_is_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
    st.commit(&[pushed(1)], false).unwrap();
    st.commit(&[pushed(2), pushed(3)], false).unwrap();
    st.commit(
        &[Change::Cleared {
            uuid: Uuid([1; 16]),
            kind: Kind::Bits,
            bits: 1,
        }],
        true,
    )
    .unwrap();
    let path = journal_path(&st);
    drop(st);
    let full = fs::read(&path).unwrap();
    assert_eq!(read_all(&path).0.len(), 4);
    assert_eq!(read_all(&path).1, Tail::Clean);

    let torn = &full[..full.len() - 2];
    let mut got = Vec::new();
    let (_, tail) = read_journal("j", torn, |c| got.push(c)).unwrap();
    assert_eq!(got.len(), 3);
    assert!(matches!(tail, Tail::Torn(_)));

    let mut bad = full.clone();
    bad[20 + 9] ^= 0x55; // inside the first frame's payload
    let e = read_journal("j", &bad, |_| {}).unwrap_err().to_string();
    assert!(e.contains("offset 20"), "{e}");
    assert!(
        e.contains("ddpushd check") && e.contains("ddpushd recover"),
        "{e}"
    );
}

#[test]
fn reopen_replays_and_snapshot_retires_old_journals() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
        st.commit(
            &[Change::Removed {
                uuid: Uuid([9; 16]),
            }],
            false,
        )
        .unwrap();
    }
    let mut r = recovery();
    let (mut st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!((r.changes(), rep.replayed), (1, 1));
    // The fresh journal is empty: a snapshot now reuses its generation.
    let g = st.rotate().unwrap();
    assert_eq!(g, st.gen);
    let bytes = encode_snapshot(g, 0, std::iter::once(rec(1)));
    write_snapshot_file(dir.path(), &bytes).unwrap();
    st.snapshot_done(g);
    drop(st);
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!((r.records(), r.changes(), rep.snapshot_records), (1, 0, 1));
    assert_eq!(journal_gens(dir.path()).unwrap().len(), 2);
}

#[test]
fn a_stale_snapshot_tmp_is_removed_at_start_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
        st.commit(&[pushed(1)], true).unwrap();
    }
    // What a kill -9 in the middle of a snapshot leaves: part of a newer snapshot.
    let half = encode_snapshot(9, 0, (0..50).map(rec));
    fs::write(dir.path().join(SNAPSHOT_TMP), &half[..half.len() / 2]).unwrap();
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!(rep.stale_tmp, Some((half.len() / 2) as u64));
    assert!(!dir.path().join(SNAPSHOT_TMP).exists());
    assert_eq!((rep.snapshot_records, rep.replayed), (0, 1));
}

#[test]
fn recover_refuses_while_a_server_holds_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (_running, _) = Store::open(dir.path(), &mut recovery()).unwrap();
    // A damaged journal beside the running server's: recover must not touch it under it.
    let bad = dir.path().join(journal_name(0x99));
    let mut b = journal::header(0x99).to_vec();
    b.extend_from_slice(&[0, 0, 0, 4, 1, 2, 3, 4, 0, 0, 0, 0, 9]);
    fs::write(&bad, &b).unwrap();
    assert!(check::check(dir.path())
        .unwrap()
        .iter()
        .any(|r| r.damaged()));
    let before: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    match check::recover(dir.path()) {
        Err(PersistError::Locked(_)) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
    let after: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after);
    assert_eq!(fs::read(&bad).unwrap(), b);
}

#[test]
fn second_open_of_a_locked_dir_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (_a, _) = Store::open(dir.path(), &mut recovery()).unwrap();
    match Store::open(dir.path(), &mut recovery()) {
        Err(PersistError::Locked(_)) => {}
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
}

fn failing_store(dir: &Path) -> (Store, Arc<Faults>) {
    let disk = FailingDisk::default();
    let faults = disk.faults.clone();
    let (st, _) = Store::open_on(dir, Arc::new(disk), &mut recovery()).unwrap();
    (st, faults)
}

#[test]
fn a_failed_write_is_cut_back_to_the_last_whole_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (mut st, faults) = failing_store(dir.path());
    st.commit(&[pushed(1)], false).unwrap();
    let path = journal_path(&st);
    let good = fs::metadata(&path).unwrap().len();
    // The next write lands half-way and fails.
    faults.fail_nth_from_now(1);
    assert!(st.commit(&[pushed(2), pushed(3)], false).is_err());
    assert_eq!(faults.failed.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(fs::metadata(&path).unwrap().len(), good, "half frame left");
    // Later appends follow the last whole frame: the file reads clean.
    st.commit(&[pushed(4)], false).unwrap();
    let (got, tail) = read_all(&path);
    assert_eq!((got, tail), (vec![pushed(1), pushed(4)], Tail::Clean));
}

#[test]
fn a_full_disk_fails_every_write_and_recovers_without_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (mut st, faults) = failing_store(dir.path());
    st.commit(&[pushed(1)], true).unwrap();
    faults.set_full(true);
    for i in 2..6 {
        assert!(st.commit(&[pushed(i)], i % 2 == 0).is_err());
    }
    assert!(st.rotate().is_err(), "rotation needs a write too");
    faults.set_full(false);
    st.commit(&[pushed(9)], true).unwrap();
    drop(st);
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!((rep.replayed, rep.torn.len()), (2, 0));
}

#[test]
fn a_probe_write_says_whether_appends_succeed_and_leaves_the_journal_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (mut st, faults) = failing_store(dir.path());
    st.commit(&[pushed(1)], true).unwrap();
    let path = journal_path(&st);
    let before = fs::read(&path).unwrap();
    st.probe_write().unwrap();
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "the probe is cut off again"
    );
    faults.set_full(true);
    assert!(st.probe_write().is_err());
    assert!(st.commit(&[pushed(2)], true).is_err());
    faults.set_full(false);
    st.probe_write().unwrap();
    assert_eq!(fs::read(&path).unwrap(), before);
    st.commit(&[pushed(3)], true).unwrap();
    assert_eq!(read_all(&path), (vec![pushed(1), pushed(3)], Tail::Clean));
    // A crash between the probe's write and its cut leaves a torn last frame, which start-up
    // drops like any append cut short: the probe's bytes as they land, then a start.
    let whole = fs::read(&path).unwrap();
    let mut torn = whole.clone();
    let mut probe = vec![0u8; 4096];
    probe[..4].copy_from_slice(&8192u32.to_be_bytes());
    torn.extend_from_slice(&probe);
    drop(st);
    fs::write(&path, &torn).unwrap();
    let (back, tail) = read_all(&path);
    assert_eq!(back, vec![pushed(1), pushed(3)]);
    assert_eq!(tail, Tail::Torn(whole.len() as u64));
}

#[test]
fn a_start_on_a_full_disk_loads_the_state_and_creates_the_journal_once_space_is_back() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
        st.commit(&[pushed(1)], true).unwrap();
    }
    let before = journal_gens(dir.path()).unwrap();
    let disk = FailingDisk::default();
    disk.faults.set_full(true);
    let faults = disk.faults.clone();
    let mut r = recovery();
    let (mut st, rep) = Store::open_on(dir.path(), Arc::new(disk), &mut r).unwrap();
    assert_eq!(
        rep.replayed, 1,
        "the state is loaded although the disk is full"
    );
    assert!(rep.journal_error.as_ref().is_some_and(out_of_space));
    assert!(!st.journal_open());
    assert_eq!(
        journal_gens(dir.path()).unwrap(),
        before,
        "no half-made journal left"
    );
    assert!(st.commit(&[pushed(2)], true).is_err(), "no space: refused");
    assert_eq!(journal_gens(dir.path()).unwrap(), before);
    // A snapshot taken now covers every older journal; this run's comes with the next append.
    let g = st.rotate().unwrap();
    assert!(g > *before.last().unwrap());
    faults.set_full(false);
    st.commit(&[pushed(3)], true).unwrap();
    assert!(st.journal_open());
    let (got, tail) = read_all(&journal_path(&st));
    assert_eq!((got, tail), (vec![pushed(3)], Tail::Clean));
    drop(st);
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!((rep.replayed, rep.torn.len()), (2, 0), "1 and 3; never 2");
    assert!(rep.journal_error.is_none());
}

#[test]
fn a_failed_snapshot_keeps_the_previous_one_and_its_journals() {
    let dir = tempfile::tempdir().unwrap();
    let (mut st, faults) = failing_store(dir.path());
    st.commit(&[pushed(1)], false).unwrap();
    let g = st.rotate().unwrap();
    write_snapshot_on(
        st.disk().as_ref(),
        dir.path(),
        &encode_snapshot(g, 0, (0..3).map(rec)),
    )
    .unwrap();
    st.snapshot_done(g);
    st.commit(&[pushed(2)], false).unwrap();
    let before = fs::read(dir.path().join(SNAPSHOT)).unwrap();
    let g2 = st.rotate().unwrap();
    faults.set_full(true);
    let big = encode_snapshot(g2, 0, (0..50).map(rec));
    assert!(write_snapshot_on(st.disk().as_ref(), dir.path(), &big).is_err());
    assert!(
        !dir.path().join(SNAPSHOT_TMP).exists(),
        "temporary file left"
    );
    assert_eq!(fs::read(dir.path().join(SNAPSHOT)).unwrap(), before);
    faults.set_full(false);
    drop(st);
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    // The old snapshot and the journal written after it are both still there.
    assert_eq!((rep.snapshot_records, rep.replayed), (3, 1));
}

#[test]
fn unusable_data_directories_are_refused_in_one_line_touching_nothing() {
    let base = tempfile::tempdir().unwrap();
    let file = base.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    let e = Store::open(&file, &mut recovery())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is not a directory"), "{e}");

    let dir = base.path().join("d1");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(dir.join(SNAPSHOT)).unwrap();
    let e = Store::open(&dir, &mut recovery())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("snapshot.cbor is a directory"), "{e}");
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        1,
        "something was created"
    );

    let dir = base.path().join("d2");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(dir.join(journal_name(3))).unwrap();
    let e = Store::open(&dir, &mut recovery())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");

    let dir = base.path().join("d3");
    fs::create_dir(&dir).unwrap();
    let mut p = fs::metadata(&dir).unwrap().permissions();
    p.set_readonly(true);
    fs::set_permissions(&dir, p).unwrap();
    let e = Store::open(&dir, &mut recovery())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not writable"), "{e}");
    assert!(!e.contains('\n'));

    let dir = base.path().join("d5");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(dir.join(SNAPSHOT_TMP)).unwrap();
    let e = Store::open(&dir, &mut recovery())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("snapshot.tmp is a directory"), "{e}");
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        1,
        "something was created"
    );

    #[cfg(unix)]
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::chown;
        let dir = base.path().join("d4");
        fs::create_dir(&dir).unwrap();
        chown(&dir, Some(65534), Some(65534)).unwrap();
        let e = Store::open(&dir, &mut recovery())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            0,
            "something was created"
        );
        // Our directory, with a journal another user left in it.
        let dir = base.path().join("d6");
        fs::create_dir(&dir).unwrap();
        let j = dir.join(journal_name(2));
        fs::write(&j, journal::header(2)).unwrap();
        chown(&j, Some(65534), Some(65534)).unwrap();
        let e = Store::open(&dir, &mut recovery())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("journal-0000000000000002.log is owned by uid 65534"),
            "{e}"
        );
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "something was created"
        );
    }
}

#[test]
fn a_read_only_filesystem_is_named() {
    let e = unusable(
        Path::new("/data"),
        &io::Error::from(io::ErrorKind::ReadOnlyFilesystem),
    );
    assert_eq!(
        e.to_string(),
        "data directory /data is on a read-only filesystem"
    );
}

// ---------------------------------------------------------------------------------------
// Golden files: the on-disk bytes, pinned. A change to the format must add a version (and
// keep reading the old one); regenerate only then, with DDPUSH_WRITE_GOLDEN=1.
// ---------------------------------------------------------------------------------------

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/persist")
}

/// Every change variant and message kind, in three turns.
fn golden_turns() -> Vec<Vec<Change>> {
    let u = |i: u8| Uuid([i; 16]);
    vec![
        vec![
            Change::Created {
                uuid: u(1),
                at: Time::from_millis(1_700_000_000_123),
            },
            Change::Pushed {
                uuid: u(1),
                at: Time::from_millis(1_700_000_001_000),
                msg: PushMsg::Notify,
            },
        ],
        vec![
            Change::Pushed {
                uuid: u(2),
                at: Time::from_millis(1_700_000_002_000),
                msg: PushMsg::Bits(0x8000_0000_0000_0105),
            },
            Change::Pushed {
                uuid: u(3),
                at: Time::from_millis(1_700_000_003_000),
                msg: PushMsg::Payload(Content::from_static(b"hello \x00\xff golden")),
            },
            Change::Cleared {
                uuid: u(2),
                kind: Kind::Bits,
                bits: 0x105,
            },
        ],
        vec![
            Change::Cleared {
                uuid: u(1),
                kind: Kind::Notify,
                bits: 0,
            },
            Change::Cleared {
                uuid: u(3),
                kind: Kind::Payload,
                bits: 0,
            },
            Change::Removed { uuid: u(4) },
        ],
    ]
}

/// Records covering every optional field and both address families.
fn golden_records(with_v6_extras: bool) -> Vec<RecordState> {
    let mut v: Vec<RecordState> = (0..4).map(|i| rec(i * 3 + 1)).collect();
    v[1].addr = Some(if with_v6_extras {
        "[2001:db8::7%3]:9966".parse().unwrap()
    } else {
        "[2001:db8::7]:9966".parse().unwrap()
    });
    v[2].addr = None;
    v[2].last_heartbeat = None;
    v[3].last_push = Some(Time::from_millis(1_700_000_009_999));
    v[3].payload = Some(Content::from_static(b"golden payload"));
    v
}

fn journal_v2_bytes(gen: u64, turns: &[Vec<Change>]) -> Vec<u8> {
    let mut out = journal::header(gen).to_vec();
    let mut p = Vec::new();
    for t in turns {
        journal::encode_turn(&mut p, t);
        frame_into(&mut out, &p);
    }
    out
}

fn journal_v1_bytes(gen: u64, turns: &[Vec<Change>]) -> Vec<u8> {
    let mut out = b"DDPUSHJN".to_vec();
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&gen.to_be_bytes());
    for t in turns {
        frame_into(&mut out, &cbor(t));
    }
    out
}

fn snapshot_v1_bytes(recs: &[RecordState]) -> Vec<u8> {
    let mut v1 = SNAP_MAGIC.to_vec();
    v1.extend_from_slice(&1u32.to_be_bytes());
    frame_into(
        &mut v1,
        &cbor(&SnapHeader {
            gen: 7,
            taken_ms: 1_700_000_010_000,
        }),
    );
    frame_into(&mut v1, &cbor(&recs.to_vec()));
    frame_into(
        &mut v1,
        &cbor(&SnapEnd {
            records: recs.len() as u64,
            keys: 0,
            removed: 0,
        }),
    );
    v1
}

fn golden(name: &str, fresh: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    let path = golden_dir().join(name);
    if std::env::var_os("DDPUSH_WRITE_GOLDEN").is_some() {
        fs::create_dir_all(golden_dir()).unwrap();
        fs::write(&path, fresh()).unwrap();
    }
    fs::read(&path).unwrap_or_else(|e| panic!("golden file {} is required: {e}", path.display()))
}

#[test]
fn golden_journal_v2_is_what_this_release_writes() {
    let turns = golden_turns();
    let file = golden("journal-v2.log", || journal_v2_bytes(5, &turns));
    assert_eq!(
        journal_v2_bytes(5, &turns),
        file,
        "the journal encoding changed: add a version instead"
    );
    // And the store itself writes exactly these bytes.
    let dir = tempfile::tempdir().unwrap();
    let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
    for t in &turns {
        st.commit(t, false).unwrap();
    }
    let written = fs::read(journal_path(&st)).unwrap();
    assert_eq!(written[20..], file[20..]);
    let s = scan_journal(&file, |_| {});
    assert_eq!((s.version, s.gen, s.frames), (2, 5, 3));
    assert_eq!(
        read_all(&golden_dir().join("journal-v2.log")).0,
        turns.concat()
    );
}

#[test]
fn golden_journal_v1_from_earlier_releases_still_reads() {
    let turns = golden_turns();
    let file = golden("journal-v1.log", || journal_v1_bytes(4, &turns));
    let mut got = Vec::new();
    let (gen, tail) = read_journal("v1", &file, |c| got.push(c)).unwrap();
    assert_eq!((gen, tail), (4, Tail::Clean));
    assert_eq!(got, turns.concat());
}

#[test]
fn golden_snapshot_v2_is_what_this_release_writes() {
    let recs = golden_records(true);
    let fresh = || encode_snapshot(7, 1_700_000_010_000, recs.clone().into_iter());
    let file = golden("snapshot-v2.cbor", fresh);
    assert_eq!(
        fresh(),
        file,
        "the snapshot encoding changed: add a version instead"
    );
    let mut back = Vec::new();
    let h = read_snapshot("v2", &file, |r| back.push(r)).unwrap();
    assert_eq!((h.gen, h.taken_ms), (7, 1_700_000_010_000));
    assert_eq!(back, recs);
}

#[test]
fn golden_snapshot_v1_from_earlier_releases_still_reads() {
    let recs = golden_records(false);
    let file = golden("snapshot-v1.cbor", || snapshot_v1_bytes(&recs));
    let mut back = Vec::new();
    assert_eq!(read_snapshot("v1", &file, |r| back.push(r)).unwrap().gen, 7);
    assert_eq!(back, recs);
}

#[test]
fn a_data_dir_of_an_earlier_release_loads_and_continues_in_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let turns = golden_turns();
    fs::write(
        dir.path().join(SNAPSHOT),
        golden("snapshot-v1.cbor", || unreachable!()),
    )
    .unwrap();
    fs::write(
        dir.path().join(journal_name(7)),
        golden("journal-v1.log", || unreachable!()),
    )
    .unwrap();
    let mut r = recovery();
    let (mut st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!((rep.snapshot_records, rep.replayed), (4, 8));
    st.commit(&turns[0], false).unwrap();
    assert_eq!(
        scan_journal(&fs::read(journal_path(&st)).unwrap(), |_| {}).version,
        2
    );
    drop(st);
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!(rep.replayed, 10);
}

// ---------------------------------------------------------------------------------------
// check / recover on journals and snapshots damaged at every offset class.
// ---------------------------------------------------------------------------------------

/// A data dir with one journal of four turns; returns the dir, the journal path, the frame
/// offsets and the changes per turn.
fn four_turns() -> (tempfile::TempDir, PathBuf, Vec<usize>, Vec<Vec<Change>>) {
    let dir = tempfile::tempdir().unwrap();
    let turns: Vec<Vec<Change>> = (0..4u8)
        .map(|t| vec![pushed(t * 2), pushed(t * 2 + 1)])
        .collect();
    let path = {
        let (mut st, _) = Store::open(dir.path(), &mut recovery()).unwrap();
        for t in &turns {
            st.commit(t, false).unwrap();
        }
        journal_path(&st)
    };
    let buf = fs::read(&path).unwrap();
    let mut offs = Vec::new();
    let mut o = journal::HEADER_LEN;
    while o < buf.len() {
        offs.push(o);
        o += 8 + u32::from_be_bytes(buf[o..o + 4].try_into().unwrap()) as usize;
    }
    assert_eq!(offs.len(), 4);
    (dir, path, offs, turns)
}

fn fix_crc(buf: &mut [u8], off: usize) {
    let len = u32::from_be_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
    let crc = crc32fast::hash(&buf[off + 8..off + 8 + len]);
    buf[off + 4..off + 8].copy_from_slice(&crc.to_be_bytes());
}

#[derive(Debug)]
enum Expect {
    /// Start-up loads it as is (torn tail or torn header), keeping this many turns.
    Loads(usize),
    /// Start-up refuses; recover keeps this many turns.
    Recovers(usize),
}

#[test]
fn check_and_recover_at_every_offset_class_of_a_journal() {
    type Damage = fn(&mut Vec<u8>, &[usize]);
    let cases: Vec<(&str, Damage, Expect)> = vec![
        ("header cut", |b, _| b.truncate(11), Expect::Loads(0)),
        ("header magic", |b, _| b[2] ^= 0x20, Expect::Recovers(0)),
        ("header version", |b, _| b[11] = 9, Expect::Recovers(0)),
        (
            "frame length",
            |b, o| b[o[1]..o[1] + 4].copy_from_slice(&u32::MAX.to_be_bytes()),
            Expect::Recovers(1),
        ),
        (
            "frame length past the end of the last frame",
            |b, o| b[o[3]..o[3] + 4].copy_from_slice(&1000u32.to_be_bytes()),
            Expect::Loads(3),
        ),
        (
            "zeros after the last frame (power loss)",
            |b, _| b.resize(b.len() + 4096, 0),
            Expect::Loads(4),
        ),
        (
            "zeros in place of the last frame",
            |b, o| {
                let n = b.len();
                b[o[3]..n].fill(0)
            },
            Expect::Loads(3),
        ),
        (
            "zeros mid-file",
            |b, o| b[o[1]..o[2]].fill(0),
            Expect::Recovers(1),
        ),
        ("crc", |b, o| b[o[1] + 5] ^= 1, Expect::Recovers(1)),
        ("payload", |b, o| b[o[2] + 12] ^= 0x40, Expect::Recovers(2)),
        (
            "payload, crc fixed (decode error)",
            |b, o| {
                b[o[2] + 12] = 99; // first change's tag
                fix_crc(b, o[2]);
            },
            Expect::Recovers(2),
        ),
        (
            "mid-file cut",
            |b, o| b.truncate(o[2] + 13),
            Expect::Loads(2),
        ),
        (
            "cut in a frame head",
            |b, o| b.truncate(o[1] + 3),
            Expect::Loads(1),
        ),
        (
            "last frame cut",
            |b, _| {
                let n = b.len() - 5;
                b.truncate(n)
            },
            Expect::Loads(3),
        ),
        (
            "last frame corrupt",
            |b, _| {
                let n = b.len() - 1;
                b[n] ^= 1
            },
            Expect::Loads(3),
        ),
    ];
    for (what, damage, expect) in cases {
        let (dir, path, offs, turns) = four_turns();
        let mut buf = fs::read(&path).unwrap();
        damage(&mut buf, &offs);
        fs::write(&path, &buf).unwrap();
        let reports = check::check(dir.path()).unwrap();
        let rep = reports.iter().find(|r| r.path == path).unwrap();
        let kept = match expect {
            Expect::Loads(n) => {
                assert!(!rep.damaged(), "{what}: {rep}");
                assert_eq!(rep.frames as usize, n, "{what}: {rep}");
                assert!(check::recover(dir.path()).unwrap().is_empty(), "{what}");
                n
            }
            Expect::Recovers(n) => {
                assert!(rep.damaged(), "{what}: {rep}");
                assert!(
                    rep.to_string().contains("DAMAGED at byte offset"),
                    "{what}: {rep}"
                );
                let e = Store::open(dir.path(), &mut recovery())
                    .err()
                    .unwrap()
                    .to_string();
                assert!(e.contains("ddpushd recover"), "{what}: {e}");
                let done = check::recover(dir.path()).unwrap();
                assert_eq!(done.len(), 1, "{what}");
                let d = &done[0];
                assert_eq!(d.frames as usize, n, "{what}: {d}");
                let kept_len = if n == 0 { 0 } else { offs[n] };
                let expect_aside = if rep.version == 0 {
                    buf.len()
                } else {
                    buf.len() - kept_len.max(20)
                };
                assert_eq!(d.set_aside as usize, expect_aside, "{what}: {d}");
                // The original is kept whole, never deleted.
                assert_eq!(fs::read(&d.aside).unwrap(), buf, "{what}");
                assert!(!check::check(dir.path())
                    .unwrap()
                    .iter()
                    .any(|r| r.damaged()));
                n
            }
        };
        let mut r = recovery();
        let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
        assert_eq!(
            rep.replayed as usize,
            turns[..kept].concat().len(),
            "{what}"
        );
    }
}

#[test]
fn a_journal_cut_at_any_byte_loads_as_a_torn_tail_never_as_damage() {
    // What a crash can leave: every prefix. The check for whole frames after a length that
    // runs past the end must never take our own bytes for such frames.
    let (_dir, path, offs, turns) = four_turns();
    let buf = fs::read(&path).unwrap();
    for cut in 0..buf.len() {
        let s = journal::scan_journal(&buf[..cut], |_| {});
        let whole = offs.iter().skip(1).filter(|&&o| o <= cut).count();
        let whole = if cut == buf.len() { turns.len() } else { whole };
        match s.end {
            journal::End::Clean | journal::End::Torn(_) => {
                assert_eq!(s.frames as usize, whole, "cut at {cut}")
            }
            journal::End::Damaged { offset, what } => {
                panic!("cut at {cut}: damage at {offset}: {what}")
            }
        }
    }
}

#[test]
fn recover_keeps_the_whole_chunks_of_a_damaged_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let recs: Vec<RecordState> = (0..9000u32)
        .map(|i| {
            let mut r = rec((i % 200) as u8);
            r.uuid.0[..4].copy_from_slice(&i.to_be_bytes());
            r
        })
        .collect();
    let bytes = encode_snapshot(1, 0, recs.clone().into_iter());
    // Damage the third chunk (records 8192..9000).
    let s = scan_snapshot_offsets(&bytes);
    let mut bad = bytes.clone();
    bad[s[3] + 20] ^= 0xFF;
    fs::write(dir.path().join(SNAPSHOT), &bad).unwrap();
    let rep = check::check(dir.path()).unwrap();
    assert!(rep[0].damaged(), "{}", rep[0]);
    assert_eq!(rep[0].items, 8192, "{}", rep[0]);
    let done = check::recover(dir.path()).unwrap();
    assert_eq!((done[0].frames, done[0].items), (4, 8192), "{}", done[0]);
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!(rep.snapshot_records, 8192);
    assert_eq!(fs::read(&done[0].aside).unwrap(), bad);
}

/// Frame offsets of a snapshot (header frame first).
fn scan_snapshot_offsets(b: &[u8]) -> Vec<usize> {
    let mut offs = Vec::new();
    let mut o = 12;
    while o < b.len() {
        offs.push(o);
        o += 8 + u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    }
    offs
}

/// `tests/data/persist/release-0.1/` was written by the ddpushd of the previous release (its
/// v2 snapshot after a SIGTERM, then a v1 journal cut by `kill -9`): 12 pushes to
/// `a0 * 12 + i`: 0x10 when i % 3 == 0, 0x11 bit `1 << i` when 1, 0x20 "old-release-i" when 2.
#[test]
fn a_data_dir_written_by_the_previous_release_loads() {
    let src = golden_dir().join("release-0.1");
    let dir = tempfile::tempdir().unwrap();
    for e in fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let mut r = recovery();
    let (_st, rep) = Store::open(dir.path(), &mut r).unwrap();
    assert_eq!(
        (rep.snapshot_records, rep.replayed, rep.torn.len()),
        (6, 6, 0)
    );
    let node = r.finish();
    for i in 0..12u32 {
        let mut u = [0xA0u8; 16];
        u[12..].copy_from_slice(&i.to_be_bytes());
        let st = node
            .record(&Uuid(u))
            .unwrap_or_else(|| panic!("record {i} lost"));
        match i % 3 {
            0 => assert!(st.notify, "{i}"),
            1 => assert_eq!(st.bits, 1 << i, "{i}"),
            _ => assert_eq!(
                st.payload.as_deref(),
                Some(format!("old-release-{i}").as_bytes()),
                "{i}"
            ),
        }
    }
}

#[test]
fn a_snapshot_with_an_unreadable_header_is_set_aside_whole() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = encode_snapshot(1, 0, (0..5).map(rec));
    let mut bad = bytes.clone();
    bad[12 + 9] ^= 0xFF; // inside the header frame's payload: its CRC fails
    fs::write(dir.path().join(SNAPSHOT), &bad).unwrap();
    let rep = check::check(dir.path()).unwrap();
    assert!(rep[0].damaged(), "{}", rep[0]);
    let e = Store::open(dir.path(), &mut recovery())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("ddpushd recover"), "{e}");
    let done = check::recover(dir.path()).unwrap();
    assert!(!done[0].replaced, "{}", done[0]);
    assert_eq!(done[0].set_aside as usize, bad.len());
    assert!(
        done[0].to_string().contains("nothing readable"),
        "{}",
        done[0]
    );
    assert_eq!(fs::read(&done[0].aside).unwrap(), bad);
    assert!(!dir.path().join(SNAPSHOT).exists());
    let (_st, rep) = Store::open(dir.path(), &mut recovery()).unwrap();
    assert_eq!(rep.snapshot_records, 0);
}
