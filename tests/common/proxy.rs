//! A TCP proxy in front of the S3 server that records every request line, so tests can
//! count GETs per object, and can hold chosen requests back to simulate a slow network.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct State {
    requests: Mutex<Vec<String>>,
    /// (substring of the request target, delay)
    delays: Mutex<Vec<(String, Duration)>>,
    stop: AtomicBool,
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let st = st.clone();
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump_requests(client, server, st));
                std::thread::spawn(move || pump(s2, c2));
            }
        });
        Proxy { port, state }
    }

    /// Requests seen so far, as `METHOD TARGET`.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// GETs whose target contains `needle` (query strings included).
    pub fn gets(&self, needle: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains(needle))
            .count()
    }

    pub fn clear(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    pub fn delay(&self, needle: &str, d: Duration) {
        self.state
            .delays
            .lock()
            .unwrap()
            .push((needle.to_owned(), d));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Client → server. The S3 client sends only bodiless requests (GET, HEAD), so each
/// request is a header block ending in an empty line.
fn pump_requests(mut client: TcpStream, mut server: TcpStream, st: Arc<State>) {
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let req: Vec<u8> = pending.drain(..end + 4).collect();
            let line = String::from_utf8_lossy(&req)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let target: String = line.split(' ').take(2).collect::<Vec<_>>().join(" ");
            st.requests.lock().unwrap().push(target.clone());
            let delay = st
                .delays
                .lock()
                .unwrap()
                .iter()
                .find(|(n, _)| target.contains(n.as_str()))
                .map(|(_, d)| *d);
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            if server.write_all(&req).is_err() {
                return;
            }
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}
