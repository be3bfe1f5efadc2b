use std::time::Duration;

use super::{NoRoom, Placement, PlacementMetrics, Resident};

fn resident(name: &str, bytes: u64, in_flight: usize, idle_s: u64) -> Resident {
    Resident {
        name: name.into(),
        bytes,
        in_flight,
        idle: Duration::from_secs(idle_s),
        age: Duration::from_secs(idle_s),
    }
}

#[test]
fn victims_are_the_least_recently_used_that_may_go() {
    let p = Placement::new(100, Duration::from_secs(10), PlacementMetrics::default());
    p.pin("pinned");
    let loaded = [
        resident("pinned", 20, 0, 1000),
        resident("old", 20, 0, 500),
        resident("older", 20, 0, 900),
        resident("busy", 20, 1, 2000),
        resident("fresh", 10, 0, 1),
    ];
    // 90 used, 10 free.
    assert_eq!(p.victims(10, "new", &loaded), Ok(vec![]));
    assert_eq!(p.victims(30, "new", &loaded), Ok(vec!["older".to_string()]));
    assert_eq!(
        p.victims(50, "new", &loaded),
        Ok(vec!["older".to_string(), "old".to_string()])
    );
    // Only by evicting `fresh`, used a second ago: the churn guard.
    assert!(matches!(
        p.victims(60, "new", &loaded),
        Err(NoRoom::ChurnGuard(_))
    ));
    // More than pinned, busy and fresh leave room for.
    assert!(matches!(
        p.victims(70, "new", &loaded),
        Err(NoRoom::OverCapacity(_))
    ));
    assert!(
        matches!(p.victims(101, "new", &[]), Err(NoRoom::OverCapacity(m)) if m.contains("whole capacity"))
    );
    // A model being reloaded does not count against itself.
    assert_eq!(p.victims(40, "old", &loaded), Ok(vec!["older".to_string()]));
}
