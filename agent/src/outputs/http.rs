//! The HTTP endpoint Prometheus scrapes: `GET /metrics`.

use std::{convert::Infallible, net::SocketAddr};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use super::metrics::Metrics;

/// Binds `addr` now, so a taken port fails start-up instead of a background task.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` turns true; connections in flight finish on their own.
pub async fn serve(listener: TcpListener, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics endpoint: accept: {e}");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics endpoint: connection from {peer}: {e}");
            }
        });
    }
}

fn respond<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/contention") => (
            StatusCode::OK,
            "application/json",
            metrics
                .shared
                .contention
                .lock()
                .ok()
                .and_then(|p| serde_json::to_string(&p.snapshot).ok())
                .unwrap_or_else(|| "{}".to_owned()),
        ),
        (&Method::GET, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "nodewarden: metrics at /metrics, lock contention at /contention\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}
