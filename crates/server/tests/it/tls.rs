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

/// A certificate request for a fresh key: the key and the request (PEM each).
fn csr() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let req = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    (key.serialize_pem(), req.pem().unwrap())
}

/// `--agent-mtls`: enrolment needs a certificate request and answers with a certificate of
/// the coordinator's CA; agent calls over HTTPS need the certificate issued to that agent (not
/// none, not another agent's); a real agent runs jobs over it; a revoked agent's certificate
/// fails the handshake within a second or two while other agents work on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_need_their_own_certificate_and_a_revoked_one_fails_the_handshake() {
    use fleetbox_client::{Client, ClientError, Trust};
    use fleetbox_proto::api::{EnrollRequest, HeartbeatRequest};
    for db in crate::support::BOTH {
        let Some(mut c) = Coordinator::start_with(db, |config| {
            config.tls = Some(fleetbox_server::tls::TlsSetting::Auto { names: Vec::new() });
            config.agent_mtls = true;
        })
        .await
        else {
            continue;
        };
        let url = c.running.url();
        let trust = Trust::from_pem_file(&c.dir.path().join("tls").join("ca.pem")).unwrap();
        let admin = Client::trusting(&url, &c.running.admin_token, &trust);
        let enroller = Client::trusting(&url, &c.running.enroll_token, &trust);
        let enroll = |name: &str, csr: Option<String>| EnrollRequest {
            name: name.into(),
            slots: 1,
            public_key: hex::encode(
                ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
                    .verifying_key()
                    .as_bytes(),
            ),
            csr,
            ..Default::default()
        };
        // No request, no enrolment; a request that is not one is refused by name.
        let err = enroller.enroll(&enroll("bare", None)).await.unwrap_err();
        assert_eq!(err.code(), Some("invalid_body"), "{db:?}: {err}");
        let err = enroller
            .enroll(&enroll("junk", Some("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into())))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("invalid_body"), "{db:?}: {err}");
        // A refused enrolment leaves nothing behind: no agent without a certificate.
        let agents = admin.agents().await.unwrap().agents;
        assert!(
            agents.iter().all(|a| a.name != "junk" && a.name != "bare"),
            "{db:?}: {agents:?}"
        );

        let agent = |name: &'static str| {
            let (key, req) = csr();
            let enroller = enroller.clone();
            let (trust, url) = (trust.clone(), url.clone());
            async move {
                let resp = enroller.enroll(&enroll(name, Some(req))).await.unwrap();
                let cert = resp.certificate.expect("a certificate");
                assert!(cert.pem.contains("BEGIN CERTIFICATE"));
                let with = trust.presenting(&cert.pem, &key).unwrap();
                (resp.agent_id, resp.agent_token, with, trust, url)
            }
        };
        let (a_id, a_token, a_cert, plain, _) = agent("a").await;
        let (_, b_token, b_cert, _, _) = agent("b").await;
        let beat = HeartbeatRequest {
            running: Vec::new(),
            load: Default::default(),
            facts: None,
            csr: None,
            sessions: Vec::new(),
        };
        let a = Client::trusting(&url, &a_token, &a_cert);
        a.heartbeat(&beat).await.unwrap();
        // A heartbeat with a request that is not one: refused whole, the agent goes on.
        let err = a
            .heartbeat(&HeartbeatRequest {
                csr: Some("not a request".into()),
                ..beat.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("invalid_body"), "{db:?}: {err}");
        a.heartbeat(&beat).await.unwrap();
        // A's token without a certificate, or with B's: refused.
        for (who, t) in [("none", &plain), ("b's", &b_cert)] {
            let err = Client::trusting(&url, &a_token, t)
                .heartbeat(&beat)
                .await
                .unwrap_err();
            assert_eq!(
                err.code(),
                Some("client_certificate_required"),
                "{db:?}: with {who} certificate: {err}"
            );
        }
        // A heartbeat with a request renews the certificate; the new one works.
        let (b_key2, b_req2) = csr();
        let renewed = Client::trusting(&url, &b_token, &b_cert)
            .heartbeat(&HeartbeatRequest {
                csr: Some(b_req2),
                ..beat.clone()
            })
            .await
            .unwrap();
        let b_cert2 = trust
            .presenting(&renewed.certificate.expect("renewed").pem, &b_key2)
            .unwrap();
        Client::trusting(&url, &b_token, &b_cert2)
            .heartbeat(&beat)
            .await
            .unwrap();
        // Users present none and are served.
        assert_eq!(admin.whoami().await.unwrap().tenant, "default");
        // A real agent enrols over mTLS and runs a job.
        c.agent_with("real", |config| config.trust = trust.clone());
        let job = |name: &str| {
            spec(&format!(
                "name = \"{name}\"\ncode = \"print(2)\"\nshards = {{ count = 3 }}\naggregate = \"sum\"\n"
            ))
        };
        let first = admin.submit(&job("first")).await.unwrap();
        let r = wait(&admin, &first.id).await;
        assert_eq!(r, JobState::Completed, "{db:?}");

        // Revoked: a new connection with A's certificate fails the handshake.
        admin.revoke_agent(&a_id).await.unwrap();
        let revoked = Instant::now();
        loop {
            let fresh = Client::trusting(&url, &b_token, &a_cert);
            match fresh.heartbeat(&beat).await {
                Err(ClientError::Unreachable { .. }) => break,
                other => {
                    assert!(
                        revoked.elapsed() < Duration::from_secs(3),
                        "{db:?}: a revoked certificate still connects: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        eprintln!(
            "{db:?}: revoked certificate refused after {:?}",
            revoked.elapsed()
        );
        // B's own certificate still works, and so does the real agent.
        Client::trusting(&url, &b_token, &b_cert)
            .heartbeat(&beat)
            .await
            .unwrap();
        let second = admin.submit(&job("second")).await.unwrap();
        assert_eq!(
            wait(&admin, &second.id).await,
            JobState::Completed,
            "{db:?}"
        );
        // Another tenant's or an unknown agent: 404.
        let err = admin.revoke_agent("agt_nobody").await.unwrap_err();
        assert_eq!(err.code(), Some("not_found"), "{db:?}");
        let log = admin.audit("action=agent.revoked").await.unwrap().entries;
        assert_eq!(log.len(), 1, "{db:?}");
        c.stop().await;
    }
}

async fn wait(client: &fleetbox_client::Client, id: &str) -> JobState {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = client.job(id).await.unwrap();
        if v.state.is_final() {
            return v.state;
        }
        assert!(Instant::now() < deadline, "{v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
