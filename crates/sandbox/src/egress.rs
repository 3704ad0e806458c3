//! The egress proxy of a run with `network = { allow = [...] }`.
//!
//! The jail keeps its own network namespace with only loopback. Its init listens on
//! `127.0.0.1:3128` inside that namespace and hands the listening socket to the supervisor,
//! which serves it here, in the host's namespace: HTTP `CONNECT` (HTTPS and other tunnels) and
//! plain HTTP with absolute URLs. Each request names a host; it goes through only when a rule of
//! the run's allow list matches the name and port, the proxy's own resolution of the name gives
//! an address that is not loopback, private, link-local (metadata) or otherwise internal, and,
//! for TLS, the ClientHello's server name is the name that was allowed. Every connection,
//! allowed or refused, is logged with its bytes for the run's report.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleetbox_proto::egress::forbidden_address;
use fleetbox_proto::{EgressConnection, EgressRule, MAX_EGRESS_LISTED};

/// Where programs find the proxy, inside the jail's network namespace.
pub const PROXY_PORT: u16 = 3128;
/// Why a backend other than the jail refuses an allow list.
pub const NEEDS_JAIL: &str = "`network = { allow = [...] }` needs the `jail` backend: only it \
     keeps the run in its own network namespace with the egress proxy as the one way out";
/// Connections open at once; more are refused (and logged).
const MAX_OPEN: usize = 64;
/// A request's head: at most this many bytes, sent within [`HEAD_TIMEOUT`].
const MAX_HEAD: usize = 16 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the end of a run waits for connections still being set up.
const FINISH_WAIT: Duration = Duration::from_millis(500);

/// The proxy's environment for the program: ordinary clients (pip, requests, urllib, curl)
/// use it without being told.
pub fn program_env() -> Vec<(String, String)> {
    let url = format!("http://127.0.0.1:{PROXY_PORT}");
    ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
        .into_iter()
        .map(|k| (k.to_string(), url.clone()))
        .chain([
            ("NO_PROXY".to_string(), String::new()),
            ("PIP_PROXY".to_string(), url.clone()),
        ])
        .collect()
}

/// How the proxy resolves names: a hosts file's entries first (an operator's pinned names, or a
/// test's), then the system resolver.
#[derive(Debug, Default, Clone)]
pub struct Resolver {
    pinned: HashMap<String, Vec<IpAddr>>,
}

impl Resolver {
    /// Read a hosts file (`ADDRESS NAME...` per line, `#` comments).
    pub fn from_hosts_file(path: &Path) -> Result<Resolver, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the egress hosts file `{}`: {e}", path.display()))?;
        let mut pinned: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            let mut words = line.split_whitespace();
            let Some(addr) = words.next() else { continue };
            let ip: IpAddr = addr.parse().map_err(|_| {
                format!(
                    "`{}` line {}: `{addr}` is not an address",
                    path.display(),
                    n + 1
                )
            })?;
            for name in words {
                pinned
                    .entry(name.trim_end_matches('.').to_ascii_lowercase())
                    .or_default()
                    .push(ip);
            }
        }
        Ok(Resolver { pinned })
    }

    fn resolve(&self, host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        if let Some(ips) = self.pinned.get(host) {
            return Ok(ips.clone());
        }
        (host, port)
            .to_socket_addrs()
            .map(|a| a.map(|a| a.ip()).collect())
            .map_err(|e| format!("`{host}` does not resolve: {e}"))
    }
}

/// What a proxy logged and has not yet been taken: each connection once it ends, and how many
/// were left out past [`MAX_EGRESS_LISTED`] since the last take. A session takes it after each
/// call (a connection still open then is listed with the call it ends in).
#[derive(Debug, Default)]
pub struct EgressLog {
    entries: Mutex<Vec<EgressConnection>>,
    unlisted: AtomicU64,
    /// Connections being served (listed when they end).
    serving: Mutex<usize>,
    served: Condvar,
}

impl EgressLog {
    fn opened(&self) {
        *lock(&self.serving) += 1;
    }

    /// A connection ended: listed and no longer serving at once, so that [`EgressLog::take`]
    /// sees one or the other.
    fn ended(&self, entry: Option<EgressConnection>) {
        let mut serving = lock(&self.serving);
        if let Some(entry) = entry {
            self.record(entry);
        }
        *serving -= 1;
        self.served.notify_all();
    }

    fn record(&self, entry: EgressConnection) {
        let mut entries = lock(&self.entries);
        if entries.len() < MAX_EGRESS_LISTED {
            entries.push(entry);
        } else {
            self.unlisted.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The connections logged since the last take, by time, and how many were left out. Waits
    /// up to `settle` for connections still being served (a client that just closed its end
    /// is listed now, not with a later take); those still open after it count as left out
    /// when `final_` (the proxy is done with them), and are listed by a later take otherwise.
    pub fn take(&self, settle: Duration, final_: bool) -> (Vec<EgressConnection>, u64) {
        let deadline = Instant::now() + settle;
        let mut serving = lock(&self.serving);
        while *serving > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            serving = self
                .served
                .wait_timeout(serving, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let unfinished = if final_ { *serving as u64 } else { 0 };
        let mut log = std::mem::take(&mut *lock(&self.entries));
        drop(serving);
        log.sort_by_key(|c| c.at_ms);
        (log, self.unlisted.swap(0, Ordering::SeqCst) + unfinished)
    }
}

/// A running proxy; [`Proxy::finish`] stops it and returns its log.
pub struct Proxy {
    shared: Arc<Shared>,
    listener: OwnedFd,
    accept: JoinHandle<()>,
}

struct Shared {
    rules: Vec<EgressRule>,
    resolver: Resolver,
    started: Instant,
    stop: AtomicBool,
    log: Arc<EgressLog>,
    /// Open connections (the program's side), shut down when the run ends.
    open: Mutex<HashMap<u64, TcpStream>>,
}

impl Proxy {
    pub fn start(
        listener: OwnedFd,
        rules: Vec<EgressRule>,
        resolver: Resolver,
        started: Instant,
        log: Arc<EgressLog>,
    ) -> io::Result<Proxy> {
        let accepting = TcpListener::from(listener.try_clone()?);
        accepting.set_nonblocking(false)?;
        let shared = Arc::new(Shared {
            rules,
            resolver,
            started,
            stop: AtomicBool::new(false),
            log,
            open: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("egress-proxy".into())
            .spawn(move || accept_loop(&s, accepting))?;
        Ok(Proxy {
            shared,
            listener,
            accept,
        })
    }

    /// Stop accepting, cut every open connection, and return what was logged plus how many
    /// connections were left out of the list.
    pub fn finish(self) -> (Vec<EgressConnection>, u64) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // A listening socket shut down wakes a blocked accept (EINVAL on Linux).
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = self.accept.join();
        for s in lock(&self.shared.open).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Cut connections end at once; one still resolving or connecting upstream is not
        // waited for past FINISH_WAIT (its entry is counted, not listed).
        self.shared.log.take(FINISH_WAIT, true)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(shared: &Arc<Shared>, listener: TcpListener) {
    let mut next = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept() else {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        next += 1;
        let id = next;
        let full = {
            let mut open = lock(&shared.open);
            let full = open.len() >= MAX_OPEN;
            if !full && let Ok(c) = stream.try_clone() {
                open.insert(id, c);
            }
            full
        };
        if full {
            let mut stream = stream;
            let at_ms = shared.started.elapsed().as_millis() as u64;
            // Listed before it is answered: a session's call that sees the answer sees it.
            shared.record(EgressConnection {
                at_ms,
                method: String::new(),
                host: String::new(),
                port: 0,
                allowed: false,
                detail: format!("refused: more than {MAX_OPEN} connections open at once"),
                bytes_up: 0,
                bytes_down: 0,
            });
            refuse(&mut stream, 503, "too many connections open at once");
            continue;
        }
        let s = shared.clone();
        shared.log.opened();
        let worker = std::thread::Builder::new()
            .name("egress-conn".into())
            .spawn(move || {
                let entry = serve(&s, stream);
                lock(&s.open).remove(&id);
                s.log.ended(Some(entry));
            });
        if worker.is_err() {
            lock(&shared.open).remove(&id);
            shared.log.ended(None);
        }
    }
}

impl Shared {
    fn record(&self, entry: EgressConnection) {
        self.log.record(entry);
    }
}

/// What the program asked for.
struct Request {
    method: String,
    host: String,
    port: u16,
    /// Plain HTTP: the head to send upstream (origin-form, `Connection: close`), and any body
    /// bytes that came with it.
    forward: Option<Vec<u8>>,
}

fn serve(shared: &Shared, mut client: TcpStream) -> EgressConnection {
    let at_ms = shared.started.elapsed().as_millis() as u64;
    let mut entry = EgressConnection {
        at_ms,
        method: String::new(),
        host: String::new(),
        port: 0,
        allowed: false,
        detail: String::new(),
        bytes_up: 0,
        bytes_down: 0,
    };
    let req = match read_request(&mut client) {
        Ok(r) => r,
        Err(why) => {
            refuse(&mut client, 400, &why);
            entry.detail = format!("refused: {why}");
            return entry;
        }
    };
    entry.method = req.method.clone();
    entry.host = req.host.clone();
    entry.port = req.port;
    let upstream = match admit(shared, &req.host, req.port) {
        Ok(u) => u,
        Err(why) => {
            refuse(&mut client, 403, &why);
            entry.detail = format!("refused: {why}");
            return entry;
        }
    };
    let addr = upstream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut first = Vec::new();
    match &req.forward {
        None => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .is_err()
            {
                entry.detail = format!("the program left before the tunnel to {addr} opened");
                return entry;
            }
            // The server name a TLS client sends must be the name that was allowed: a tunnel
            // to an allowed host is not a way to ask it for another.
            first = read_client_hello(&mut client);
            if split_client_hello(&first) {
                entry.detail = "refused: a TLS ClientHello split across records (its server \
                                name could not be checked)"
                    .into();
                return entry;
            }
            if let Some(sni) = server_name(&first)
                && !sni.eq_ignore_ascii_case(&req.host)
            {
                entry.detail = format!(
                    "refused: TLS server name `{sni}` is not the allowed `{}`",
                    req.host
                );
                return entry;
            }
        }
        Some(head) => first.extend_from_slice(head),
    }
    entry.allowed = true;
    entry.detail = addr;
    let (up, down) = splice(client, upstream, &first);
    entry.bytes_up = up;
    entry.bytes_down = down;
    entry
}

/// The allow list, then the proxy's own resolution, then a connection to the first address
/// that is not internal.
fn admit(shared: &Shared, host: &str, port: u16) -> Result<TcpStream, String> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "`{host}` is an address; only names in the allow list are reached"
        ));
    }
    if !shared.rules.iter().any(|r| r.matches(host, port)) {
        return Err(format!("`{host}:{port}` is not in the run's allow list"));
    }
    let ips = shared.resolver.resolve(host, port)?;
    let mut refused = Vec::new();
    let mut last_error = None;
    for ip in ips {
        if let Some(kind) = forbidden_address(ip) {
            refused.push(format!("{ip} ({kind})"));
            continue;
        }
        match TcpStream::connect_timeout(&SocketAddr::new(ip, port), CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last_error = Some(format!("{ip}:{port}: {e}")),
        }
    }
    Err(match (last_error, refused.is_empty()) {
        (Some(e), _) => format!("connecting to `{host}` failed: {e}"),
        (None, false) => format!(
            "`{host}` resolves only to internal addresses: {}",
            refused.join(", ")
        ),
        (None, true) => format!("`{host}` resolves to no address"),
    })
}

fn refuse(client: &mut TcpStream, code: u16, why: &str) {
    let reason = match code {
        400 => "Bad Request",
        403 => "Forbidden",
        _ => "Service Unavailable",
    };
    let body = format!("fleetbox egress: {why}\n");
    // One write: a client reading the status line gets all of it.
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.write_all(response.as_bytes());
    let _ = client.shutdown(Shutdown::Both);
}

fn read_request(client: &mut TcpStream) -> Result<Request, String> {
    client
        .set_read_timeout(Some(HEAD_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(format!("the request head is over {MAX_HEAD} bytes"));
        }
        match client.read(&mut chunk) {
            Ok(0) => return Err("the connection closed before a request".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("no request head: {e}")),
        }
    };
    client.set_read_timeout(None).map_err(|e| e.to_string())?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "the request head is not text")?;
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("`{}` is not a request line", line.escape_debug()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("`{version}` is not HTTP/1.x"));
    }
    if method == "CONNECT" {
        let (host, port) = authority(target, None)?;
        return Ok(Request {
            method: method.into(),
            host,
            port,
            forward: None,
        });
    }
    let Some(rest) = target.strip_prefix("http://") else {
        return Err(format!(
            "`{}`: a proxy request names an absolute `http://` URL (HTTPS goes through CONNECT)",
            target.escape_debug()
        ));
    };
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = authority(auth, Some(80))?;
    let mut out = format!("{method} {path} {version}\r\n");
    for h in lines.filter(|l| !l.is_empty()) {
        let (name, value) = h.split_once(':').unwrap_or((h, ""));
        let name = name.trim().to_ascii_lowercase();
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        // The request goes to the URL's host; a Host header naming another would ask that
        // host's server (a CDN, say) for a host that was not allowed.
        if name == "host" {
            let (named, _) = authority(value.trim(), Some(port))?;
            if named != host {
                return Err(format!(
                    "the Host header `{}` is not the URL's host `{host}`",
                    value.trim().escape_debug()
                ));
            }
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut forward = out.into_bytes();
    forward.extend_from_slice(&buf[end..]);
    Ok(Request {
        method: method.into(),
        host,
        port,
        forward: Some(forward),
    })
}

/// `host:port` (or `host` with a default port); `[v6]:port` is kept bracketed.
fn authority(text: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    if text.contains('@') {
        return Err("credentials in the URL's authority are refused".into());
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or("an unclosed `[`")?;
        (format!("[{h}]"), p.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (text.to_string(), None),
        }
    };
    let port = match (port, default_port) {
        (Some(p), _) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{p}` is not a port"))?,
        (None, Some(d)) => d,
        (None, None) => return Err(format!("`{text}` has no port")),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return Err("no host".into());
    }
    // Names and addresses only: what is logged, and later shown, cannot carry anything else.
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b);
    if host.len() > 255 || !host.bytes().all(allowed) {
        return Err(format!(
            "`{}` is not a host name",
            host.chars().take(64).collect::<String>().escape_debug()
        ));
    }
    Ok((host, port))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The start of what a tunnelled client sends: a whole TLS record when it begins as one
/// (within 5 s and 16 KiB), else whatever arrived first.
fn read_client_hello(client: &mut TcpStream) -> Vec<u8> {
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let want = match buf.as_slice() {
            [0x16, _, _, hi, lo, ..] => 5 + usize::from(u16::from_be_bytes([*hi, *lo])),
            [b, ..] if *b != 0x16 => buf.len(),
            _ => 5,
        };
        if buf.len() >= want.min(MAX_HEAD) && !buf.is_empty() {
            break;
        }
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = client.set_read_timeout(None);
    buf
}

/// Does `data` start a ClientHello that does not fit in its first record? Clients send it in
/// one; a split one would hide its server name from the check.
fn split_client_hello(data: &[u8]) -> bool {
    match data {
        [0x16, _, _, rh, rl, 1, a, b, c, ..] => {
            let record = usize::from(u16::from_be_bytes([*rh, *rl]));
            let hello = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
            hello + 4 > record
        }
        _ => false,
    }
}

/// The server name (SNI) of a TLS ClientHello, if `data` starts with one that has it.
pub fn server_name(data: &[u8]) -> Option<String> {
    let mut r = Cursor(data);
    if r.u8()? != 0x16 {
        return None;
    }
    r.skip(4)?; // version, record length
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    r.skip(3 + 2 + 32)?; // length, version, random
    let sid = r.u8()?;
    r.skip(usize::from(sid))?;
    let suites = r.u16()?;
    r.skip(usize::from(suites))?;
    let compression = r.u8()?;
    r.skip(usize::from(compression))?;
    let mut exts = Cursor(r.prefixed()?);
    while let (Some(kind), Some(len)) = (exts.u16(), exts.u16()) {
        let body = exts.take(usize::from(len))?;
        if kind != 0 {
            continue;
        }
        let mut names = Cursor(body);
        let mut list = Cursor(names.prefixed()?);
        while let Some(name_type) = list.u8() {
            let name = list.prefixed()?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_string);
            }
        }
    }
    None
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    /// A field with a two-byte length before it.
    fn prefixed(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Copy both ways until either side is done; returns (bytes up, bytes down).
fn splice(client: TcpStream, upstream: TcpStream, first: &[u8]) -> (u64, u64) {
    let (Ok(client2), Ok(upstream2)) = (client.try_clone(), upstream.try_clone()) else {
        return (0, 0);
    };
    let first = first.to_vec();
    let up = std::thread::spawn(move || {
        let (mut from, mut to) = (client2, upstream2);
        let mut n = first.len() as u64;
        if to.write_all(&first).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return 0;
        }
        n += io::copy(&mut from, &mut to).unwrap_or(0);
        let _ = to.shutdown(Shutdown::Write);
        n
    });
    let (mut from, mut to) = (upstream, client);
    let down = io::copy(&mut from, &mut to).unwrap_or(0);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
    let up = up.join().unwrap_or(0);
    (up, down)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a client writes it, naming `host`.
    fn client_hello(host: &str) -> Vec<u8> {
        let name = host.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name);
        let mut exts = Vec::new();
        exts.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]); // ec_point_formats
        exts.extend_from_slice(&0u16.to_be_bytes());
        exts.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        exts.extend_from_slice(&sni);
        let mut hello = vec![0x03, 0x03];
        hello.extend_from_slice(&[7; 32]);
        hello.push(0);
        hello.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        hello.extend_from_slice(&exts);
        let mut hs = vec![1];
        hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&hello);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello_and_junk_gives_none() {
        assert_eq!(
            server_name(&client_hello("pkgs.example.org")).as_deref(),
            Some("pkgs.example.org")
        );
        let hello = client_hello("a.example.org");
        for cut in 0..hello.len() {
            assert_eq!(server_name(&hello[..cut]), None, "cut at {cut}");
        }
        assert_eq!(server_name(b"GET / HTTP/1.1\r\n\r\n"), None);
        // The same hello cut into two records: refused as split.
        assert!(!split_client_hello(&hello));
        let body = &hello[5..];
        let mut split = vec![0x16, 3, 1, 0, 20];
        split.extend_from_slice(&body[..20]);
        assert!(split_client_hello(&split));
        assert!(!split_client_hello(b"SSH-2.0-OpenSSH\r\n"));
        assert_eq!(server_name(&[0x16, 3, 1, 0xff, 0xff, 1, 0xff]), None);
    }

    #[test]
    fn authorities_parse_with_default_ports_and_refuse_credentials() {
        assert_eq!(
            authority("Pkgs.Example.org.:8443", None).unwrap(),
            ("pkgs.example.org".into(), 8443)
        );
        assert_eq!(
            authority("a.example.org", Some(80)).unwrap(),
            ("a.example.org".into(), 80)
        );
        assert_eq!(authority("[::1]:443", None).unwrap(), ("[::1]".into(), 443));
        assert!(authority("a.example.org", None).is_err());
        assert!(authority("user:pw@a.example.org:80", None).is_err());
        assert!(authority("a.example.org:0", None).is_err());
        assert!(authority(":80", None).is_err());
        assert!(authority("a\x1b]0;x\x07.example.org:443", None).is_err());
        assert!(authority("a b.example.org:443", None).is_err());
    }

    #[test]
    fn hosts_files_pin_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("hosts");
        std::fs::write(
            &p,
            "# pinned\n198.51.100.2 pkgs.test Mirror.Test.\n\n10.0.0.5 inside.test\n",
        )
        .unwrap();
        let r = Resolver::from_hosts_file(&p).unwrap();
        assert_eq!(
            r.resolve("mirror.test", 443).unwrap(),
            vec!["198.51.100.2".parse::<IpAddr>().unwrap()]
        );
        std::fs::write(&p, "not-an-ip name\n").unwrap();
        assert!(
            Resolver::from_hosts_file(&p)
                .unwrap_err()
                .contains("line 1")
        );
    }
}
