use super::*;
use std::time::Duration;

use blink_crds::demand::FunctionDemand;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};

fn key(s: &str) -> FunctionKey {
    s.parse().expect("valid key")
}

fn snapshot(seq: u64, functions: &[(&str, f64)]) -> Snapshot {
    Snapshot {
        activator: "a".into(),
        session: "s".into(),
        seq,
        functions: functions
            .iter()
            .map(|(k, in_flight)| FunctionDemand {
                key: key(k),
                in_flight: *in_flight,
                queued: 0.0,
                requests: 1,
                held_messages: 0,
            })
            .collect(),
    }
}

/// Whether the waker has a stored wake-up, without waiting for one.
async fn woken(waker: &Wake) -> bool {
    tokio::time::timeout(Duration::from_millis(1), waker.notified())
        .await
        .is_ok()
}

#[tokio::test]
async fn wakers_fire_on_pokes_and_on_demand_after_none() {
    let demand = Demand::new(DemandConfig::default());
    let t0 = Instant::now();
    let f = demand.waker(&key("ns/f"));
    let g = demand.waker(&key("ns/g"));

    // First demand for f: woken; g untouched.
    assert_eq!(
        demand.apply_snapshot(snapshot(1, &[("ns/f", 1.0)]), t0),
        SnapshotOutcome::Applied
    );
    assert!(woken(&f).await);
    assert!(!woken(&g).await);
    // f still has demand: no new wake-up.
    demand.apply_snapshot(snapshot(2, &[("ns/f", 2.0)]), t0);
    assert!(!woken(&f).await);
    // Every poke wakes, even with demand already known.
    demand.apply_poke(
        Poke {
            activator: "a".into(),
            session: "s".into(),
            key: key("ns/f"),
        },
        t0,
    );
    assert!(woken(&f).await);
    // Demand ends, then comes back: woken again.
    demand.apply_snapshot(snapshot(3, &[]), t0);
    assert!(!woken(&f).await);
    demand.apply_snapshot(snapshot(4, &[("ns/f", 1.0), ("ns/g", 1.0)]), t0);
    assert!(woken(&f).await);
    assert!(woken(&g).await);
    // A stale snapshot wakes nobody.
    demand.apply_snapshot(snapshot(5, &[]), t0);
    assert_eq!(
        demand.apply_snapshot(snapshot(5, &[("ns/f", 1.0)]), t0),
        SnapshotOutcome::Stale { last_seq: 5 }
    );
    assert!(!woken(&f).await);
}

#[tokio::test]
async fn a_wake_keeps_the_arrival_of_the_earliest_poke_not_taken() {
    let demand = Demand::new(DemandConfig::default());
    let f = demand.waker(&key("ns/f"));
    let poke = || Poke {
        activator: "a".into(),
        session: "s".into(),
        key: key("ns/f"),
    };
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(7);
    demand.apply_poke(poke(), t0);
    demand.apply_poke(poke(), t1);
    assert_eq!(f.take_poke(), Some(t0));
    assert_eq!(f.take_poke(), None);
    assert!(woken(&f).await);
    demand.apply_poke(poke(), t1);
    assert_eq!(f.take_poke(), Some(t1));
    // A snapshot's wake-up carries no poke.
    demand.apply_snapshot(snapshot(1, &[("ns/f", 1.0)]), t1);
    assert!(woken(&f).await);
    assert_eq!(f.take_poke(), None);
}

#[tokio::test]
async fn the_same_waker_is_shared_until_forgotten() {
    let demand = Demand::new(DemandConfig::default());
    let a = demand.waker(&key("ns/f"));
    let b = demand.waker(&key("ns/f"));
    assert!(Arc::ptr_eq(&a, &b));
    demand.apply_snapshot(snapshot(1, &[("ns/f", 1.0)]), Instant::now());
    demand.forget(&key("ns/f"));
    assert_eq!(
        demand.aggregate(&key("ns/f"), Instant::now()),
        FunctionDemandSum::default()
    );
    let c = demand.waker(&key("ns/f"));
    assert!(!Arc::ptr_eq(&a, &c));
}

#[test]
fn activator_pods_come_from_target_refs_of_endpoints_not_terminating() {
    let endpoint = |pod: Option<&str>, kind: &str, terminating: Option<bool>| Endpoint {
        addresses: vec!["10.244.0.9".into()],
        conditions: Some(EndpointConditions {
            ready: Some(terminating != Some(true)),
            serving: Some(true),
            terminating,
        }),
        target_ref: pod.map(|name| ObjectReference {
            kind: Some(kind.into()),
            name: Some(name.into()),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    };
    let slice = EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: vec![
            endpoint(Some("activator-1"), "Pod", None),
            endpoint(Some("activator-2"), "Pod", Some(false)),
            endpoint(Some("activator-3"), "Pod", Some(true)),
            endpoint(Some("some-vm"), "VirtualMachine", None),
            endpoint(None, "Pod", None),
        ],
        metadata: Default::default(),
        ports: None,
    };
    let expected: HashSet<String> = ["activator-1", "activator-2"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(pods_of(&slice), expected);
    let slices = HashMap::from([
        ("s1".to_owned(), pods_of(&slice)),
        ("s2".to_owned(), HashSet::from(["activator-9".to_owned()])),
    ]);
    assert_eq!(union(slices.values()).len(), 3);
}
