//! Issue 34, first part: tokentally's schema on a ClickHouse cluster of two replicas
//! (`scripts/services start-cluster`: ZooKeeper and two ClickHouse servers), migrated
//! `ON CLUSTER` as replicated tables.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::workload::{build, Mix};

/// Stops the local cluster when the test ends, passing or failing: two servers and a
/// JVM left idle beside the other tests slow them.
struct StopsCluster;

impl Drop for StopsCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo().join("scripts/services"))
            .arg("stop-cluster")
            .status();
    }
}

/// Stored events on a replica, or `None` while it does not answer.
async fn events_on(env: &TestEnv) -> Option<i64> {
    env.ch()
        .query("SELECT toInt64(sum(sign)) FROM usage_events")
        .fetch_one::<i64>()
        .await
        .ok()
}

/// Ingest writes to replica r1; r2 is `kill -9`'d halfway through and started again.
/// (Run alone by scripts/test: it starts and stops the cluster.)
/// Replication brings r2 every event stored while it was down: afterwards both replicas
/// hold every event once, every rejection and duplicate, and rollups equal to the raw
/// events (each replica's views fed by its own inserts and the replicated rollup parts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_during_ingest_catches_up_with_every_event_once() {
    let _stops = StopsCluster;
    let env = TestEnv::new_cluster("cluster", 2).await;
    let r2 = env.on(REPLICA_URLS[1]);
    let tables: i64 = r2
        .scalar(&format!(
            "SELECT toInt64(count()) FROM system.tables WHERE database = '{}' AND engine LIKE 'Replicated%'",
            env.name
        ))
        .await;
    assert!(
        tables >= 30,
        "the schema is replicated on r2: {tables} tables"
    );
    let mix = Mix {
        events: 20_000,
        duplicates: 0.05,
        malformed: 0.01,
        unknown_model: 0.0,
        institutions: 6,
    };
    let w = build(34, &mix, &env.prices);
    let (first, second) = w.messages.split_at(w.messages.len() / 2);
    env.produce(first).await;
    let mut ingest = env.spawn_ingest();
    env.wait_accounted(first.len() as i64, Duration::from_secs(120))
        .await;
    let before = events_on(&r2).await.expect("r2 answers");
    assert!(before > 0, "r2 holds what r1 stored");

    services("kill-replica 2");
    env.produce(second).await;
    env.wait_accounted(w.messages.len() as i64, Duration::from_secs(180))
        .await;
    assert_eq!(events_on(&r2).await, None, "r2 is down");
    services("start-replica 2");
    let restarted = Instant::now();
    loop {
        if events_on(&r2).await == Some(w.events) && r2.accounted().await == w.messages.len() as i64
        {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(120),
            "r2 holds {:?} of {} events 120 s after its restart",
            events_on(&r2).await,
            w.events
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "replica r2 caught up {:.1} s after its restart ({} events, {} stored while it was down)",
        restarted.elapsed().as_secs_f64(),
        w.events,
        w.events - before
    );
    let status = terminate(&mut ingest);
    assert!(status.success(), "ingest exits 0 on SIGTERM, got {status}");
    for replica in [&env, &r2] {
        crate::pipeline::assert_exact(replica, &w).await;
        replica.assert_rollups_match_events().await;
    }
    let _ = env
        .exec(&format!(
            "DROP DATABASE IF EXISTS `{}` ON CLUSTER tokentally",
            env.name
        ))
        .await;
}
