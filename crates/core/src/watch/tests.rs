use std::path::PathBuf;

use super::*;

/// A watched file whose value is its text, refused when it does not end in ".".
fn entry(dir: &tempfile::TempDir) -> (PathBuf, Arc<Reloadable<String>>, Watched) {
    let path = dir.path().join("f");
    std::fs::write(&path, "first.").unwrap();
    let current = Reloadable::new("first.".to_string());
    let p = path.clone();
    let watched = current.watched("f", vec![path.clone()], move || {
        let text = std::fs::read_to_string(&p).map_err(|e| e.to_string())?;
        match text.ends_with('.') {
            true => Ok(text),
            false => Err(format!("incomplete: {text}")),
        }
    });
    (path, current, watched)
}

#[test]
fn a_change_is_applied_only_when_two_polls_read_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, current, watched) = entry(&dir);
    let mut settle = Settle {
        applied: watched.digest(),
        pending: None,
    };
    assert_eq!(settle.poll(&watched), None, "nothing changed");

    // A file still being written: each poll reads other bytes, so nothing is applied,
    // even though one of its states would load.
    std::fs::write(&path, "sec").unwrap();
    assert_eq!(settle.poll(&watched), None);
    std::fs::write(&path, "second.").unwrap();
    assert_eq!(settle.poll(&watched), None, "changed since the last poll");
    assert_eq!(*current.get(), "first.");
    assert_eq!(current.generation(), 0);
    assert_eq!(settle.poll(&watched), Some("ok"), "read twice: applied");
    assert_eq!(*current.get(), "second.");
    assert_eq!(current.generation(), 1);

    // A file that settles in a bad state: refused once, the last good one stays.
    std::fs::write(&path, "half-writ").unwrap();
    assert_eq!(settle.poll(&watched), None);
    assert_eq!(settle.poll(&watched), Some("error"));
    assert_eq!(settle.poll(&watched), None, "reported once");
    assert_eq!(*current.get(), "second.");
    assert_eq!(current.generation(), 1);
}
