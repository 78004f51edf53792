//! TLS on every connection, with certificates each run makes afresh: the listeners (TLS, mTLS with
//! callers named by their certificate, rotation without dropped connections) and PostgreSQL
//! (libpq's `sslmode`s against a server that serves TLS, and one that does not).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use embedded_pg::{EmbeddedPg, Options as PgOptions, ServerTls as PgTls};
use idmap::config::{Config, ListenerTlsFiles};
use idmap::proto::api::{GetUserByOryIdRequest, LinkIdentityRequest};
use idmap::store::{Database, PoolOptions, Store, migrate};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

use crate::common::*;

const BFF: &str = "spiffe://cluster.local/ns/web/sa/bff";
const OFFICE_DNS: &str = "backoffice.internal";
const READER_KEY: &str = "reader-key-0123456789abcdef0123";

/// A certificate authority made for one test.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, in PEM.
struct Pair {
    cert: String,
    key: String,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Self {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn leaf(&self, cn: &str, sans: Vec<SanType>, usage: ExtendedKeyUsagePurpose) -> Pair {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    fn server(&self, names: &[&str]) -> Pair {
        let sans = names
            .iter()
            .map(|n| match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().unwrap()),
            })
            .collect();
        self.leaf(names[0], sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with a SPIFFE id (URI SAN) or a DNS name.
    fn client(&self, cn: &str, uri: Option<&str>, dns: Option<&str>) -> Pair {
        let mut sans = Vec::new();
        if let Some(uri) = uri {
            sans.push(SanType::URI(uri.try_into().unwrap()));
        }
        if let Some(dns) = dns {
            sans.push(SanType::DnsName(dns.try_into().unwrap()));
        }
        self.leaf(cn, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A directory of files for one test, removed when it ends.
struct Files(PathBuf);

impl Files {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("idmap-tls-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `text` to `name` the way Kubernetes updates a mounted Secret: a new file renamed
    /// over the old one, so a reader never sees half of it.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        let staged = self.0.join(format!(".{name}.{}", Uuid::new_v4()));
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &path).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn callers_file(files: &Files) -> PathBuf {
    let key_sha = hex::encode(Sha256::digest(READER_KEY.as_bytes()));
    files.write(
        "callers.toml",
        &format!(
            r#"
[[callers]]
name = "web-bff"
spiffe_ids = ["{BFF}"]
rpcs = ["ResolveSession", "GetUserByOryId"]

[[callers]]
name = "back-office"
dns_names = ["{OFFICE_DNS}"]
rpcs = ["*"]

[[callers]]
name = "reader"
api_key_sha256 = ["{key_sha}"]
rpcs = ["GetUserByOryId"]
"#
        ),
    )
}

/// A server speaking TLS with the files in `files` (`cert.pem`, `key.pem`, and `client-ca.pem`
/// when `mtls`).
struct TlsServer {
    grpc: SocketAddr,
    http: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TlsServer {
    async fn start(mut config: Config, files: &Files, mtls: bool) -> Self {
        config.tls.files = Some(ListenerTlsFiles {
            cert: files.path("cert.pem"),
            key: files.path("key.pem"),
            client_ca: mtls.then(|| files.path("client-ca.pem")),
        });
        config.tls.reload_interval = Duration::from_millis(50);
        config.callers.allow_any_caller = false;
        config.callers.callers_file = Some(callers_file(files));
        let app = idmap::App::build(config).await.expect("build the app");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(grpc, http, async move {
            let _ = rx.await;
        }));
        Self {
            grpc: grpc_addr,
            http: http_addr,
            shutdown: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        (&mut self.task).await.unwrap().unwrap();
    }
}

/// A channel to `addr` trusting `ca`, presenting `identity` if given. Connects lazily: what the
/// server refuses shows on the first call.
fn tls_channel(addr: SocketAddr, ca: &str, identity: Option<&Pair>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

fn plain_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

async fn health(channel: &Channel) -> Result<(), tonic::Status> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

async fn by_ory_id(channel: &Channel, key: Option<&str>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(GetUserByOryIdRequest {
        ory_identity_id: Uuid::new_v4().to_string(),
    });
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {key}")).unwrap(),
        );
    }
    idmap::proto::api::identity_service_client::IdentityServiceClient::new(channel.clone())
        .get_user_by_ory_id(request)
        .await
        .map(|_| ())
}

async fn link(channel: &Channel) -> Result<(), tonic::Status> {
    idmap::proto::api::identity_service_client::IdentityServiceClient::new(channel.clone())
        .link_identity(LinkIdentityRequest {
            ory_identity_id: Uuid::new_v4().to_string(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn reason(status: &tonic::Status) -> String {
    error_info(status).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_names_callers_by_certificate_and_grants_per_rpc() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let (pki, stranger_pki) = (Pki::new("idmap test CA"), Pki::new("some other CA"));
    let files = Files::new();
    let server = pki.server(&["localhost", "127.0.0.1"]);
    files.write("cert.pem", &server.cert);
    files.write("key.pem", &server.key);
    files.write("client-ca.pem", &pki.ca_pem());
    let idmap = TlsServer::start(config(&db, &ory), &files, true).await;
    let ca = pki.ca_pem();

    let bff = tls_channel(idmap.grpc, &ca, Some(&pki.client("bff", Some(BFF), None)));
    health(&bff).await.expect("health over mTLS");
    let found = by_ory_id(&bff, None).await.unwrap_err();
    assert_code(&found, Code::NotFound);
    let refused = link(&bff).await.unwrap_err();
    assert_code(&refused, Code::PermissionDenied);
    assert_eq!(reason(&refused), "CALLER_NOT_ALLOWED");

    // Named by its DNS SAN, and granted everything: the link reaches Ory, which knows no such
    // identity.
    let office = tls_channel(
        idmap.grpc,
        &ca,
        Some(&pki.client("office", None, Some(OFFICE_DNS))),
    );
    assert_code(&link(&office).await.unwrap_err(), Code::NotFound);

    // A certificate the CA signed, for an identity the callers file does not name.
    let unknown = tls_channel(
        idmap.grpc,
        &ca,
        Some(&pki.client(
            "intruder",
            Some("spiffe://cluster.local/ns/x/sa/intruder"),
            None,
        )),
    );
    let status = by_ory_id(&unknown, None).await.unwrap_err();
    assert_code(&status, Code::Unauthenticated);
    assert_eq!(reason(&status), "CALLER_UNAUTHENTICATED");

    // No certificate, or one another CA signed: no call at all, not even a health check.
    assert!(health(&tls_channel(idmap.grpc, &ca, None)).await.is_err());
    let forged = stranger_pki.client("bff", Some(BFF), None);
    assert!(
        health(&tls_channel(idmap.grpc, &ca, Some(&forged)))
            .await
            .is_err()
    );
    // Nor in plaintext.
    assert!(health(&plain_channel(idmap.grpc)).await.is_err());

    idmap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners_refuse_plaintext_and_callers_use_keys() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let pki = Pki::new("idmap test CA");
    let files = Files::new();
    let server = pki.server(&["localhost"]);
    files.write("cert.pem", &server.cert);
    files.write("key.pem", &server.key);
    let idmap = TlsServer::start(config(&db, &ory), &files, false).await;
    let ca = pki.ca_pem();

    let channel = tls_channel(idmap.grpc, &ca, None);
    health(&channel).await.expect("health over TLS");
    assert_code(
        &by_ory_id(&channel, Some(READER_KEY)).await.unwrap_err(),
        Code::NotFound,
    );
    let anonymous = by_ory_id(&channel, None).await.unwrap_err();
    assert_code(&anonymous, Code::Unauthenticated);
    assert!(
        by_ory_id(&plain_channel(idmap.grpc), Some(READER_KEY))
            .await
            .is_err()
    );

    // The HTTP listener speaks TLS with the same certificate, and only TLS.
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/healthz", idmap.http.port());
    let answer = https.get(&url).send().await.expect("healthz over TLS");
    assert_eq!(answer.status(), 200);
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/healthz", idmap.http.port()))
        .send()
        .await;
    assert!(plain.is_err(), "plaintext HTTP answered: {plain:?}");

    idmap.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_reaches_new_connections_and_drops_none() {
    let db = TestDb::new().await;
    let ory = emulator().await;
    let (old_pki, new_pki) = (Pki::new("CA before"), Pki::new("CA after"));
    let files = Files::new();
    let server = old_pki.server(&["localhost"]);
    files.write("cert.pem", &server.cert);
    files.write("key.pem", &server.key);
    let idmap = TlsServer::start(config(&db, &ory), &files, false).await;

    let before = tls_channel(idmap.grpc, &old_pki.ca_pem(), None);
    health(&before)
        .await
        .expect("health with the first certificate");

    // cert-manager writes the new pair in place.
    let rotated = new_pki.server(&["localhost"]);
    files.write("key.pem", &rotated.key);
    files.write("cert.pem", &rotated.cert);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        // Each attempt is a new connection, which gets whatever certificate is current.
        if health(&tls_channel(idmap.grpc, &new_pki.ca_pem(), None))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificate was not served within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection made before the rotation still works; new ones get only the new certificate.
    health(&before).await.expect("the old connection survives");
    assert!(
        health(&tls_channel(idmap.grpc, &old_pki.ca_pem(), None))
            .await
            .is_err()
    );

    idmap.stop().await;
}

/// A private PostgreSQL that speaks TLS only (with a certificate for `localhost`), and the CA that
/// signed it.
fn tls_postgres() -> (EmbeddedPg, Pki) {
    let pki = Pki::new("database CA");
    let server = pki.server(&["localhost"]);
    let cluster = EmbeddedPg::start_with(PgOptions {
        tls: Some(PgTls {
            cert_pem: server.cert,
            key_pem: server.key,
        }),
        ..PgOptions::default()
    })
    .expect("start a PostgreSQL with TLS");
    (cluster, pki)
}

fn url(host: &str, port: u16, params: &str) -> SecretString {
    SecretString::from(format!(
        "postgres://postgres@{host}:{port}/postgres?{params}"
    ))
}

async fn ping(url: &SecretString) -> Result<(), String> {
    let database = Database::new(url).map_err(|e| e.to_string())?;
    Store::new(&database, &PoolOptions::default())
        .map_err(|e| e.to_string())?
        .ping()
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sslmodes_mean_what_they_mean_to_libpq() {
    let (cluster, pki) = tokio::task::spawn_blocking(tls_postgres).await.unwrap();
    let port = cluster.port();
    let files = Files::new();
    let ca = files.write("db-ca.pem", &pki.ca_pem());
    let other_ca = files.write("other-ca.pem", &Pki::new("not the database's CA").ca_pem());
    let root = |path: &Path| format!("sslrootcert={}", path.display());

    // verify-full: the chain and the name. The server's certificate is for localhost.
    let full = url(
        "localhost",
        port,
        &format!("sslmode=verify-full&{}", root(&ca)),
    );
    ping(&full)
        .await
        .expect("verify-full against the right CA and name");
    let by_ip = url(
        "127.0.0.1",
        port,
        &format!("sslmode=verify-full&{}", root(&ca)),
    );
    let err = ping(&by_ip).await.unwrap_err();
    assert!(err.contains("TLS"), "{err}");
    // verify-ca: the chain only, so the address is fine; another CA is not.
    ping(&url(
        "127.0.0.1",
        port,
        &format!("sslmode=verify-ca&{}", root(&ca)),
    ))
    .await
    .expect("verify-ca ignores the name");
    let err = ping(&url(
        "localhost",
        port,
        &format!("sslmode=verify-ca&{}", root(&other_ca)),
    ))
    .await
    .unwrap_err();
    assert!(err.contains("TLS"), "{err}");
    // require and prefer encrypt without checking; the server takes nothing else, so disable fails.
    ping(&url("127.0.0.1", port, "sslmode=require"))
        .await
        .expect("require");
    ping(&url("127.0.0.1", port, "sslmode=prefer"))
        .await
        .expect("prefer");
    assert!(
        ping(&url("127.0.0.1", port, "sslmode=disable"))
            .await
            .is_err()
    );

    // The whole service over verify-full: migrations, the pool, the LISTEN connection.
    let database = Database::new(&full).unwrap();
    migrate::run_pending(&database)
        .await
        .expect("migrate over TLS");
    let ory = emulator().await;
    let mut config = config_for_url(full.clone(), &ory.url());
    config.callers.allow_any_caller = true;
    let server = TestServer::start(config).await;
    let status = server
        .client
        .clone()
        .get_user_by_ory_id(GetUserByOryIdRequest {
            ory_identity_id: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_code(&status, Code::NotFound);
    server.stop().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_against_a_server_without_tls_fails_start_up_clearly() {
    let cluster = tokio::task::spawn_blocking(EmbeddedPg::start)
        .await
        .unwrap()
        .expect("start a PostgreSQL without TLS");
    let ory = emulator().await;
    let config = config_for_url(
        url("127.0.0.1", cluster.port(), "sslmode=require"),
        &ory.url(),
    );
    let err = match idmap::App::build(config).await {
        Ok(_) => panic!("started against a server without TLS"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("does not accept TLS"), "{err}");
    assert!(err.contains("sslmode=require"), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{}", cluster.port())),
        "{err}"
    );
}
