//! One full decision pass over 10,000 functions in memory, as the scaler's 1 s tick
//! runs it: a mix of `http`, pull and mixed triggers in realistic states (steady,
//! bursting, quiet and going idle, cold with the occasional poke, failing with a
//! fallback), windows full from two minutes of history, each pass one second after
//! the last, and each decision applied as the caller would.

use std::hint::black_box;
use std::time::{Duration, Instant};

use blink_crds::scaled_object::{Fallback, FallbackBehavior};
use blink_scaler::decide::{Input, Policy, Reading, State, Step, TriggerPolicy, decide};
use criterion::{Criterion, criterion_group, criterion_main};

const FUNCTIONS: usize = 10_000;

#[derive(Clone, Copy)]
enum Profile {
    /// `http` only, steady demand with noise.
    Http,
    /// `http` only, with a burst every few minutes (panic mode).
    Bursty,
    /// A queue trigger.
    Queue,
    /// `http` plus a queue.
    Mixed,
    /// Cold at zero; a poke now and then.
    Cold,
    /// A queue whose reads fail for stretches, with a fallback.
    Failing,
}

struct Function {
    policy: Policy,
    state: State,
    profile: Profile,
    seed: u64,
    current: i32,
    readings: Vec<Reading>,
}

/// A cheap deterministic hash of (function, second): reproducible readings without
/// a random source.
fn noise(seed: u64, tick: u64) -> f64 {
    let mut x = seed ^ tick.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    (x % 10_000) as f64 / 10_000.0
}

fn http(concurrency: f64) -> Reading {
    Reading::Http {
        concurrency,
        target: 10.0,
        active: concurrency > 0.0,
    }
}

fn queue(value: f64) -> Reading {
    Reading::Metric {
        value,
        target: 20.0,
        activation: 0.0,
    }
}

impl Function {
    fn new(i: usize) -> Self {
        let profile = match i % 20 {
            0..=5 => Profile::Http,
            6..=7 => Profile::Bursty,
            8..=12 => Profile::Queue,
            13..=15 => Profile::Mixed,
            16..=18 => Profile::Cold,
            _ => Profile::Failing,
        };
        let names: &[&str] = match profile {
            Profile::Http | Profile::Bursty | Profile::Cold => &["http"],
            Profile::Queue | Profile::Failing => &["queue"],
            Profile::Mixed => &["http", "queue"],
        };
        let policy = Policy {
            min: i32::from(i.is_multiple_of(7)),
            max: 200,
            fallback: matches!(profile, Profile::Failing).then_some(Fallback {
                behavior: Some(FallbackBehavior::CurrentReplicasIfHigher),
                failure_threshold: 3,
                replicas: 2,
            }),
            triggers: names
                .iter()
                .map(|n| TriggerPolicy {
                    name: (*n).into(),
                    value_metric: false,
                })
                .collect(),
            ..Policy::default()
        };
        Self {
            policy,
            state: State::default(),
            profile,
            seed: i as u64,
            current: 0,
            readings: Vec::with_capacity(2),
        }
    }

    fn read(&mut self, tick: u64) {
        let n = noise(self.seed, tick);
        // A per-function offset, hashed so that profiles do not move in lockstep.
        let offset = (noise(self.seed, u64::MAX) * 600.0) as u64;
        let phase = (offset + tick) % 600;
        self.readings.clear();
        match self.profile {
            Profile::Http => self.readings.push(http(20.0 + 40.0 * n)),
            Profile::Bursty => {
                let burst = if phase < 20 { 400.0 } else { 0.0 };
                self.readings.push(http(burst + 10.0 * n));
            }
            Profile::Queue => {
                // Busy for five minutes, then quiet for five: it goes idle and wakes.
                let value = if phase < 300 { 100.0 * n } else { 0.0 };
                self.readings.push(queue(value));
            }
            Profile::Mixed => {
                self.readings.push(http(30.0 * n));
                self.readings.push(queue(if n > 0.5 { 50.0 } else { 0.0 }));
            }
            Profile::Cold => self.readings.push(http(if n > 0.995 { 1.0 } else { 0.0 })),
            Profile::Failing => {
                if phase % 120 < 30 {
                    self.readings.push(Reading::Failed);
                } else {
                    self.readings.push(queue(60.0 * n));
                }
            }
        }
    }
}

/// What one pass decided, to show the mix of states the benchmark exercises.
#[derive(Debug, Default)]
struct Tally {
    replicas: i64,
    at_zero: u32,
    panicking: u32,
    fallback: u32,
    error_hold: u32,
    wake: u32,
    idle: u32,
    scale: u32,
}

/// One pass: every function reads and decides at `now`, and its count is applied.
fn pass(fleet: &mut [Function], base: Instant, tick: u64) -> Tally {
    let now = base + Duration::from_secs(tick);
    let mut tally = Tally::default();
    for f in fleet.iter_mut() {
        f.read(tick);
        let input = Input {
            now,
            current: f.current,
            ready: f.current,
            paused: None,
            conflict: false,
            stalled: false,
            triggers: &f.readings,
            held_work: matches!(f.profile, Profile::Cold) && noise(f.seed ^ 1, tick) > 0.998,
            lease_acquired_at: base,
        };
        let d = decide(&f.policy, &mut f.state, &input);
        f.current = d.replicas;
        tally.replicas += i64::from(d.replicas);
        tally.at_zero += u32::from(d.replicas == 0);
        tally.panicking += u32::from(d.panicking);
        tally.fallback += u32::from(d.fallback);
        match d.step {
            Step::ErrorHold => tally.error_hold += 1,
            Step::Wake => tally.wake += 1,
            Step::Idle => tally.idle += 1,
            Step::Scale => tally.scale += 1,
            _ => {}
        }
    }
    tally
}

fn bench(c: &mut Criterion) {
    let base = Instant::now();
    let mut fleet: Vec<Function> = (0..FUNCTIONS).map(Function::new).collect();
    // Two minutes of history: windows full, some functions warm, some idle.
    let mut tick = 0;
    let mut tally = Tally::default();
    while tick < 120 {
        tally = pass(&mut fleet, base, tick);
        tick += 1;
    }
    println!("last warm-up pass: {tally:?}");
    c.bench_function("decide: one pass over 10,000 functions", |b| {
        b.iter(|| {
            tick += 1;
            black_box(pass(&mut fleet, base, tick))
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30);
    targets = bench
}
criterion_main!(benches);
