//! The `--metrics-addr` HTTP endpoint: the mount's counters (`fetch::metrics`) for
//! Prometheus scrapers, served so that no client can hold the mount up.

use std::time::Duration;

/// Serves `render()` at `/metrics` to Prometheus scrapers. Every connection is
/// answered or dropped within `CONN_DEADLINE`, request and response alike, and the
/// accept loop never waits for one: beyond `MAX_CONNS` open connections a new one
/// gets 503 at once, so idle clients cost a task and a descriptor for two seconds at
/// most, and it takes a thousand of them, renewed every two seconds, to turn a
/// scraper away.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const MAX_CONNS: usize = 1024;
    const CONN_DEADLINE: Duration = Duration::from_secs(2);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNS));
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
                let _ = tokio::time::timeout(Duration::from_secs(1), sock.write_all(busy)).await;
            });
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(CONN_DEADLINE, async {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                // the request head, at most 8 KiB
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
                let (status, ctype, body) =
                    if line.starts_with(b"GET /metrics ") || line.starts_with(b"GET / ") {
                        ("200 OK", "text/plain; version=0.0.4", render())
                    } else {
                        ("404 Not Found", "text/plain", "try /metrics\n".to_owned())
                    };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(body.as_bytes()).await;
                let _ = sock.shutdown().await;
            })
            .await;
        });
    }
}
