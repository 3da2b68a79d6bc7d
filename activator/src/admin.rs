//! The admin port: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (every watch has listed, and the activator is not draining).

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

/// What `/readyz` reads: ready once listed, not ready again while draining.
#[derive(Debug, Clone)]
pub struct Readiness {
    pub listed: watch::Receiver<bool>,
    pub draining: CancellationToken,
}

impl Readiness {
    fn ready(&self) -> bool {
        *self.listed.borrow() && !self.draining.is_cancelled()
    }
}

pub fn answer(
    path: &str,
    registry: &Registry,
    readiness: &Readiness,
) -> (StatusCode, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => (
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, String::new()),
            }
        }
        "/healthz" => (StatusCode::OK, TEXT, "ok".to_owned()),
        "/readyz" if readiness.ready() => (StatusCode::OK, TEXT, "ready".to_owned()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready".to_owned(),
        ),
        _ => (StatusCode::NOT_FOUND, TEXT, "not found".to_owned()),
    }
}

pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let (registry, readiness) = (registry.clone(), readiness.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            let (status, content_type, body) = answer(request.uri().path(), &registry, &readiness);
            let response = Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)));
            async move {
                Ok::<_, Infallible>(response.unwrap_or_else(|_| Response::new(Full::default())))
            }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let mut registry = Registry::default();
        let _metrics = crate::metrics::Metrics::register(&mut registry);
        let (tx, listed) = watch::channel(false);
        let readiness = Readiness {
            listed,
            draining: CancellationToken::new(),
        };
        assert_eq!(
            answer("/readyz", &registry, &readiness).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        tx.send(true).expect("send");
        assert_eq!(answer("/readyz", &registry, &readiness).0, StatusCode::OK);
        readiness.draining.cancel();
        assert_eq!(
            answer("/readyz", &registry, &readiness).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(answer("/healthz", &registry, &readiness).0, StatusCode::OK);
        let (status, _, body) = answer("/metrics", &registry, &readiness);
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("blink_activator_connections"), "{body}");
        assert_eq!(
            answer("/nope", &registry, &readiness).0,
            StatusCode::NOT_FOUND
        );
    }
}
