//! Egress by name (`--egress`, `network = { allow = [...] }`): a program in the jail reaches
//! named hosts through the proxy and nothing else. The "internet" is a network namespace this
//! test makes, joined to the host by a veth pair on a documentation range (198.51.100.0/24),
//! with an HTTP and an HTTPS server in it; names resolve through a hosts file given to the
//! proxy. Nothing leaves the machine.

use std::path::PathBuf;
use std::process::{Child, Command};

use crate::support::bin;

/// A namespace with servers on `198.51.100.<host>`; removed on drop.
pub struct Internet {
    ns: String,
    veth: String,
    servers: Vec<Child>,
    pub addr: String,
    pub dir: tempfile::TempDir,
    /// Holds this test's /30 of 198.51.100.0/24 against the other tests running at once.
    _subnet: std::fs::File,
}

/// What killed test processes left: their veth pairs (which would hold a subnet's address) and
/// namespaces, named by their pid.
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line
            .split(": ")
            .nth(1)
            .map(|n| n.split('@').next().unwrap_or(n))
        else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("fbxeg")
            .and_then(|rest| rest.strip_suffix('a'))
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["link", "del", name]).output();
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("fbxeg{pid}")])
                .output();
        }
    }
}

/// A free /30 of 198.51.100.0/24 (its index, 0–63), held under a lock file until dropped.
fn take_subnet() -> (u32, std::fs::File) {
    use std::os::fd::AsRawFd;
    let start = std::process::id() % 64;
    for i in (0..64).map(|k| (start + k) % 64) {
        let path = std::env::temp_dir().join(format!("fleetbox-egress-test-{i}.lock"));
        let file = std::fs::File::create(&path).unwrap();
        // SAFETY: flock on a descriptor we own; released when the file is closed.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return (i, file);
        }
    }
    panic!("all 64 test subnets are taken");
}

impl Drop for Internet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const SERVER: &str = r#"
import http.server, ssl, sys
addr, port, cert = sys.argv[1], int(sys.argv[2]), sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from %s via %s" % (self.headers.get("Host"), "tls" if cert != "-" else "http")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer((addr, port), H)
if cert != "-":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, cert)
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("ready", flush=True)
s.serve_forever()
"#;

/// `None` when this host cannot make network namespaces (not root, no `ip`): outside CI the
/// test is skipped, in CI that is a failure.
pub fn internet() -> Option<Internet> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let has_ip = Command::new("ip").arg("-V").output().is_ok();
    if !root || !has_ip {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with iproute2"
        );
        eprintln!("skipping: needs root and `ip` for a network namespace");
        return None;
    }
    let pid = std::process::id();
    let (ns, veth, peer) = (
        format!("fbxeg{pid}"),
        format!("fbxeg{pid}a"),
        format!("fbxeg{pid}b"),
    );
    remove_stale_namespaces();
    let (index, subnet) = take_subnet();
    let base = 4 * index;
    let (host_side, far) = (
        format!("198.51.100.{}/30", base + 1),
        format!("198.51.100.{}", base + 2),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut net = Internet {
        ns: ns.clone(),
        veth: veth.clone(),
        servers: Vec::new(),
        addr: far.clone(),
        dir,
        _subnet: subnet,
    };
    ip(&["netns", "add", &ns]);
    ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]);
    ip(&["link", "set", &peer, "netns", &ns]);
    ip(&["addr", "add", &host_side, "dev", &veth]);
    ip(&["link", "set", &veth, "up"]);
    let far_cidr = format!("{far}/30");
    ip(&[
        "netns", "exec", &ns, "ip", "addr", "add", &far_cidr, "dev", &peer,
    ]);
    ip(&["netns", "exec", &ns, "ip", "link", "set", &peer, "up"]);
    ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);

    // A certificate for the HTTPS server's name, which the program trusts explicitly.
    let cert = net.dir.path().join("pkgs.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=pkgs.fleetbox.test"])
        .args(["-addext", "subjectAltName=DNS:pkgs.fleetbox.test"])
        .arg("-keyout")
        .arg(&cert)
        .arg("-out")
        .arg(net.dir.path().join("cert.pem"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let key = std::fs::read(&cert).unwrap();
    let crt = std::fs::read(net.dir.path().join("cert.pem")).unwrap();
    std::fs::write(&cert, [crt.as_slice(), key.as_slice()].concat()).unwrap();
    let script = net.dir.path().join("server.py");
    std::fs::write(&script, SERVER).unwrap();
    for (port, cert) in [
        ("8080", "-".to_string()),
        ("8443", cert.display().to_string()),
    ] {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns, "python3"])
            .arg(&script)
            .args([far.as_str(), port, cert.as_str()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        net.servers.push(child);
    }
    // The test's resolver: two names for the servers, and names that lead inside.
    std::fs::write(
        net.hosts(),
        format!(
            "{far} pkgs.fleetbox.test other.fleetbox.test\n\
             10.0.0.5 private.fleetbox.test\n\
             127.0.0.1 loopback.fleetbox.test\n\
             169.254.169.254 metadata.fleetbox.test\n"
        ),
    )
    .unwrap();
    Some(net)
}

impl Internet {
    pub fn hosts(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }
}

/// The program: each attempt prints one line `name: result`.
pub const PROGRAM: &str = r#"
import os, socket, ssl, sys, urllib.request
ca = "\n".join(@CA@)
far = "@FAR@"
def attempt(name, f):
    try:
        print(name + ": " + f())
    except Exception as e:
        print(name + ": refused " + type(e).__name__ + " " + str(e)[:120])
def https(host, sni=None):
    ctx = ssl.create_default_context(cadata=ca)
    if sni:
        # Ask the proxy for `host` but tell the server another name.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
        s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (host, host)).encode())
        s.recv(1024)
        t = ctx.wrap_socket(s, server_hostname=sni)
        t.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return t.recv(1024).decode(errors="replace")
    return urllib.request.urlopen(urllib.request.Request("https://" + host + "/"), context=ctx, timeout=5).read().decode()
attempt("https", lambda: https("pkgs.fleetbox.test:8443"))
attempt("http", lambda: urllib.request.urlopen("http://pkgs.fleetbox.test:8080/", timeout=5).read().decode())
attempt("denied-name", lambda: urllib.request.urlopen("http://other.fleetbox.test:8080/", timeout=5).read().decode())
attempt("other-port", lambda: urllib.request.urlopen("http://pkgs.fleetbox.test:9090/", timeout=5).read().decode())
attempt("raw-ip", lambda: urllib.request.urlopen("http://%s:8080/" % far, timeout=5).read().decode())
attempt("private", lambda: urllib.request.urlopen("http://private.fleetbox.test:8080/", timeout=5).read().decode())
attempt("loopback", lambda: urllib.request.urlopen("http://loopback.fleetbox.test:8080/", timeout=5).read().decode())
attempt("metadata", lambda: urllib.request.urlopen("http://metadata.fleetbox.test/", timeout=5).read().decode())
attempt("sni", lambda: https("pkgs.fleetbox.test:8443", sni="other.fleetbox.test"))
def direct():
    socket.create_connection((far, 8080), timeout=3)
    return "connected"
attempt("direct", direct)
def raw(request):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
    s.sendall(request)
    return s.recv(200).decode(errors="replace").split("\r\n")[0]
attempt("escape", lambda: raw(b"CONNECT a\x1b]0;owned\x07.fleetbox.test:443 HTTP/1.1\r\n\r\n"))
attempt("host-header", lambda: raw(b"GET http://pkgs.fleetbox.test:8080/ HTTP/1.1\r\nHost: evil.example.org\r\n\r\n"))
def split_hello():
    # A real ClientHello for the allowed name, cut into two TLS records.
    ctx = ssl.create_default_context(cadata=ca)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(inc, out, server_hostname="pkgs.fleetbox.test")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    body = hello[5:]
    record = lambda b: hello[:3] + len(b).to_bytes(2, "big") + b
    s = socket.create_connection(("127.0.0.1", 3128), timeout=5)
    s.sendall(b"CONNECT pkgs.fleetbox.test:8443 HTTP/1.1\r\n\r\n")
    s.recv(1024)
    s.sendall(record(body[:40]) + record(body[40:]))
    return "answered" if s.recv(1024) else "closed"
attempt("split-hello", split_hello)
def flood():
    socks = [socket.create_connection(("127.0.0.1", 3128), timeout=5) for _ in range(70)]
    return socks[-1].recv(200).decode(errors="replace").split("\r\n")[0]
attempt("flood", flood)
"#;

/// The rules the program's run allows.
pub const ALLOW: &[&str] = &[
    "pkgs.fleetbox.test:8443",
    "pkgs.fleetbox.test:8080",
    "private.fleetbox.test",
    "loopback.fleetbox.test",
    "metadata.fleetbox.test",
];

/// The program, aimed at the namespace's address and trusting its server's certificate.
pub fn program(net: &Internet) -> String {
    // Line by line: one long literal would be `obfuscation.long_string` to the review.
    let ca: Vec<String> = std::fs::read_to_string(net.cert())
        .unwrap()
        .lines()
        .map(|l| format!("{l:?}"))
        .collect();
    PROGRAM
        .replace("@FAR@", &net.addr)
        .replace("@CA@", &format!("[{}]", ca.join(", ")))
}

/// What each attempt printed, by name.
pub fn attempts(stdout: &str) -> std::collections::HashMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The outcome every test of egress expects, from the program's side and the report's.
/// `direct_refused` is the run's count of direct connections refused (`None` for a session's
/// call: the count is its whole run's, in the report of its end).
pub fn check(stdout: &str, egress: &serde_json::Value, direct_refused: Option<u64>, far: &str) {
    let got = attempts(stdout);
    let line = |k: &str| got.get(k).cloned().unwrap_or_default();
    assert_eq!(
        line("https"),
        "hello from pkgs.fleetbox.test:8443 via tls",
        "{stdout}"
    );
    assert_eq!(
        line("http"),
        "hello from pkgs.fleetbox.test:8080 via http",
        "{stdout}"
    );
    for refused in [
        "denied-name",
        "other-port",
        "raw-ip",
        "private",
        "loopback",
        "metadata",
        "sni",
        "direct",
    ] {
        assert!(line(refused).starts_with("refused"), "{refused}: {stdout}");
    }
    let entries = egress.as_array().expect("the report lists connections");
    let find = |host: &str, port: u64| {
        entries
            .iter()
            .filter(|e| e["host"] == host && e["port"] == port)
            .collect::<Vec<_>>()
    };
    let https = find("pkgs.fleetbox.test", 8443);
    assert_eq!(https.len(), 3, "{egress:#}");
    let tunnel = https.iter().find(|e| e["allowed"] == true).unwrap();
    assert_eq!(tunnel["method"], "CONNECT");
    assert_eq!(tunnel["detail"], format!("{far}:8443"));
    assert!(tunnel["bytes_up"].as_u64().unwrap() > 200, "{tunnel}");
    assert!(tunnel["bytes_down"].as_u64().unwrap() > 200, "{tunnel}");
    let sni = https
        .iter()
        .find(|e| e["allowed"] == false && e["detail"].as_str().unwrap().contains("server name `"))
        .unwrap();
    assert!(
        sni["detail"]
            .as_str()
            .unwrap()
            .contains("TLS server name `other.fleetbox.test`"),
        "{sni}"
    );
    let reason = |host: &str, port: u64| {
        let e = find(host, port);
        assert_eq!(e.len(), 1, "{host}:{port} {egress:#}");
        assert_eq!(e[0]["allowed"], false, "{host}:{port} {egress:#}");
        e[0]["detail"].as_str().unwrap().to_string()
    };
    assert!(reason(far, 8080).contains("is an address"));
    assert!(reason("other.fleetbox.test", 8080).contains("not in the run's allow list"));
    assert!(reason("pkgs.fleetbox.test", 9090).contains("not in the run's allow list"));
    assert!(reason("private.fleetbox.test", 8080).contains("10.0.0.5 (private)"));
    assert!(reason("loopback.fleetbox.test", 8080).contains("127.0.0.1 (loopback)"));
    assert!(reason("metadata.fleetbox.test", 80).contains("169.254.169.254 (link-local"));
    let http = find("pkgs.fleetbox.test", 8080);
    assert_eq!(http.len(), 1, "{egress:#}");
    assert_eq!(http[0]["method"], "GET");
    assert_eq!(http[0]["allowed"], true);
    if let Some(n) = direct_refused {
        assert!(n >= 1, "the direct connection is not counted");
    }
    assert_eq!(line("host-header"), "HTTP/1.1 400 Bad Request", "{stdout}");
    // A ClientHello split across records hides its name: the tunnel is closed.
    assert_eq!(line("split-hello"), "closed", "{stdout}");
    assert!(
        entries.iter().any(|e| e["detail"]
            .as_str()
            .unwrap()
            .contains("ClientHello split across records")),
        "{egress:#}"
    );
    // A name with a terminal escape in it is refused, and logged escaped.
    assert_eq!(line("escape"), "HTTP/1.1 400 Bad Request", "{stdout}");
    let logged = serde_json::to_string(egress).unwrap();
    assert!(!logged.contains("\\u001b"), "{logged}");
    assert!(logged.contains("\\\\u{1b}]0;owned"), "{logged}");
    assert!(
        entries.iter().any(|e| e["detail"]
            .as_str()
            .unwrap()
            .contains("the Host header `evil.example.org` is not the URL's host")),
        "{egress:#}"
    );
    // 64 connections at once; the rest are turned away, and the 64 idle ones are cut when
    // the run ends (listed as closed before a request).
    assert_eq!(
        line("flood"),
        "HTTP/1.1 503 Service Unavailable",
        "{stdout}"
    );
    let turned_away = entries
        .iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .unwrap()
                .contains("connections open at once")
        })
        .count();
    assert_eq!(turned_away, 6, "{egress:#}");
}

#[test]
fn the_jail_reaches_named_hosts_through_the_proxy_and_nothing_else() {
    let Some(net) = internet() else { return };
    let prog = net.dir.path().join("prog.py");
    std::fs::write(&prog, program(&net)).unwrap();
    // `fleetbox run` in the jail with the rules and the test's resolver.
    let run = |extra: &[&str]| {
        Command::new(bin())
            .args(["run", "--backend", "jail", "--timeout", "60s"])
            .args(extra)
            .arg("--egress")
            .arg(ALLOW.join(","))
            .arg("--egress-hosts")
            .arg(net.hosts())
            .arg(&prog)
            .output()
            .unwrap()
    };
    let out = run(&["--json"]);
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(report["status"], "ok", "{report:#}");
    let stdout = report["stdout"].as_str().unwrap();
    check(
        stdout,
        &report["egress"],
        Some(report["egress_direct_refused"].as_u64().unwrap_or(0)),
        &net.addr,
    );
    let network = &report["limits"]["enforcement"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["limit"] == "network")
        .unwrap()["by"];
    assert_eq!(network[0], "netns_egress_proxy_allow_list");
    // Without `--json`: a summary line, and the refusals as untrusted text.
    let out = run(&[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("fleetbox: egress: 2 connections allowed,"),
        "{said}"
    );
    assert!(
        said.contains("fleetbox: egress refused: GET other.fleetbox.test:8080: refused: `other.fleetbox.test:8080` is not in the run's allow list"),
        "{said}"
    );
    assert!(!said.contains('\x1b'), "{said}");
    // The same request without `--egress` reaches nothing: no proxy, no route.
    let out = Command::new(bin())
        .args(["run", "--backend", "jail", "--json"])
        .arg(&prog)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = attempts(report["stdout"].as_str().unwrap());
    assert!(got["https"].starts_with("refused"), "{got:?}");
    assert!(report.get("egress").is_none(), "{report:#}");
    // Other backends refuse an allow list rather than run without it.
    let out = Command::new(bin())
        .args([
            "run",
            "--backend",
            "process",
            "--json",
            "--egress",
            "pkgs.fleetbox.test",
        ])
        .arg(&prog)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "sandbox_error", "{report:#}");
    assert!(
        report["message"]
            .as_str()
            .unwrap()
            .contains("needs the `jail` backend")
    );
}

/// The fleet: an agent allows egress from its operator's list, a job asks for named hosts
/// within it and runs, its connections are in the shard's report and the audit log; a job
/// asking past the list is refused by the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleets_agent_allows_named_hosts_within_its_list_and_audits_them() {
    use crate::cluster::harness::{Cluster, Db, ENROLL};
    use fleetbox_proto::{JobState, Status};
    let Some(net) = internet() else { return };
    let Some(mut c) = Cluster::start(Db::Sqlite).await else {
        return;
    };
    let list = net.dir.path().join("egress.list");
    std::fs::write(&list, "# the operator's list\n*.fleetbox.test\n").unwrap();
    let state = c.dir.path().join("agent-egress");
    let agent = Command::new(bin())
        .args(["agent", "--server", &c.url(), "--token", ENROLL])
        .args(["--slots", "1", "--backend", "jail"])
        .arg("--state")
        .arg(&state)
        .arg("--allow-egress")
        .arg(&list)
        .arg("--egress-hosts")
        .arg(net.hosts())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    c.agents.push(agent);
    let rules: Vec<String> = ALLOW.iter().map(|r| format!("\"{r}\"")).collect();
    let spec = |code: &str, rules: &str| {
        format!(
            "name = \"egress\"\ncode = '''{code}'''\nshards = {{ count = 1 }}\n\
             [limits]\ntimeout = \"60s\"\nnetwork = {{ allow = [{rules}] }}\n\
             [verify]\nrecheck = \"none\"\n"
        )
    };
    let job = c.submit(&spec(&program(&net), &rules.join(", "))).await;
    let done = c.wait(&job.id, std::time::Duration::from_secs(120)).await;
    assert_eq!(done.state, JobState::Completed, "{done:?}");
    let shard = c.client.shard(&job.id, 0).await.unwrap();
    let report = &shard.attempts[0].report;
    check(
        report["stdout"].as_str().unwrap(),
        &report["egress"],
        Some(report["egress_direct_refused"].as_u64().unwrap_or(0)),
        &net.addr,
    );
    // The audit log has the same connections in the attempt's entry.
    let entries = c.client.audit("limit=5000").await.unwrap().entries;
    let reported = entries
        .iter()
        .find(|e| e.action == "attempt.reported" && e.job_id.as_deref() == Some(&job.id))
        .expect("the attempt is audited");
    let attempt = &reported.details["attempts"][0];
    assert_eq!(attempt["egress"], report["egress"], "{attempt:#}");
    assert!(attempt["egress_direct_refused"].as_u64().unwrap() >= 1);

    // A session asks for the same hosts: each call lists its own connections, and the names
    // the first call defined are there for the second.
    let mut limits = fleetbox_proto::Limits {
        timeout: fleetbox_proto::Millis(60_000),
        ..Default::default()
    };
    limits.network = fleetbox_proto::Network::Allow(
        ALLOW
            .iter()
            .map(|r| fleetbox_proto::EgressRule::parse(r).expect("a rule"))
            .collect(),
    );
    let opened = c
        .client
        .open_session(&fleetbox_proto::api::SessionBody {
            limits,
            ..Default::default()
        })
        .await
        .unwrap();
    let id = opened.session.id.clone();
    let call = |code: String| fleetbox_proto::api::SessionCallBody {
        code,
        ..Default::default()
    };
    let first = c
        .client
        .session_run(&id, &call(program(&net)))
        .await
        .unwrap()
        .report
        .expect("the call's report");
    check(
        first["stdout"].as_str().unwrap(),
        &first["egress"],
        None,
        &net.addr,
    );
    let second = c
        .client
        .session_run(
            &id,
            &call(
                "attempt('http', lambda: urllib.request.urlopen('http://pkgs.fleetbox.test:8080/', timeout=5).read().decode())".into(),
            ),
        )
        .await
        .unwrap()
        .report
        .expect("the call's report");
    assert_eq!(
        second["stdout"], "http: hello from pkgs.fleetbox.test:8080 via http\n",
        "{second:#}"
    );
    let entries = second["egress"].as_array().expect("the call's connections");
    assert_eq!(entries.len(), 1, "{second:#}");
    assert_eq!(entries[0]["host"], "pkgs.fleetbox.test");
    assert_eq!(entries[0]["allowed"], true);
    c.client.close_session(&id).await.unwrap();

    // Past the operator's list: refused by the agent, saying which rule.
    let job = c
        .submit(&spec(
            "print(1)",
            "\"pkgs.fleetbox.test\", \"pypi.org:443\"",
        ))
        .await;
    let done = c.wait(&job.id, std::time::Duration::from_secs(60)).await;
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    let shard = c.client.shard(&job.id, 0).await.unwrap();
    assert_eq!(shard.attempts[0].status, Status::Refused);
    let message = shard.attempts[0].report["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("`pypi.org:443` is outside this agent's egress allow-list"),
        "{message}"
    );
}

/// `fleetbox up --allow-egress --egress-hosts`: the one-machine setup's local agents allow the
/// operator's hosts, and a run through the coordinator reaches them as in the jail alone.
#[test]
fn fleetbox_up_passes_the_egress_list_to_its_agents() {
    use crate::cluster::harness::up_address;
    let Some(net) = internet() else { return };
    let list = net.dir.path().join("egress.list");
    std::fs::write(&list, "*.fleetbox.test\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut up = Command::new(bin())
        .args(["up", "--listen", "127.0.0.1:0", "--backend", "jail"])
        .arg("--allow-egress")
        .arg(&list)
        .arg("--egress-hosts")
        .arg(net.hosts())
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (url, token) = up_address(up.stdout.take().unwrap());
    let client = fleetbox_client::Client::new(&url, &token);
    let rules = ALLOW
        .iter()
        .map(|r| fleetbox_proto::EgressRule::parse(r).unwrap())
        .collect();
    let body = fleetbox_proto::api::RunBody {
        code: program(&net),
        limits: fleetbox_proto::Limits {
            network: fleetbox_proto::Network::Allow(rules),
            timeout: fleetbox_proto::Millis::from_secs(60),
            ..Default::default()
        },
        wait_ms: Some(120_000),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = rt.block_on(client.run(&body));
    let _ = up.kill();
    let _ = up.wait();
    let report = answer.unwrap().report.expect("a report");
    assert_eq!(report["status"], "ok", "{report:#}");
    check(
        report["stdout"].as_str().unwrap(),
        &report["egress"],
        Some(report["egress_direct_refused"].as_u64().unwrap_or(0)),
        &net.addr,
    );
}
