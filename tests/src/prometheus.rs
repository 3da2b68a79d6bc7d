//! A stand-in Prometheus for tests: answers `/api/v1/query` with one sample whose value
//! the test sets, on 127.0.0.1 inside the bed's namespace.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use axum::{Router, extract::State, routing::get};

#[derive(Clone, Debug)]
pub struct FakePrometheus {
    value: Arc<AtomicU64>,
    pub url: String,
}

impl FakePrometheus {
    /// Serves until the test's runtime ends.
    pub async fn start(initial: f64) -> anyhow::Result<Self> {
        let value = Arc::new(AtomicU64::new(initial.to_bits()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = Router::new()
            .route("/api/v1/query", get(query))
            .with_state(value.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { value, url })
    }

    pub fn set(&self, value: f64) {
        self.value.store(value.to_bits(), Ordering::Relaxed);
    }
}

async fn query(State(value): State<Arc<AtomicU64>>) -> axum::Json<serde_json::Value> {
    let v = f64::from_bits(value.load(Ordering::Relaxed));
    axum::Json(serde_json::json!({
        "status": "success",
        "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [1_764_460_800.0, v.to_string()]}
        ]}
    }))
}
