//! `deploy/gateways/nginx.conf` run by a real nginx (Debian's package at /usr/sbin/nginx, which
//! `.ci/run` installs), in front of a recording upstream, with idmap's `GET /gateway/auth` behind
//! `auth_request`. The configuration is the file itself: only its addresses are replaced (idmap's,
//! the upstream's, the listen port), and it is included in a small wrapper that keeps nginx in the
//! foreground with every path in a temporary directory, as `conf.d/` files are included by a
//! distribution's `nginx.conf`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::body::to_bytes;
use axum::extract::Request;
use idmap::proto::api::{SetExternalIdRequest, set_external_id_request};
use kratos_emulator::{Fault, NewIdentity, NewSession, Route};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use crate::common::*;

const NGINX: &str = "/usr/sbin/nginx";
/// Where deploy/gateways/nginx.conf sends browsers (kept as the file has it).
const LOGIN: &str = "https://auth.example.com/self-service/login/browser";
/// idmap's own login redirect, set so that a 303 from idmap would show: the configuration keeps
/// idmap from answering one (nginx could not pass it on).
const IDMAP_LOGIN: &str = "https://idmap-login.example.com/login";
const HTML: (&str, &str) = ("accept", "text/html,application/xhtml+xml");

/// One request as the upstream received it.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    uri: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    /// The value of a header sent at most once (names are lower case).
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self
            .headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        let first = values.next();
        assert!(values.next().is_none(), "{name} sent twice: {self:?}");
        first
    }
}

/// The application behind nginx: answers 200 to everything and remembers what it received.
#[derive(Clone, Default)]
struct Upstream {
    received: Arc<Mutex<Vec<Received>>>,
}

impl Upstream {
    async fn start() -> (Upstream, SocketAddr) {
        let upstream = Upstream::default();
        let record = upstream.clone();
        let app = axum::Router::new().fallback(move |request: Request| {
            let record = record.clone();
            async move {
                let (parts, body) = request.into_parts();
                let body = to_bytes(body, 1 << 20).await.unwrap();
                record.received.lock().unwrap().push(Received {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                        .collect(),
                    body: String::from_utf8(body.to_vec()).unwrap(),
                });
                "from the upstream"
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (upstream, addr)
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn last(&self) -> Received {
        self.received.lock().unwrap().last().cloned().unwrap()
    }
}

/// A running nginx, killed (and its directory removed) when dropped, also when a test panics.
struct Nginx {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Nginx {
    /// Starts nginx with deploy/gateways/nginx.conf, its addresses replaced, and waits until it
    /// accepts connections.
    async fn start(idmap_http: SocketAddr, upstream: SocketAddr) -> Nginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} is missing: install nginx (`apt-get install -y nginx`; .ci/run does it)"
        );
        let dir = std::env::temp_dir().join(format!("idmap-nginx-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // A free port for nginx to listen on (released for nginx to bind; should another
        // process take it first, nginx exits and the error log below says so).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/gateways/nginx.conf");
        let mut conf = std::fs::read_to_string(&source).unwrap();
        for (from, to) in [
            ("server idmap:8080;", format!("server {idmap_http};")),
            ("server app:3000;", format!("server {upstream};")),
            ("listen 80;", format!("listen {addr};")),
        ] {
            assert_eq!(
                conf.matches(from).count(),
                1,
                "{} should say `{from}` once",
                source.display()
            );
            conf = conf.replacen(from, &to, 1);
        }
        std::fs::write(dir.join("idmap.conf"), conf).unwrap();
        let d = dir.display();
        // One process in the foreground (no user switch, so it runs as whoever runs the test),
        // and nothing outside the directory: pid, logs and every temporary path.
        let main = format!(
            "master_process off;\n\
             daemon off;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n\
             \x20   access_log {d}/access.log;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/idmap.conf;\n\
             }}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).unwrap();
        let child = Command::new(NGINX)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            // The log nginx writes before it has read the configuration.
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {NGINX}: {e}"));
        let mut nginx = Nginx { child, dir, addr };
        nginx.wait_until_listening().await;
        nginx
    }

    async fn wait_until_listening(&mut self) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(10));
        loop {
            tick.tick().await;
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("nginx exited ({status}):\n{}", self.error_log());
            }
            if TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nginx does not listen on {} after {PATIENCE:?}:\n{}",
                self.addr,
                self.error_log()
            );
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("nginx's error log:\n{}", self.error_log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A request through nginx, redirects not followed.
async fn get(nginx: &Nginx, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    send(nginx, reqwest::Method::GET, path, headers, "").await
}

async fn send(
    nginx: &Nginx,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> reqwest::Response {
    let mut request = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .request(method, nginx.url(path))
        .body(body.to_owned());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    request.send().await.unwrap()
}

fn location(response: &reqwest::Response) -> &str {
    response.headers()["location"].to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_auth_request_forwards_the_user_and_refuses_everything_else() {
    let env = Env::with(|c| c.gateway.login_url = Some(IDMAP_LOGIN.parse().unwrap())).await;
    let (upstream, upstream_addr) = Upstream::start().await;
    let nginx = Nginx::start(env.server.http_addr, upstream_addr).await;
    let (identity, session) = env.customer("nginx@example.com");
    let cookie = format!(
        "theme=dark; ory_kratos_session={}; _ga=GA1.2.3",
        session.cookie
    );

    // (a) A browser with the session cookie among others: through, with the linked user.
    let ok = get(&nginx, "/orders?page=2", &[HTML, ("cookie", &cookie)]).await;
    assert_eq!(ok.status(), 200, "{}", nginx.error_log());
    assert_eq!(ok.text().await.unwrap(), "from the upstream");
    assert_eq!(upstream.count(), 1);
    let user = env.db.user_of(identity).await.to_string();
    let seen = upstream.last();
    assert_eq!(
        (seen.method.as_str(), seen.uri.as_str()),
        ("GET", "/orders?page=2")
    );
    assert_eq!(seen.header("x-user-id"), Some(user.as_str()));
    assert_eq!(
        seen.header("x-ory-identity-id"),
        Some(identity.to_string().as_str())
    );
    assert_eq!(
        seen.header("x-ory-session-id"),
        Some(session.id.to_string().as_str())
    );
    assert_eq!(seen.header("x-ory-aal"), Some("aal1"));
    assert_eq!(seen.header("x-user-state"), Some("active"));
    assert_eq!(seen.header("x-user-external-id"), None, "the user has none");
    // The application still gets the client's own headers.
    assert_eq!(seen.header("cookie"), Some(cookie.as_str()));
    assert_eq!(seen.header("accept"), Some(HTML.1));

    // (b) Forged identity headers with a session: replaced by idmap's, or removed.
    let forged = [
        ("x-user-id", "attacker"),
        ("x-user-external-id", "forged"),
        ("x-user-external-id-crm", "forged"),
        ("x-idmap-assertion", "forged"),
    ];
    let mut headers = vec![HTML, ("cookie", cookie.as_str())];
    headers.extend(forged);
    assert_eq!(get(&nginx, "/orders", &headers).await.status(), 200);
    assert_eq!(upstream.count(), 2);
    let seen = upstream.last();
    assert_eq!(seen.header("x-user-id"), Some(user.as_str()));
    for (name, _) in &forged[1..] {
        assert_eq!(seen.header(name), None, "{name}");
    }
    // ... and without a session, they go nowhere: browsers to the login page, others a 401.
    let browser = get(&nginx, "/orders", &[HTML, forged[0]]).await;
    assert_eq!(browser.status(), 303);
    assert!(location(&browser).starts_with(LOGIN), "{browser:?}");
    let api = get(&nginx, "/orders", &[forged[0]]).await;
    assert_eq!(api.status(), 401);
    assert_eq!(upstream.count(), 2);

    // (c) No session: 401 for an API client; for a browser nginx's redirect (idmap's own 303
    // would have been a 500), coming back to the page asked for.
    assert_eq!(get(&nginx, "/orders", &[]).await.status(), 401);
    assert_eq!(
        get(&nginx, "/orders", &[("accept", "application/json")])
            .await
            .status(),
        401
    );
    let browser = get(&nginx, "/orders?page=2", &[HTML]).await;
    assert_eq!(browser.status(), 303);
    assert_eq!(
        location(&browser),
        format!("{LOGIN}?return_to=http://{}/orders?page=2", nginx.addr)
    );
    // Other cookies are no session; an unknown session token is none either.
    for headers in [
        [("cookie", "theme=dark")],
        [("x-session-token", "ory_st_nope")],
        [("authorization", "Bearer ory_st_nope")],
    ] {
        assert_eq!(get(&nginx, "/orders", &headers).await.status(), 401);
    }
    assert_eq!(upstream.count(), 2);

    // A session token, on a POST: idmap is asked with GET and without the body; the
    // application gets both.
    let bearer = format!("Bearer {}", session.token);
    let posted = send(
        &nginx,
        reqwest::Method::POST,
        "/orders",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        r#"{"sku":"A-1"}"#,
    )
    .await;
    assert_eq!(posted.status(), 200);
    assert_eq!(upstream.count(), 3);
    let seen = upstream.last();
    assert_eq!(
        (seen.method.as_str(), seen.body.as_str()),
        ("POST", r#"{"sku":"A-1"}"#)
    );
    assert_eq!(seen.header("x-user-id"), Some(user.as_str()));

    // A business id in a namespace the configuration lists reaches the application.
    env.client()
        .set_external_id(SetExternalIdRequest {
            subject: Some(set_external_id_request::Subject::OryIdentityId(
                identity.to_string(),
            )),
            namespace: "crm".into(),
            value: "crm-42".into(),
            replace: false,
        })
        .await
        .unwrap();
    assert_eq!(
        get(&nginx, "/orders", &[("x-session-token", &session.token)])
            .await
            .status(),
        200
    );
    assert_eq!(upstream.count(), 4);
    assert_eq!(
        upstream.last().header("x-user-external-id-crm"),
        Some("crm-42")
    );

    // The authentication level is too low: 403, and browsers are sent to log in with aal2.
    let created = env.ory.create_identity(NewIdentity {
        schema_id: "employee".into(),
        traits: json!({"email": "nginx-mfa@example.com"}),
        identifiers: vec!["nginx-mfa@example.com".into()],
        second_factor: true,
        ..NewIdentity::default()
    });
    let aal1 = env
        .ory
        .create_session(id_of(&created), NewSession::default());
    let aal1_cookie = format!("ory_kratos_session={}", aal1.cookie);
    assert_eq!(
        get(&nginx, "/orders", &[("cookie", &aal1_cookie)])
            .await
            .status(),
        403
    );
    let step_up = get(&nginx, "/orders", &[HTML, ("cookie", &aal1_cookie)]).await;
    assert_eq!(step_up.status(), 303);
    assert_eq!(
        location(&step_up),
        format!("{LOGIN}?aal=aal2&return_to=http://{}/orders", nginx.addr)
    );
    assert_eq!(upstream.count(), 4);

    // (d) Ory down, for a session idmap has not seen: 503 with Retry-After (nginx's 500 from
    // auth_request, mapped back), never a 401 or the login page, and nothing upstream.
    let (_, fresh) = env.customer("nginx-down@example.com");
    env.ory.inject_fault(Route::Whoami, Fault::status(503));
    let fresh_cookie = format!("ory_kratos_session={}", fresh.cookie);
    for headers in [
        vec![("cookie", fresh_cookie.as_str())],
        vec![HTML, ("cookie", fresh_cookie.as_str())],
    ] {
        let down = get(&nginx, "/orders", &headers).await;
        assert_eq!(down.status(), 503, "{headers:?}");
        assert_eq!(down.headers()["retry-after"], "1");
    }
    // Ory's own Retry-After comes through.
    env.ory.clear_faults();
    env.ory.inject_fault(Route::Whoami, Fault::rate_limited(7));
    let (_, limited) = env.customer("nginx-limited@example.com");
    let down = get(&nginx, "/orders", &[("x-session-token", &limited.token)]).await;
    assert_eq!(down.status(), 503);
    assert_eq!(down.headers()["retry-after"], "7");
    assert_eq!(upstream.count(), 4);
    // The session idmap knows still works from its cache.
    assert_eq!(
        get(&nginx, "/orders", &[("cookie", &cookie)])
            .await
            .status(),
        200
    );
    assert_eq!(upstream.count(), 5);

    // idmap itself unreachable: 503 too.
    env.server.stop().await;
    let down = get(&nginx, "/orders", &[("cookie", &cookie)]).await;
    assert_eq!(down.status(), 503);
    assert_eq!(down.headers()["retry-after"], "1");
    assert_eq!(upstream.count(), 5);
}
