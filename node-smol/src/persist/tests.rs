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
    frame_into(&mut v1, &cbor(&SnapEnd { records: 7 }));
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
