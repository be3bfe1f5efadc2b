use std::collections::BTreeSet;

use super::*;
use crate::endpoint::Seen;

fn pool_of(n: usize) -> (Arc<Pool>, Vec<Arc<Endpoint>>) {
    let pool = Pool::new(
        Duration::from_secs(3600),
        Default::default(),
        Default::default(),
    );
    let mut eps = Vec::new();
    for i in 0..n {
        // Port 9 (discard) on loopback: never connected to, the channel is lazy.
        let ep = Endpoint::new(
            format!("127.0.0.{}:9", i + 1).as_str(),
            &Default::default(),
            Default::default(),
        )
        .unwrap();
        ep.set_seen(Seen {
            ready: true,
            models: [("m".to_string(), BTreeSet::from([1, 2]))].into(),
            known: ["m".to_string()].into(),
            versions: [("m".to_string(), BTreeSet::from([1, 2]))].into(),
            problem: None,
        });
        let task = tokio::spawn(async {});
        pool.endpoints
            .write()
            .unwrap()
            .insert(ep.addr.clone(), (ep.clone(), task));
        eps.push(ep);
    }
    (pool, eps)
}

/// Under paused time: after one slow and one fast round trip, p2c sends everything to the
/// fast worker while it has no backlog, and spreads again once its backlog costs more.
#[tokio::test(start_paused = true)]
async fn p2c_prefers_the_faster_and_less_loaded_worker() {
    let (pool, eps) = pool_of(2);
    let slow = eps[0].load.start();
    let fast = eps[1].load.start();
    tokio::time::advance(Duration::from_millis(1)).await;
    drop(fast);
    tokio::time::advance(Duration::from_millis(49)).await;
    drop(slow);
    for _ in 0..100 {
        assert_eq!(pool.pick("m", "").unwrap().0.addr, eps[1].addr);
    }
    // 60 requests outstanding on the fast one outweigh a 50× slower idle worker.
    let backlog: Vec<_> = (0..60).map(|_| eps[1].load.start()).collect();
    assert_eq!(pool.pick("m", "").unwrap().0.addr, eps[0].addr);
    drop(backlog);
}

#[tokio::test(start_paused = true)]
async fn version_routing_and_errors() {
    let (pool, eps) = pool_of(2);
    assert_eq!(
        pool.pick("m", "").unwrap().1,
        "2",
        "\"\" means the newest ready version"
    );
    assert_eq!(pool.pick("m", "1").unwrap().1, "1");
    let err = pool.pick("other", "").map(|_| ()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    eps.iter().for_each(|e| e.mark_unready("draining".into()));
    let err = pool.pick("m", "").map(|_| ()).unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(
        err.to_string().contains("'m'") && err.to_string().contains("127.0.0.1:9 (draining)"),
        "{err}"
    );
    let tried = vec![eps[0].addr.clone()];
    eps[0].set_seen(Seen {
        ready: true,
        ..eps[0].seen()
    });
    assert!(
        pool.pick_excluding("m", "", &tried).is_err(),
        "the only ready worker was tried"
    );
}
