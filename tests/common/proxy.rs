//! A TCP proxy in front of the S3 server that records every request line, so tests can
//! count GETs per object, and injects faults into chosen requests: delays, error
//! statuses, connections cut mid-response, and responses slowed to a trickle.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Makes a whole raw HTTP response (status line, headers, body) for a request target.
pub type Responder = std::sync::Arc<dyn Fn(&str) -> Vec<u8> + Send + Sync>;

#[derive(Clone)]
pub enum Fault {
    /// Hold the request back this long before forwarding it.
    Delay(Duration),
    /// Answer with this HTTP status instead of forwarding.
    Status(u16),
    /// Forward, then cut the connection after this many response bytes.
    CutAfter(usize),
    /// Forward, then pass the response on at this many bytes per second.
    Trickle(usize),
    /// Answer with what this makes of the request target instead of forwarding (a
    /// server that lies in well-formed replies).
    Respond(Responder),
}

impl std::fmt::Debug for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Delay(d) => write!(f, "Delay({d:?})"),
            Fault::Status(s) => write!(f, "Status({s})"),
            Fault::CutAfter(n) => write!(f, "CutAfter({n})"),
            Fault::Trickle(n) => write!(f, "Trickle({n})"),
            Fault::Respond(_) => write!(f, "Respond(..)"),
        }
    }
}

/// A raw HTTP/1.1 200 response carrying `body`.
pub fn http_200(content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

struct Rule {
    needle: String,
    fault: Fault,
    times: usize,
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<String>>,
    rules: Mutex<Vec<Rule>>,
    stop: AtomicBool,
    /// The `Authorization` header value every request must carry (else 401).
    auth: Mutex<Option<String>>,
}

/// What the response pump of one connection must do to the current response.
#[derive(Default)]
struct ConnFault {
    cut_after: Option<usize>,
    trickle: Option<usize>,
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
                    // upstream down: the client sees a reset connection
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let st = st.clone();
                let cf: Arc<Mutex<ConnFault>> = Arc::default();
                let (c2, s2, cf2) = (
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    cf.clone(),
                );
                std::thread::spawn(move || pump_requests(client, server, st, cf));
                std::thread::spawn(move || pump_responses(s2, c2, cf2));
            }
        });
        Proxy { port, state }
    }

    /// Requests seen so far, as `METHOD TARGET`.
    pub fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests seen so far whose `METHOD TARGET` contains `needle`.
    pub fn requests_with(&self, needle: &str) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.contains(needle))
            .collect()
    }

    /// GETs whose target contains `needle` (query strings included).
    pub fn gets(&self, needle: &str) -> usize {
        self.requests_with(needle)
            .iter()
            .filter(|r| r.starts_with("GET "))
            .count()
    }

    /// Whole-object downloads started: GETs whose target contains `needle`, less Range
    /// GETs (a reference prefetch that made way for a reader goes on with one from
    /// where it stopped, the start included if it had read nothing yet). For caches
    /// without file indexes, whose NARs are only ever read whole.
    pub fn downloads(&self, needle: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains(needle))
            .filter(|r| !r.contains(" range="))
            .count()
    }

    /// Bytes asked for by the Range GETs whose target contains `needle`.
    pub fn range_bytes(&self, needle: &str) -> u64 {
        self.requests()
            .iter()
            .filter(|r| r.starts_with("GET ") && r.contains(needle))
            .filter_map(|r| r.split_once("range=bytes=")?.1.split_once('-'))
            .map(|(a, b)| b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1)
            .sum()
    }

    pub fn clear(&self) {
        self.state.requests.lock().unwrap().clear();
    }

    pub fn delay(&self, needle: &str, d: Duration) {
        self.fault(needle, Fault::Delay(d), usize::MAX);
    }

    /// Applies `fault` to the next `times` requests whose target contains `needle`.
    pub fn fault(&self, needle: &str, fault: Fault, times: usize) {
        self.state.rules.lock().unwrap().push(Rule {
            needle: needle.to_owned(),
            fault,
            times,
        });
    }

    pub fn clear_faults(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// Answers 401 to every request without HTTP basic auth as `user:password`.
    pub fn require_basic_auth(&self, user: &str, password: &str) {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        *self.state.auth.lock().unwrap() = Some(format!("Basic {token}"));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump_responses(mut from: TcpStream, mut to: TcpStream, cf: Arc<Mutex<ConnFault>>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0usize;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let (cut, trickle) = {
            let f = cf.lock().unwrap();
            (f.cut_after, f.trickle)
        };
        if let Some(limit) = cut {
            let allowed = limit.saturating_sub(sent).min(n);
            let _ = to.write_all(&buf[..allowed]);
            if sent + n >= limit {
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
        } else if let Some(bps) = trickle {
            for chunk in buf[..n].chunks(bps.clamp(1, 1024)) {
                if to.write_all(chunk).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs_f64(
                    chunk.len() as f64 / bps.max(1) as f64,
                ));
            }
        } else if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Client → server. The S3 client sends only bodiless requests (GET, HEAD), so each
/// request is a header block ending in an empty line.
fn pump_requests(
    mut client: TcpStream,
    mut server: TcpStream,
    st: Arc<State>,
    cf: Arc<Mutex<ConnFault>>,
) {
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
            let mut target: String = line.split(' ').take(2).collect::<Vec<_>>().join(" ");
            // a Range GET is recorded with its range: `GET /key range=bytes=a-b`
            if let Some(range) = String::from_utf8_lossy(&req).lines().find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("range"))
                    .map(|(_, v)| v.trim().to_owned())
            }) {
                target = format!("{target} range={range}");
            }
            st.requests.lock().unwrap().push(target.clone());
            if let Some(want) = st.auth.lock().unwrap().clone() {
                let text = String::from_utf8_lossy(&req);
                let ok = text.lines().any(|l| {
                    l.split_once(':').is_some_and(|(k, v)| {
                        k.eq_ignore_ascii_case("authorization") && v.trim() == want
                    })
                });
                if !ok {
                    let resp = "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
                    if client.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                    continue;
                }
            }
            let fault = {
                let mut rules = st.rules.lock().unwrap();
                rules
                    .iter_mut()
                    .find(|r| r.times > 0 && target.contains(r.needle.as_str()))
                    .map(|r| {
                        r.times -= 1;
                        r.fault.clone()
                    })
            };
            {
                let mut f = cf.lock().unwrap();
                *f = ConnFault::default();
                match fault {
                    Some(Fault::CutAfter(n)) => f.cut_after = Some(n),
                    Some(Fault::Trickle(bps)) => f.trickle = Some(bps),
                    _ => {}
                }
            }
            match fault {
                Some(Fault::Delay(d)) => std::thread::sleep(d),
                Some(Fault::Respond(make)) => {
                    if client.write_all(&make(&target)).is_err() {
                        return;
                    }
                    continue;
                }
                Some(Fault::Status(code)) => {
                    let resp = format!("HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\n\r\n");
                    if client.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                    continue;
                }
                _ => {}
            }
            if server.write_all(&req).is_err() {
                return;
            }
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}
