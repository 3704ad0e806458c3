//! Outgoing HTTPS: the model reviewer and `notify` webhooks reach endpoints behind a private CA
//! with `ca_cert`, and refuse an untrusted certificate. The endpoint is a stand-in (Python's
//! `http.server` over TLS with a certificate made by `openssl` for the test): no model runs on
//! this machine, and nothing leaves it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleetbox_proto::JobState;

use crate::support::{Coordinator, Db, Killed, spec};

const STAND_IN: &str = r#"
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path.endswith("/chat/completions"):
            verdict = {"verdict": "suspicious", "risk": 70, "reasons": ["said over TLS"]}
            answer = {"choices": [{"message": {"content": json.dumps(verdict)}}]}
        else:
            with open(sys.argv[3], "ab") as f:
                f.write(body + b"\n")
            answer = {}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_and_webhooks_speak_https_to_a_private_ca_and_refuse_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, hooks) = (
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        dir.path().join("hooks.jsonl"),
    );
    // A private CA and a server certificate it signed (webpki refuses a CA as the server's
    // own certificate, so one self-signed certificate would not do).
    let ca = dir.path().join("ca.pem");
    let ext = dir.path().join("ext.cnf");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&std::ffi::OsStr]| {
        let ok = Command::new("openssl")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (scripts/test installs it)");
        assert!(ok.success(), "openssl {args:?}");
    };
    let p = |p: &std::path::Path| p.as_os_str().to_owned();
    let s = |s: &str| std::ffi::OsString::from(s);
    let ca_key = dir.path().join("ca.key");
    let csr = dir.path().join("leaf.csr");
    openssl(&[
        &s("req"),
        &s("-x509"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-days"),
        &s("1"),
        &s("-subj"),
        &s("/CN=fleetbox test CA"),
        &s("-keyout"),
        &p(&ca_key),
        &s("-out"),
        &p(&ca),
    ]);
    openssl(&[
        &s("req"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-subj"),
        &s("/CN=127.0.0.1"),
        &s("-keyout"),
        &p(&key),
        &s("-out"),
        &p(&csr),
    ]);
    openssl(&[
        &s("x509"),
        &s("-req"),
        &s("-in"),
        &p(&csr),
        &s("-CA"),
        &p(&ca),
        &s("-CAkey"),
        &p(&ca_key),
        &s("-CAcreateserial"),
        &s("-days"),
        &s("1"),
        &s("-extfile"),
        &p(&ext),
        &s("-out"),
        &p(&cert),
    ]);
    let mut server = Command::new("python3")
        .arg("-c")
        .arg(STAND_IN)
        .arg(&cert)
        .arg(&key)
        .arg(&hooks)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Killed(server);
    let port: u16 = line.trim().parse().expect("the stand-in's port");
    let url = format!("https://127.0.0.1:{port}/v1");
    let code = "print(sum(range(10)))\n";

    // Without the CA: the certificate is not trusted, the rules decide alone and say why.
    let Some(c) = Coordinator::start_with(Db::Sqlite, |config| {
        config.llm = Some(fleetbox_review::llm::LlmConfig::new(
            url.clone(),
            "stand-in",
        ));
    })
    .await
    else {
        return;
    };
    let review = c.client.review(code).await.unwrap();
    assert!(
        review.reviewer.contains("gave no verdict"),
        "{}",
        review.reviewer
    );
    assert!(
        review.reviewer.to_lowercase().contains("certificate"),
        "{}",
        review.reviewer
    );
    assert_eq!(review.risk, 0);
    c.stop().await;

    // With it: the model's verdict arrives over TLS, and so do webhooks.
    let trusted = ca.clone();
    let Some(mut c) = Coordinator::start_with(Db::Sqlite, |config| {
        config.llm = Some(fleetbox_review::llm::LlmConfig::new(
            url.clone(),
            "stand-in",
        ));
        config.ca_cert = Some(trusted);
        // The webhook receiver is on loopback, which webhooks may reach only when allowed.
        config.planner.notify_allow =
            vec![fleetbox_server::planner::guard::Allowed::parse("127.0.0.1").unwrap()];
    })
    .await
    else {
        return;
    };
    let review = c.client.review(code).await.unwrap();
    assert!(
        review.reviewer.contains("llm:stand-in (suspicious 70"),
        "{}",
        review.reviewer
    );
    assert_eq!(review.risk, 70);
    // (The stand-in calls every program suspicious, risk 70: held for review; approve it. Held
    // code runs only on an agent marked for it.)
    c.agent_with("a", |config| {
        config.review_policy = fleetbox_agent::ReviewPolicy::default_for(true);
    });
    crate::support::harden_the_only_agent(&c).await;
    let job = c
        .client
        .submit(&spec(&format!(
            "name = \"tls\"\ncode = \"print(1)\"\nshards = {{ count = 1 }}\n\
             [[followup]]\nwhen = \"true\"\naction = \"notify\"\nurl = \"https://127.0.0.1:{port}/hook\"\n"
        )))
        .await
        .unwrap();
    let flag = c
        .client
        .review_flags(&format!("job={}&kind=code", job.id))
        .await
        .unwrap()
        .flags
        .remove(0);
    c.client.decide_flag(flag.id, true, None).await.unwrap();
    let r = c.wait(&job.id, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let chain = c.client.chain(&job.id).await.unwrap();
        if chain.notifications.iter().any(|n| n.state == "delivered") {
            break;
        }
        assert!(Instant::now() < deadline, "{chain:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = std::fs::read_to_string(&hooks).unwrap();
    assert!(got.contains(&job.id), "{got}");
    c.stop().await;
}

/// The coordinator's own listener over HTTPS: a client trusting its CA is served, one that
/// does not is told so (not "unreachable"), in-process clients use the plain loopback
/// listener, and a renewed certificate written over the files is served without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_https_and_picks_up_a_renewed_certificate() {
    use fleetbox_client::{Client, ClientError, Trust};
    use fleetbox_server::tls::{TlsSetting, files};
    let certs = tempfile::tempdir().unwrap();
    let listen = "127.0.0.1:0".parse().unwrap();
    let auto = TlsSetting::Auto { names: Vec::new() };
    let (a_cert, a_key) = files(&auto, &certs.path().join("a"), listen).unwrap();
    let (b_cert, b_key) = files(&auto, &certs.path().join("b"), listen).unwrap();
    let trust = |who: &str| {
        Trust::from_pem_file(&certs.path().join(who).join("tls").join("ca.pem")).unwrap()
    };
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::copy(&a_cert, &cert).unwrap();
    std::fs::copy(&a_key, &key).unwrap();
    let setting = TlsSetting::Files {
        cert: cert.clone(),
        key: key.clone(),
    };
    let Some(c) = Coordinator::start_with(Db::Sqlite, |config| config.tls = Some(setting)).await
    else {
        return;
    };
    let url = c.running.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let admin = c.running.admin_token.clone();
    let fresh = |t: &Trust| Client::trusting(&url, &admin, t);
    assert_eq!(fresh(&trust("a")).whoami().await.unwrap().tenant, "default");
    let err = Client::new(&url, &admin).whoami().await.unwrap_err();
    assert!(matches!(err, ClientError::Untrusted { .. }), "{err}");
    assert!(!err.is_transient());
    let local = c.running.local_url();
    assert!(local.starts_with("http://127.0.0.1:"), "{local}");
    assert!(Client::new(&local, &admin).whoami().await.is_ok());

    // Renewed: the key first, then the certificate (a moment where they do not match keeps
    // the old pair served).
    std::fs::copy(&b_key, &key).unwrap();
    std::fs::copy(&b_cert, &cert).unwrap();
    let renewed = Instant::now();
    while fresh(&trust("b")).whoami().await.is_err() {
        assert!(
            renewed.elapsed() < Duration::from_secs(5),
            "the renewed certificate is not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = fresh(&trust("a")).whoami().await.unwrap_err();
    assert!(matches!(err, ClientError::Untrusted { .. }), "{err}");
    c.stop().await;
}
