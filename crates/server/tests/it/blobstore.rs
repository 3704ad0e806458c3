//! `--blob-store s3://`: against a real S3-protocol server (moto's, from PyPI, which
//! `scripts/test` installs), two coordinators on one PostgreSQL and one bucket serve each
//! other's blobs; a bucket that cannot be reached stops the start with its reason.

use std::time::{Duration, Instant};

use fleetbox_proto::JobState;
use fleetbox_server::blobs::BlobStoreConfig;

use crate::support::{Coordinator, Db, Killed, spec};

/// moto's S3 server on a free loopback port, with a bucket `fleet`; `None` outside CI when
/// moto is not installed.
async fn s3_server() -> Option<(Killed, String)> {
    let dir = std::env::var("FLEETBOX_TEST_MOTO").ok().or_else(|| {
        let d =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-tools/moto");
        d.exists().then(|| d.display().to_string())
    });
    let Some(dir) = dir else {
        assert!(
            std::env::var_os("CI").is_none(),
            "moto is missing: scripts/test installs it"
        );
        eprintln!("skipping: moto is not installed (scripts/test installs it)");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("PYTHONPATH", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Killed(child);
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.put(format!("{url}/fleet")).send().await
            && r.status().is_success()
        {
            return Some((server, url));
        }
        assert!(Instant::now() < deadline, "moto's S3 server did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn bucket(endpoint: &str) -> BlobStoreConfig {
    BlobStoreConfig {
        url: "s3://fleet/blobs".into(),
        endpoint: Some(endpoint.into()),
        region: Some("us-east-1".into()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
    }
}

/// moto's S3 server and a coordinator on PostgreSQL keeping its blobs there, with one agent.
async fn on_s3() -> Option<(Killed, String, Coordinator)> {
    let (s3, endpoint) = s3_server().await?;
    let store = bucket(&endpoint);
    let mut c = Coordinator::start_with(Db::Postgres, |config| {
        config.blob_store = Some(store.clone());
    })
    .await?;
    c.agent("a", Default::default());
    Some((s3, endpoint, c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_serve_each_others_blobs_through_s3() {
    let Some((_s3, endpoint, c)) = on_s3().await else {
        return;
    };
    // Each shard: 40 kB of stderr (a stream blob) and a 100 kB value (an output and a stdout blob); the
    // result of three is over 256 kB (a result blob).
    let job = spec(
        "name = \"big\"\ncode = \"\"\"\nimport json, sys\nsys.stderr.write('e' * 40000)\nprint(json.dumps('v' * 100000))\n\"\"\"\nshards = { count = 3 }\naggregate = \"collect\"\n[limits]\nmax_output = \"1MiB\"\n",
    );
    let r = c.run(&job, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{r:?}");
    let shard = c.client.shard(&r.id, 0).await.unwrap();
    let stderr = shard.attempts[0]
        .stderr_blob
        .clone()
        .expect("a stderr blob");
    let stdout = shard.attempts[0]
        .stdout_blob
        .clone()
        .expect("a stdout blob");

    // A second coordinator: the same database and bucket, an empty data directory.
    let mut second = c.running.state.config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    second.data_dir = c.dir.path().join("second");
    let other = fleetbox_server::start(second).await.unwrap();
    let theirs = fleetbox_client::Client::new(&other.url(), &c.running.admin_token);
    for blob in [&stderr, &stdout] {
        let local = c
            .dir
            .path()
            .join("second/blobs")
            .join(&blob[..2])
            .join(blob);
        assert!(!local.exists(), "the second coordinator had {blob} already");
        let got = theirs.get_blob(blob).await.unwrap();
        assert_eq!(got, c.client.get_blob(blob).await.unwrap());
        assert!(local.exists(), "a fetched blob is kept in the cache");
    }
    assert_eq!(theirs.get_blob(&stderr).await.unwrap().len(), 40_000);
    let mine = c.client.result(&r.id).await.unwrap();
    let other_view = theirs.result(&r.id).await.unwrap();
    assert_eq!(other_view.result_value(), mine.result_value());
    assert_eq!(
        other_view
            .result_value()
            .and_then(|v| v.as_array().map(Vec::len)),
        Some(3)
    );
    // A bucket object that is not what its name says is refused, never served: the
    // second coordinator's cached copy gone, the object replaced behind its back.
    let cached = c
        .dir
        .path()
        .join("second/blobs")
        .join(&stderr[..2])
        .join(&stderr);
    std::fs::remove_file(&cached).unwrap();
    let raw = raw_bucket(&endpoint);
    let key =
        object_store::path::Path::from(format!("blobs/tenants/default/{}/{stderr}", &stderr[..2]));
    object_store::ObjectStoreExt::put(&raw, &key, b"forged".to_vec().into())
        .await
        .unwrap();
    let err = theirs.get_blob(&stderr).await.unwrap_err();
    assert!(
        !matches!(err, fleetbox_client::ClientError::Unreachable { .. }),
        "{err}"
    );
    assert!(!cached.exists(), "the forged object was cached");
    other.shutdown().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_cannot_be_reached_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        fleetbox_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().into());
    config.sandbox_backend = fleetbox_sandbox::Backend::Process;
    config.weak_sandbox_allowed = true;
    // Nothing listens on port 9 of loopback.
    config.blob_store = Some(bucket("http://127.0.0.1:9"));
    let err = match fleetbox_server::start(config).await {
        Ok(_) => panic!("started with an unreachable bucket"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("--blob-store s3://fleet/blobs"), "{err}");
    let mut bad =
        fleetbox_server::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().into());
    bad.sandbox_backend = fleetbox_sandbox::Backend::Process;
    bad.weak_sandbox_allowed = true;
    bad.blob_store = Some(BlobStoreConfig {
        url: "gs://elsewhere".into(),
        ..bucket("http://127.0.0.1:9")
    });
    let err = match fleetbox_server::start(bad).await {
        Ok(_) => panic!("started with a gs:// URL"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("only s3://"), "{err}");
}

/// moto's bucket `fleet`, reached directly (not through a coordinator).
fn raw_bucket(endpoint: &str) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("fleet")
        .with_region("us-east-1")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .build()
        .unwrap()
}

/// The keys under `prefix` in moto's bucket `fleet`.
async fn keys(endpoint: &str, prefix: &str) -> Vec<String> {
    use futures_util::TryStreamExt;
    let raw = raw_bucket(endpoint);
    let prefix = object_store::path::Path::from(prefix);
    let mut keys: Vec<String> = object_store::ObjectStore::list(&raw, Some(&prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Run `job` as the tenant of `client` and wait for it to finish; the sha256 of each file
/// its one shard listed, by name.
async fn run_as(
    client: &fleetbox_client::Client,
    job: &fleetbox_proto::JobSpec,
) -> std::collections::HashMap<String, String> {
    let id = client.submit(job).await.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client.result(&id).await.unwrap();
        if r.state.is_final() {
            assert_eq!(r.state, JobState::Completed, "{r:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{id} still {}", r.state);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    crate::support::files_of(client, &id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_keeps_its_blobs_under_its_own_prefix() {
    use fleetbox_proto::tenancy::{Scope, TenantCaps, TenantCreate, TokenCreate};
    let Some((_s3, endpoint, c)) = on_s3().await else {
        return;
    };
    let (mut clients, mut tokens) = (Vec::new(), Vec::new());
    for name in ["acme", "bolt"] {
        c.client
            .create_tenant(&TenantCreate {
                name: name.into(),
                caps: TenantCaps::default(),
            })
            .await
            .unwrap();
        let token = c
            .client
            .create_token(&TokenCreate {
                tenant: Some(name.into()),
                scopes: Scope::ALL.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .token;
        clients.push(c.client.with_token(&token));
        tokens.push(token);
    }
    // Each tenant's one shard writes the same `shared.txt` and a file of its own, on the one
    // shared agent, which uploads them with its lease.
    let writing = |tag: &str| {
        spec(&format!(
            "name = \"{tag}\"\ncode = '''\nopen('shared.txt', 'w').write('the same for both')\n\
             open('own.txt', 'w').write('only {tag}')\nprint(1)\n'''\nshards = {{ count = 1 }}\n\
             [verify]\nrecheck = \"none\"\n"
        ))
    };
    let acme = run_as(&clients[0], &writing("acme")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cutoff = fleetbox_server::store::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let bolt = run_as(&clients[1], &writing("bolt")).await;
    assert_eq!(acme["shared.txt"], bolt["shared.txt"]);
    let key = |tenant: &str, sha: &str| format!("blobs/tenants/{tenant}/{}/{sha}", &sha[..2]);
    let (acme_keys, bolt_keys) = (
        keys(&endpoint, "blobs/tenants/acme").await,
        keys(&endpoint, "blobs/tenants/bolt").await,
    );
    assert_eq!(
        acme_keys,
        {
            let mut k = vec![
                key("acme", &acme["shared.txt"]),
                key("acme", &acme["own.txt"]),
            ];
            k.sort();
            k
        },
        "acme's area holds its two files, nothing of bolt's"
    );
    assert!(
        bolt_keys.contains(&key("bolt", &bolt["shared.txt"])),
        "{bolt_keys:?}"
    );
    assert!(
        bolt_keys.contains(&key("bolt", &bolt["own.txt"])),
        "{bolt_keys:?}"
    );
    assert!(
        !bolt_keys.contains(&key("bolt", &acme["own.txt"])),
        "{bolt_keys:?}"
    );
    // Uploaded with a lease: nothing went to the shared area.
    let shared_area: Vec<String> = keys(&endpoint, "blobs")
        .await
        .into_iter()
        .filter(|k| !k.starts_with("blobs/tenants/"))
        .collect();
    for sha in acme.values().chain(bolt.values()) {
        assert!(
            !shared_area.iter().any(|k| k.ends_with(sha.as_str())),
            "{shared_area:?}"
        );
    }

    // acme's job pruned: its copies go, bolt's stay, and bolt reads its file through a second
    // coordinator that never held it.
    let state = c.running.state.clone();
    let pass = fleetbox_server::retention::pass(&state, cutoff, 0, [], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(pass.pruned.jobs, 1, "{pass:?}");
    assert_eq!(pass.tenant_copies_removed, 2, "{pass:?}");
    assert_eq!(
        keys(&endpoint, "blobs/tenants/acme").await,
        Vec::<String>::new()
    );
    assert_eq!(keys(&endpoint, "blobs/tenants/bolt").await, bolt_keys);
    let mut second = c.running.state.config.clone();
    second.listen = "127.0.0.1:0".parse().unwrap();
    second.data_dir = c.dir.path().join("second");
    let other = fleetbox_server::start(second).await.unwrap();
    let there = |i: usize| fleetbox_client::Client::new(&other.url(), &tokens[i]);
    let bolt_there = there(1);
    let got = bolt_there.get_blob(&bolt["shared.txt"]).await.unwrap();
    assert_eq!(got, b"the same for both");
    let err = there(0).get_blob(&acme["own.txt"]).await.unwrap_err();
    assert!(err.to_string().contains("not_found"), "{err}");

    // An upload that named no lease (an agent of an older version) waits in the shared area;
    // a report naming it puts it in the tenant's, and reads fall back to the shared one.
    let early = state
        .blobs
        .put(None, b"uploaded before the tenant was known")
        .unwrap();
    let shared_key = format!("blobs/{}/{early}", &early[..2]);
    assert!(keys(&endpoint, "blobs").await.contains(&shared_key));
    assert_eq!(state.blobs.claim("bolt", &early).unwrap(), Some(36));
    assert!(
        keys(&endpoint, "blobs/tenants/bolt")
            .await
            .contains(&key("bolt", &early))
    );
    let other_blobs = &other.state.blobs;
    assert_eq!(
        other_blobs.get(Some("acme"), &early).unwrap(),
        b"uploaded before the tenant was known"
    );
    other.shutdown().await;
    c.stop().await;
}
