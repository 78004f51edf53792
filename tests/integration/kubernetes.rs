//! `deploy/kubernetes/` and the `Dockerfile`, held to what idmap is. Kubernetes runs a pod with a
//! variable idmap has never heard of (ignored, so the setting silently keeps its default), a probe on
//! a port nothing listens on (restarted forever) or a subcommand the binary lacks; each shows only
//! once deployed. So every name here is checked against idmap itself: variables and subcommands
//! against the clap definition (`idmap::cmd::Cli`), ports against its defaults, the package and the
//! binary against Cargo.toml. The Kubernetes API schemas are `.ci/check-manifests`' part.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine;
use clap::{CommandFactory, FromArgMatches};
use serde::Deserialize;
use serde_json::Value;

/// Variables idmap reads outside clap, each with the source line that reads it.
const READ_OUTSIDE_CLAP: &[(&str, &str, &str)] = &[(
    "RUST_LOG",
    "src/telemetry.rs",
    "EnvFilter::try_from_default_env",
)];

/// The subcommands a production image has not: `dev` is the `dev` cargo feature, which the
/// Dockerfile leaves out, and `help` is clap's.
const NOT_IN_PRODUCTION: &[&str] = &["dev", "help"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One YAML document of `deploy/kubernetes/`.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }

    fn at(&self, pointer: &str) -> &Value {
        self.value
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{} ({}): no {pointer}", self.file, self.kind()))
    }
}

struct Manifests(Vec<Doc>);

impl Manifests {
    fn load() -> Self {
        let dir = repo().join("deploy/kubernetes");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        let mut docs = Vec::new();
        for path in files {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = read(&path);
            for document in serde_norway::Deserializer::from_str(&text) {
                let value = Value::deserialize(document)
                    .unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
                if !value.is_null() {
                    docs.push(Doc {
                        file: file.clone(),
                        value,
                    });
                }
            }
        }
        Self(docs)
    }

    fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Doc> {
        let kind = kind.to_owned();
        self.0.iter().filter(move |d| d.kind() == kind)
    }

    fn one(&self, kind: &str) -> &Doc {
        let found: Vec<&Doc> = self.of_kind(kind).collect();
        assert_eq!(found.len(), 1, "expected one {kind} in deploy/kubernetes/");
        found[0]
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Doc> {
        self.of_kind(kind).find(|d| d.name() == name)
    }

    /// Everything that runs idmap: the Deployment, the migrate Job, and any (Cron)Job added later.
    fn workloads(&self) -> Vec<&Doc> {
        let found: Vec<&Doc> = self.0.iter().filter(|d| pod_spec(d).is_some()).collect();
        assert!(
            !found.is_empty(),
            "nothing in deploy/kubernetes/ runs idmap"
        );
        found
    }
}

/// The pod template's spec of a Deployment, Job or CronJob.
fn pod_spec(doc: &Doc) -> Option<&Value> {
    [
        "/spec/template/spec",
        "/spec/jobTemplate/spec/template/spec",
    ]
    .iter()
    .find_map(|pointer| doc.value.pointer(pointer))
}

fn containers(workload: &Doc) -> Vec<&Value> {
    let pod = pod_spec(workload).unwrap_or_else(|| panic!("{}: no pod template", workload.file));
    ["initContainers", "containers"]
        .iter()
        .filter_map(|key| pod[*key].as_array())
        .flatten()
        .collect()
}

fn the_container(workload: &Doc) -> &Value {
    let found = containers(workload);
    assert_eq!(found.len(), 1, "{}: one container", workload.file);
    found[0]
}

/// clap's definition with global arguments handed down to the subcommands.
fn cli() -> clap::Command {
    let mut cli = idmap::cmd::Cli::command();
    cli.build();
    cli
}

/// An environment variable a subcommand reads, as clap defines it.
struct Setting {
    long: String,
    default: Option<String>,
}

fn settings_of(subcommand: &str) -> BTreeMap<String, Setting> {
    let cli = cli();
    let command = cli
        .find_subcommand(subcommand)
        .unwrap_or_else(|| panic!("idmap has no subcommand {subcommand}"));
    command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            let long = arg
                .get_long()
                .unwrap_or_else(|| panic!("{env} has no flag"))
                .to_owned();
            let default = arg
                .get_default_values()
                .first()
                .map(|v| v.to_string_lossy().into_owned());
            Some((env, Setting { long, default }))
        })
        .collect()
}

fn production_subcommands() -> BTreeSet<String> {
    cli()
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .filter(|name| !NOT_IN_PRODUCTION.contains(&name.as_str()))
        .collect()
}

/// Where a container's variable comes from.
#[derive(Debug, Clone)]
enum Source {
    Literal(String),
    ConfigMap { name: String, key: String },
    Secret { name: String, key: String },
}

/// A container's variables in the order Kubernetes applies them (`env` after `envFrom`), each
/// with its source and whether it may be missing.
fn declared_env(m: &Manifests, doc: &Doc, container: &Value) -> Vec<(String, Source, bool)> {
    let mut vars = Vec::new();
    for from in container["envFrom"].as_array().into_iter().flatten() {
        assert!(
            from.get("prefix").is_none(),
            "{}: envFrom with a prefix renames idmap's variables",
            doc.file
        );
        let (kind, reference) = if let Some(r) = from.get("configMapRef") {
            ("ConfigMap", r)
        } else if let Some(r) = from.get("secretRef") {
            ("Secret", r)
        } else {
            panic!("{}: envFrom {from}", doc.file)
        };
        let name = reference["name"].as_str().unwrap();
        let source = m.named(kind, name).unwrap_or_else(|| {
            panic!(
                "{}: envFrom {kind} {name}, which deploy/kubernetes/ does not have",
                doc.file
            )
        });
        for key in data_keys(source) {
            let from = if kind == "Secret" {
                Source::Secret {
                    name: name.to_owned(),
                    key: key.clone(),
                }
            } else {
                Source::ConfigMap {
                    name: name.to_owned(),
                    key: key.clone(),
                }
            };
            vars.push((key, from, false));
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_owned();
        let (source, optional) = if let Some(value) = var.get("value") {
            (Source::Literal(value.as_str().unwrap().to_owned()), false)
        } else if let Some(r) = var.pointer("/valueFrom/secretKeyRef") {
            let source = Source::Secret {
                name: r["name"].as_str().unwrap().to_owned(),
                key: r["key"].as_str().unwrap().to_owned(),
            };
            (source, r["optional"].as_bool().unwrap_or(false))
        } else if let Some(r) = var.pointer("/valueFrom/configMapKeyRef") {
            let source = Source::ConfigMap {
                name: r["name"].as_str().unwrap().to_owned(),
                key: r["key"].as_str().unwrap().to_owned(),
            };
            (source, r["optional"].as_bool().unwrap_or(false))
        } else {
            panic!(
                "{}: {name} is neither a value nor a key reference",
                doc.file
            )
        };
        vars.push((name, source, optional));
    }
    vars
}

/// The keys of a ConfigMap's `data` or a Secret's `stringData` and `data`.
fn data_keys(doc: &Doc) -> Vec<String> {
    ["data", "stringData"]
        .iter()
        .filter_map(|field| doc.value[*field].as_object())
        .flat_map(|map| map.keys().cloned())
        .collect()
}

fn data_value(doc: &Doc, key: &str) -> Option<String> {
    if let Some(value) = doc.value["stringData"][key].as_str() {
        return Some(value.to_owned());
    }
    let value = doc.value["data"][key].as_str()?;
    if doc.kind() == "Secret" {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .unwrap();
        Some(String::from_utf8(bytes).unwrap())
    } else {
        Some(value.to_owned())
    }
}

/// What the container's variables are set to; a missing optional reference leaves its variable
/// unset, a missing required one fails (Kubernetes would not start the pod).
fn resolved_env(m: &Manifests, doc: &Doc, container: &Value) -> BTreeMap<String, (Source, String)> {
    let mut env = BTreeMap::new();
    for (name, source, optional) in declared_env(m, doc, container) {
        let value = match &source {
            Source::Literal(value) => Some(value.clone()),
            Source::ConfigMap { name: cm, key } | Source::Secret { name: cm, key } => {
                let kind = if matches!(source, Source::Secret { .. }) {
                    "Secret"
                } else {
                    "ConfigMap"
                };
                let found = m.named(kind, cm).and_then(|d| data_value(d, key));
                assert!(
                    found.is_some() || optional,
                    "{}: {name} needs key {key} of {kind} {cm}, which deploy/kubernetes/ does not have",
                    doc.file
                );
                found
            }
        };
        if let Some(value) = value {
            env.insert(name, (source, value));
        }
    }
    env
}

/// The subcommand a container runs: its `args` (the image's ENTRYPOINT is the binary), or the
/// image's CMD when it sets neither `args` nor `command`.
fn subcommand_of(doc: &Doc, container: &Value, dockerfile: &Dockerfile) -> String {
    if let Some(command) = container.get("command") {
        assert_eq!(
            command,
            &Value::from(dockerfile.entrypoint.clone()),
            "{}: `command` replaces the image's ENTRYPOINT; leave it out or name the same binary",
            doc.file
        );
    }
    let args: Vec<String> = match container["args"].as_array() {
        Some(args) => args
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect(),
        // Kubernetes drops the image's CMD along with its ENTRYPOINT when `command` is set.
        None if container.get("command").is_none() => dockerfile.cmd.clone(),
        None => Vec::new(),
    };
    let subcommand = args
        .first()
        .unwrap_or_else(|| panic!("{}: no subcommand", doc.file))
        .clone();
    assert!(
        production_subcommands().contains(&subcommand),
        "{}: `idmap {subcommand}` is not a subcommand of the production binary ({:?})",
        doc.file,
        production_subcommands()
    );
    subcommand
}

#[test]
fn every_variable_is_a_setting_of_the_subcommand_that_reads_it() {
    for (name, file, reads) in READ_OUTSIDE_CLAP {
        assert!(
            read(&repo().join(file)).contains(reads),
            "{file} no longer reads {name} ({reads})"
        );
    }
    let m = Manifests::load();
    let dockerfile = Dockerfile::load();
    let mut consumed: BTreeSet<(String, String)> = BTreeSet::new();
    for doc in m.workloads() {
        for container in containers(doc) {
            let subcommand = subcommand_of(doc, container, &dockerfile);
            let known = settings_of(&subcommand);
            let declared = declared_env(&m, doc, container);
            let mut seen = BTreeSet::new();
            for (name, source, _) in &declared {
                assert!(
                    seen.insert(name.clone()),
                    "{}: {name} is set twice (env overrides envFrom silently)",
                    doc.file
                );
                match source {
                    Source::Secret { name, key } => {
                        consumed.insert((name.clone(), key.clone()));
                    }
                    Source::ConfigMap { .. } | Source::Literal(_) => {}
                }
            }
            let unknown: Vec<&String> = declared
                .iter()
                .map(|(name, _, _)| name)
                .filter(|name| {
                    !known.contains_key(*name)
                        && !READ_OUTSIDE_CLAP.iter().any(|(n, _, _)| n == name)
                })
                .collect();
            assert!(
                unknown.is_empty(),
                "{}: `idmap {subcommand}` does not read {unknown:?}; it reads {:?}",
                doc.file,
                known.keys().collect::<Vec<_>>()
            );
            resolved_env(&m, doc, container);
        }
    }
    // Every key is named after the setting it holds, so a Secret or a ConfigMap read as variables
    // holds nothing else, and a Secret key nothing reads is a secret handed out for nothing.
    let serve = settings_of("serve");
    let read_as_env: BTreeSet<&str> = m
        .workloads()
        .into_iter()
        .flat_map(containers)
        .flat_map(|c| c["envFrom"].as_array().into_iter().flatten())
        .filter_map(|from| from.pointer("/configMapRef/name")?.as_str())
        .collect();
    for doc in m.of_kind("Secret").chain(
        m.of_kind("ConfigMap")
            .filter(|d| read_as_env.contains(d.name())),
    ) {
        for key in data_keys(doc) {
            assert!(
                serve.contains_key(&key),
                "{} ({} {}): {key} is not a setting of idmap serve",
                doc.file,
                doc.kind(),
                doc.name()
            );
            if doc.kind() == "Secret" {
                assert!(
                    consumed.contains(&(doc.name().to_owned(), key.clone())),
                    "{}: nothing reads {key}",
                    doc.file
                );
            }
        }
    }
}

/// The Deployment's settings as `idmap serve` flags, with the example Secret's placeholders
/// replaced by values that parse, and files mounted from a shipped ConfigMap written out under
/// `dir` (their mounts checked on the way).
fn serve_flags(m: &Manifests, dir: &Path) -> BTreeMap<String, String> {
    let deployment = m.one("Deployment");
    let container = the_container(deployment);
    let serve = settings_of("serve");
    let mut flags = BTreeMap::new();
    for (name, (source, value)) in resolved_env(m, deployment, container) {
        let Some(setting) = serve.get(&name) else {
            continue;
        };
        let value = match source {
            Source::Secret { .. } => stand_in(&name),
            _ if value.starts_with('/') => match mounted_file(m, deployment, container, &value) {
                Some(content) => {
                    let file = dir.join(name.to_ascii_lowercase());
                    std::fs::write(&file, content).unwrap();
                    file.to_string_lossy().into_owned()
                }
                None => value,
            },
            _ => value,
        };
        flags.insert(setting.long.clone(), value);
    }
    flags
}

/// A value that parses, for a setting the example Secret holds a placeholder of.
fn stand_in(name: &str) -> String {
    match name {
        "DATABASE_URL" => "postgres://idmap:secret@db.internal:5432/idmap?sslmode=verify-full&sslrootcert=/etc/idmap/postgres-ca/ca.crt",
        "IDMAP_WEBHOOK_SECRET" => "0123456789abcdef0123456789abcdef",
        "ORY_API_KEY" => "ory_pat_0123456789",
        "DATABASE_READ_URL" => "postgres://idmap:secret@db-replica.internal:5432/idmap",
        other => panic!("no stand-in for the secret {other}: add one here"),
    }
    .to_owned()
}

/// The content of the file at `path` in `container`, when a ConfigMap of deploy/kubernetes/
/// provides it; `None` when the volume is one the operator creates. Fails when no volume is
/// mounted there.
fn mounted_file(m: &Manifests, doc: &Doc, container: &Value, path: &str) -> Option<String> {
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|mount| {
            let at = mount["mountPath"].as_str().unwrap().trim_end_matches('/');
            path.strip_prefix(at)
                .is_some_and(|rest| rest.starts_with('/'))
        })
        .unwrap_or_else(|| panic!("{}: nothing is mounted at {path}", doc.file));
    let at = mount["mountPath"].as_str().unwrap().trim_end_matches('/');
    let key = &path[at.len() + 1..];
    let volume_name = mount["name"].as_str().unwrap();
    let volume = pod_spec(doc)
        .and_then(|pod| pod["volumes"].as_array())
        .into_iter()
        .flatten()
        .find(|v| v["name"] == volume_name)
        .unwrap_or_else(|| panic!("{}: no volume {volume_name}", doc.file));
    let config_map = volume.pointer("/configMap/name")?.as_str().unwrap();
    let shipped = m.named("ConfigMap", config_map)?;
    Some(data_value(shipped, key).unwrap_or_else(|| {
        panic!(
            "{}: {path} is key {key} of ConfigMap {config_map}, which it lacks",
            doc.file
        )
    }))
}

/// `idmap serve` with `flags` and no environment: a variable of the machine running the test
/// must not stand in for one the manifests lack.
fn parse_serve(flags: &BTreeMap<String, String>) -> Result<idmap::config::ServeArgs, clap::Error> {
    fn without_env(command: clap::Command) -> clap::Command {
        command
            .mut_args(|arg| arg.env(None::<&'static str>))
            .mut_subcommands(without_env)
    }
    let args = ["idmap".to_owned(), "serve".to_owned()].into_iter().chain(
        flags
            .iter()
            .map(|(long, value)| format!("--{long}={value}")),
    );
    let matches = without_env(idmap::cmd::Cli::command()).try_get_matches_from(args)?;
    match idmap::cmd::Cli::from_arg_matches(&matches)?.command {
        idmap::cmd::Command::Serve(args) => Ok(*args),
        other => panic!("parsed as {other:?}"),
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("kubernetes-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_deployments_settings_pass_idmaps_start_up_checks() {
    let m = Manifests::load();
    let dir = scratch_dir("settings");
    let args = parse_serve(&serve_flags(&m, &dir)).unwrap_or_else(|e| panic!("{e}"));
    let config = idmap::Config::from_serve_args(args).unwrap_or_else(|e| panic!("{e}"));
    // The callers file from the ConfigMap, through the parser `serve` uses before binding a port.
    assert!(config.callers.callers_file.is_some() || config.callers.allow_any_caller);
    idmap::auth::CallerPolicy::from_settings(&config.callers).unwrap_or_else(|e| panic!("{e}"));
    // A trusted caller header is safe only when every request comes through the sidecar that sets it.
    let pod = m.one("Deployment").at("/spec/template/metadata");
    match config.callers.trusted_header {
        Some(idmap::config::TrustedHeader::XForwardedClientCert) => assert_eq!(
            pod["labels"]["sidecar.istio.io/inject"], "true",
            "x-forwarded-client-cert is trusted, so the pod must get Istio's sidecar"
        ),
        Some(idmap::config::TrustedHeader::L5dClientId) => assert_eq!(
            pod["annotations"]["linkerd.io/inject"], "enabled",
            "l5d-client-id is trusted, so the pod must get Linkerd's proxy"
        ),
        None => {}
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_example_secret_is_refused_until_edited() {
    // Applied as it is, the example must stop start-up rather than run with a published secret.
    let m = Manifests::load();
    let dir = scratch_dir("placeholders");
    let good = serve_flags(&m, &dir);
    parse_serve(&good).unwrap_or_else(|e| panic!("{e}"));
    let serve = settings_of("serve");
    let secret = m.one("Secret");
    for key in data_keys(secret) {
        let mut flags = good.clone();
        flags.insert(serve[&key].long.clone(), data_value(secret, &key).unwrap());
        assert!(
            parse_serve(&flags).is_err(),
            "{}: idmap accepts the placeholder of {key}",
            secret.file
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A port of the container by name or number (`targetPort`, a NetworkPolicy's `port`).
fn container_port(container: &Value, port: &Value) -> Option<u64> {
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| match port {
            Value::String(name) => p["name"] == *name,
            number => p["containerPort"] == *number,
        })
        .and_then(|p| p["containerPort"].as_u64())
}

fn matches_labels(selector: &Value, labels: &Value) -> bool {
    let wanted = selector.as_object().unwrap();
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels[k] == *v)
}

#[test]
fn ports_probes_and_selectors_agree_with_idmap() {
    let m = Manifests::load();
    let deployment = m.one("Deployment");
    let container = the_container(deployment);
    let env = resolved_env(&m, deployment, container);
    let serve = settings_of("serve");
    let listen_port = |setting: &str| -> u64 {
        let addr = env
            .get(setting)
            .map(|(_, value)| value.clone())
            .or_else(|| serve[setting].default.clone())
            .unwrap();
        u64::from(addr.parse::<SocketAddr>().unwrap().port())
    };
    let grpc = listen_port(idmap::config::ENV_GRPC_ADDR);
    let http = listen_port(idmap::config::ENV_HTTP_ADDR);
    assert_eq!(container_port(container, &"grpc".into()), Some(grpc));
    assert_eq!(container_port(container, &"http".into()), Some(http));

    for name in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let probe = &container[name];
        let port = probe
            .pointer("/grpc/port")
            .unwrap_or_else(|| panic!("{}: {name} is not a gRPC probe", deployment.file));
        assert_eq!(port.as_u64(), Some(grpc), "{}: {name}", deployment.file);
        let service = probe.pointer("/grpc/service").and_then(Value::as_str);
        assert!(
            matches!(service, None | Some("")) || service == Some(idmap::app::SERVICE_NAME),
            "{}: idmap's health service reports \"\" and {}, not {service:?}",
            deployment.file,
            idmap::app::SERVICE_NAME
        );
    }
    assert_eq!(
        container.pointer("/readinessProbe/grpc/service"),
        Some(&Value::from(idmap::app::SERVICE_NAME))
    );

    // The pause before SIGTERM, then idmap's own drain, must fit before the kubelet's SIGKILL.
    let grace = env
        .get("IDMAP_SHUTDOWN_GRACE")
        .map(|(_, v)| v.clone())
        .or_else(|| serve["IDMAP_SHUTDOWN_GRACE"].default.clone())
        .unwrap();
    let grace = idmap::config::parse_duration(&grace).unwrap().as_secs();
    let pause = container
        .pointer("/lifecycle/preStop/sleep/seconds")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let termination = deployment
        .at("/spec/template/spec/terminationGracePeriodSeconds")
        .as_u64()
        .unwrap();
    assert!(
        termination > pause + grace,
        "terminationGracePeriodSeconds {termination} leaves no room for a {pause}s pause and a {grace}s drain"
    );

    let pod_labels = deployment.at("/spec/template/metadata/labels");
    assert!(matches_labels(
        deployment.at("/spec/selector/matchLabels"),
        pod_labels
    ));

    let service = m.one("Service");
    assert!(matches_labels(service.at("/spec/selector"), pod_labels));
    let mut protocols = BTreeMap::new();
    for port in service.at("/spec/ports").as_array().unwrap() {
        let target = container_port(container, &port["targetPort"]).unwrap_or_else(|| {
            panic!(
                "{}: targetPort {} is no port of the container",
                service.file, port["targetPort"]
            )
        });
        protocols.insert(target, port["appProtocol"].as_str().unwrap_or_default());
    }
    assert_eq!(protocols.get(&grpc), Some(&"grpc"), "{}", service.file);
    assert_eq!(protocols.get(&http), Some(&"http"), "{}", service.file);

    let policy = m.one("NetworkPolicy");
    assert!(matches_labels(
        policy.at("/spec/podSelector/matchLabels"),
        pod_labels
    ));
    let mut admitted = BTreeSet::new();
    for rule in policy.at("/spec/ingress").as_array().unwrap() {
        assert!(
            !rule["from"].as_array().unwrap().is_empty(),
            "{}: a rule admitting everyone",
            policy.file
        );
        for port in rule["ports"].as_array().unwrap() {
            admitted.insert(container_port(container, &port["port"]).unwrap_or_else(|| {
                panic!(
                    "{}: port {} is no port of the container",
                    policy.file, port["port"]
                )
            }));
        }
    }
    assert_eq!(admitted, BTreeSet::from([grpc, http]), "{}", policy.file);

    let budget = m.one("PodDisruptionBudget");
    assert!(
        matches_labels(budget.at("/spec/selector/matchLabels"), pod_labels),
        "{}",
        budget.file
    );
    let hpa = m.one("HorizontalPodAutoscaler");
    assert_eq!(hpa.at("/spec/scaleTargetRef/kind"), "Deployment");
    assert_eq!(hpa.at("/spec/scaleTargetRef/name"), deployment.name());
    assert!(
        deployment.value.pointer("/spec/replicas").is_none(),
        "the HorizontalPodAutoscaler owns the replica count; re-applying the Deployment would reset it"
    );

    let monitor = m.one("ServiceMonitor");
    assert!(matches_labels(
        monitor.at("/spec/selector/matchLabels"),
        service.at("/metadata/labels")
    ));
    for endpoint in monitor.at("/spec/endpoints").as_array().unwrap() {
        let port = service
            .at("/spec/ports")
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == endpoint["port"])
            .unwrap_or_else(|| panic!("{}: no Service port {}", monitor.file, endpoint["port"]));
        assert_eq!(container_port(container, &port["targetPort"]), Some(http));
        assert_eq!(endpoint["path"], "/metrics");
    }
}

#[test]
fn workloads_run_real_subcommands_locked_down() {
    let m = Manifests::load();
    let dockerfile = Dockerfile::load();
    let mut images = BTreeSet::new();
    let mut ran = BTreeMap::new();
    for doc in m.workloads() {
        let pod = pod_spec(doc).unwrap();
        assert_eq!(
            pod["enableServiceLinks"], false,
            "{}: Kubernetes would set IDMAP_* variables of its own",
            doc.file
        );
        assert_eq!(pod["automountServiceAccountToken"], false, "{}", doc.file);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", doc.file);
        assert_eq!(
            pod.pointer("/securityContext/seccompProfile/type"),
            Some(&Value::from("RuntimeDefault")),
            "{}",
            doc.file
        );
        assert_eq!(
            pod.pointer("/securityContext/runAsUser")
                .and_then(Value::as_u64),
            Some(dockerfile.uid),
            "{}: the image's USER",
            doc.file
        );
        for container in containers(doc) {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], true, "{}", doc.file);
            assert_eq!(security["allowPrivilegeEscalation"], false, "{}", doc.file);
            assert_eq!(
                security.pointer("/capabilities/drop"),
                Some(&Value::from(vec!["ALL"])),
                "{}",
                doc.file
            );
            assert!(
                container.pointer("/resources/requests").is_some(),
                "{}",
                doc.file
            );
            assert!(
                container.pointer("/resources/limits/memory").is_some(),
                "{}",
                doc.file
            );
            // Files a setting names (IDMAP_CALLERS, IDMAP_TLS_*, DATABASE_URL's sslrootcert)
            // must be mounted, or start-up stops.
            for (_, value) in resolved_env(&m, doc, container).values() {
                let paths = value
                    .split(['?', '&'])
                    .filter_map(|part| part.strip_prefix("sslrootcert="))
                    .chain(value.starts_with('/').then_some(value.as_str()));
                for path in paths {
                    mounted_file(&m, doc, container, path);
                }
            }
            images.insert(container["image"].as_str().unwrap().to_owned());
            ran.insert(
                doc.kind().to_owned(),
                subcommand_of(doc, container, &dockerfile),
            );
        }
    }
    assert_eq!(
        images.len(),
        1,
        "the Deployment and the Job run one image: {images:?}"
    );
    assert_eq!(ran["Deployment"], "serve");
    assert_eq!(ran["Job"], "migrate");
    let job = m.one("Job");
    assert!(matches!(
        job.at("/spec/template/spec/restartPolicy").as_str(),
        Some("Never" | "OnFailure")
    ));
}

/// What the Dockerfile says, instruction by instruction.
struct Dockerfile {
    /// (image, stage name) of each FROM.
    stages: Vec<(String, Option<String>)>,
    runs: Vec<String>,
    copies: Vec<String>,
    expose: BTreeSet<u64>,
    uid: u64,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

impl Dockerfile {
    fn load() -> Self {
        let text = read(&repo().join("Dockerfile"));
        let mut instructions = Vec::new();
        let mut pending = String::new();
        for line in text.lines() {
            let line = line.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with('#')) {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(continued) => {
                    pending.push_str(continued);
                    pending.push(' ');
                }
                None => {
                    pending.push_str(line);
                    instructions.push(std::mem::take(&mut pending));
                }
            }
        }
        let mut file = Dockerfile {
            stages: Vec::new(),
            runs: Vec::new(),
            copies: Vec::new(),
            expose: BTreeSet::new(),
            uid: 0,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
        };
        let exec_form = |rest: &str| -> Vec<String> {
            serde_json::from_str(rest)
                .unwrap_or_else(|e| panic!("Dockerfile: `{rest}` is not the exec (JSON) form: {e}"))
        };
        for instruction in instructions {
            let (keyword, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
            let rest = rest.trim();
            match keyword.to_ascii_uppercase().as_str() {
                "FROM" => {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    let name = match words.as_slice() {
                        [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                        _ => None,
                    };
                    file.stages.push((words[0].to_owned(), name));
                }
                "RUN" => file.runs.push(rest.to_owned()),
                "COPY" => file.copies.push(rest.to_owned()),
                "EXPOSE" => file.expose.extend(
                    rest.split_whitespace()
                        .map(|p| p.trim_end_matches("/tcp").parse::<u64>().unwrap()),
                ),
                "USER" => {
                    let user = rest.split(':').next().unwrap();
                    file.uid = user.parse().unwrap_or_else(|_| {
                        panic!("Dockerfile: USER {rest} is not numeric, so runAsNonRoot cannot check it")
                    });
                }
                "ENTRYPOINT" => file.entrypoint = exec_form(rest),
                "CMD" => file.cmd = exec_form(rest),
                _ => {}
            }
        }
        file
    }
}

/// `1.95`, `1.95.0` or `1.95-bookworm` as (major, minor, patch).
fn rust_version(text: &str) -> (u64, u64, u64) {
    let numeric: String = text
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = numeric.split('.').map(|p| p.parse::<u64>().unwrap());
    let version = (
        parts.next().unwrap(),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    assert!(version.0 >= 1, "not a Rust version: {text}");
    version
}

#[test]
fn the_dockerfile_builds_the_production_binary() {
    let cargo: toml::Table = toml::from_str(&read(&repo().join("Cargo.toml"))).unwrap();
    let package = cargo["package"].as_table().unwrap();
    let package_name = package["name"].as_str().unwrap();
    let bins = cargo["bin"].as_array().unwrap();
    assert_eq!(bins.len(), 1);
    let bin = bins[0]["name"].as_str().unwrap();
    let file = Dockerfile::load();

    let (builder_image, builder) = &file.stages[0];
    let tag = builder_image
        .strip_prefix("rust:")
        .unwrap_or_else(|| panic!("the builder is {builder_image}, not a rust: image"));
    let builder_rust = rust_version(tag);
    // The edition's own minimum, and the workspace's rust-version when it states one.
    let edition_minimum = match package["edition"].as_str().unwrap() {
        "2024" => (1, 85, 0),
        "2021" => (1, 56, 0),
        other => panic!("edition {other}: add its minimum Rust here"),
    };
    assert!(
        builder_rust >= edition_minimum,
        "{builder_image} is older than edition {:?}",
        package["edition"]
    );
    let rust_version_field = package
        .get("rust-version")
        .or_else(|| cargo.get("workspace")?.get("package")?.get("rust-version"));
    if let Some(required) = rust_version_field {
        assert!(
            builder_rust >= rust_version(required.as_str().unwrap()),
            "{builder_image} is older than rust-version {required:?}"
        );
    }
    // `--locked` builds exactly the dependencies in Cargo.lock, so the oldest Rust the build can
    // use is the newest any of them asks for (dev-dependencies included: a superset, and cheap).
    // This platform's only, which are what a build here has downloaded.
    let metadata = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version=1",
            "--locked",
            "--offline",
            "--filter-platform=host-tuple",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let (needed, by) = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                rust_version(p["rust_version"].as_str()?),
                p["name"].as_str()?,
            ))
        })
        .max()
        .unwrap();
    assert!(
        builder_rust >= needed,
        "{builder_image} is older than Rust {needed:?}, which the locked {by} needs"
    );

    let build = file
        .runs
        .iter()
        .find(|run| run.contains("cargo build"))
        .expect("the Dockerfile runs cargo build");
    let words: Vec<&str> = build.split_whitespace().collect();
    for flag in ["--release", "--locked", "--no-default-features"] {
        assert!(words.contains(&flag), "cargo build without {flag}: {build}");
    }
    assert!(
        words.windows(2).any(|w| w == ["-p", package_name])
            || words.contains(&format!("--package={package_name}").as_str()),
        "cargo build does not name the package {package_name}: {build}"
    );
    assert!(
        !words
            .iter()
            .any(|w| w.starts_with("--features") || *w == "-F" || *w == "--all-features"),
        "the production build turns no feature on: {build}"
    );
    assert!(
        build.contains(&format!("target/release/{bin}")),
        "the build step does not take the {bin} binary: {build}"
    );

    let installed = format!("/usr/local/bin/{bin}");
    let (runtime, _) = file.stages.last().unwrap();
    assert!(
        file.copies.iter().any(|c| c
            .starts_with(&format!("--from={}", builder.as_deref().unwrap_or("0")))
            && c.ends_with(&installed)),
        "the runtime stage does not copy the binary from the builder to {installed}"
    );
    // This test binary links like the release one; a glibc binary needs a base that has glibc.
    if cfg!(target_env = "gnu") {
        assert!(
            runtime != "scratch" && !runtime.contains("distroless/static"),
            "{runtime} has no glibc, which {bin} links dynamically"
        );
    }
    assert_eq!(file.entrypoint, [installed]);
    assert!(
        file.cmd
            .first()
            .is_some_and(|c| production_subcommands().contains(c)),
        "CMD {:?} is not a subcommand of the production binary",
        file.cmd
    );
    assert_ne!(file.uid, 0, "the image runs as root");

    let serve = settings_of("serve");
    let default_port = |setting: &str| -> u64 {
        let addr = serve[setting].default.clone().unwrap();
        u64::from(addr.parse::<SocketAddr>().unwrap().port())
    };
    assert_eq!(
        file.expose,
        BTreeSet::from([
            default_port(idmap::config::ENV_GRPC_ADDR),
            default_port(idmap::config::ENV_HTTP_ADDR)
        ]),
        "EXPOSE and idmap's default listen ports"
    );

    let ignored: Vec<String> = read(&repo().join(".dockerignore"))
        .lines()
        .map(|l| l.trim().trim_matches('/').to_owned())
        .collect();
    for dir in ["target", ".git"] {
        assert!(
            ignored.iter().any(|l| l == dir),
            ".dockerignore does not leave out {dir}/"
        );
    }
}
