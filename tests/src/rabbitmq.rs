//! RabbitMQ as the scaler will read it: queue depth by AMQP passive declare and by
//! the management API.

use anyhow::Context as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

pub async fn connect(amqp_url: &str) -> anyhow::Result<Connection> {
    Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {}", redact(amqp_url)))
}

/// Declares a durable queue and publishes `count` persistent messages to it, each
/// confirmed by the broker.
pub async fn publish(conn: &Connection, queue: &str, count: usize) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for i in 0..count {
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("message {i}").as_bytes(),
                // delivery_mode 2: persistent, survives a broker restart.
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "message {i} to {queue} not acknowledged");
    }
    channel.close(200, "done".into()).await?;
    Ok(())
}

/// Ready messages by passive declare (what KEDA's `QueueLength` over AMQP reads).
pub async fn passive_depth(conn: &Connection, queue: &str) -> anyhow::Result<u32> {
    let channel = conn.create_channel().await?;
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("passive declare of {queue}"))?;
    let _ = channel.close(200, "done".into()).await;
    Ok(q.message_count())
}

/// `messages` (ready + unacknowledged) of a queue in vhost `/`, from the management
/// API at `management_url` (`http://user:pass@host:port`).
pub async fn management_depth(management_url: &str, queue: &str) -> anyhow::Result<u64> {
    let url = reqwest::Url::parse(management_url)?;
    let base = format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(15672)
    );
    let info: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/api/queues/%2f/{queue}"))
        .basic_auth(url.username(), url.password())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    info.get("messages")
        .and_then(|m| m.as_u64())
        .with_context(|| format!("no message count for {queue} yet"))
}

/// A URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}
