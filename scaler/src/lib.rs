//! Blink's control plane: watches `ScaledObject`s and annotated workloads, decides from
//! demand, and patches `/scale`.
//!
//! Where things are decided:
//! - [`decide`]: how many replicas a function should have (pure, no I/O).
//! - [`triggers`]: what a pull trigger measures (RabbitMQ, Kafka, Prometheus, cron).
//! - [`demand`]: what activators report (snapshots, pokes) and who may report it.
//! - [`leader`]: whether this process may write.
#![forbid(unsafe_code)]

pub mod decide;
pub mod demand;
pub mod leader;
pub mod triggers;
