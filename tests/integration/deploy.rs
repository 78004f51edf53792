//! The Kratos configuration snippets in `deploy/ory/`, checked against Kratos's configuration schema
//! (`spec/ory/kratos-config.schema.json`, Kratos's own) the way an operator uses them: merged into a
//! minimal `kratos.yml`. Kratos refuses to start on a configuration its schema rejects, so a
//! snippet that fails here would break the deployment that follows the README.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Value, json};

/// `deploy/ory/` of this repository.
fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/ory")
}

/// A file of the vendored Ory material (`spec/ory/README.md`).
fn spec_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("spec/ory")
        .join(name)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn schema() -> Value {
    serde_json::from_str(&read(&spec_file("kratos-config.schema.json"))).unwrap()
}

/// Kratos resolves `ory://` references from schemas compiled into it; the only one, the tracing
/// configuration, is not what the snippets are about, so it stands in as "anything".
struct OrySchemas;

impl jsonschema::Retrieve for OrySchemas {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        match uri.as_str() {
            "ory://tracing-config" => Ok(json!({})),
            other => Err(format!("no schema known for {other}").into()),
        }
    }
}

fn validator() -> jsonschema::Validator {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft7)
        .should_validate_formats(true)
        .with_retriever(OrySchemas)
        .build(&schema())
        .expect("Kratos's configuration schema compiles")
}

/// What Kratos requires besides the snippet: a database, an identity schema, a return URL.
fn base_config() -> Value {
    json!({
        "dsn": "memory",
        "identity": {
            "default_schema_id": "customer",
            "schemas": [{ "id": "customer", "url": "file:///etc/config/kratos/customer.schema.json" }]
        },
        "selfservice": { "default_browser_return_url": "https://app.example.com/" }
    })
}

/// `snippet` merged into `base` as an operator merges YAML: objects key by key, anything else
/// replaced.
fn merge(base: &mut Value, snippet: &Value) {
    match (base, snippet) {
        (Value::Object(base), Value::Object(snippet)) => {
            for (key, value) in snippet {
                merge(base.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (base, snippet) => *base = snippet.clone(),
    }
}

/// Every snippet, parsed (YAML aliases resolved, as Kratos's loader resolves them).
fn snippets() -> Vec<(String, Value)> {
    let mut found: Vec<(String, Value)> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let value: Value = serde_norway::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{name} is not YAML: {e}"));
            (name, value)
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The schema's complaints about `snippet` merged into the base configuration.
fn errors(validator: &jsonschema::Validator, snippet: &Value) -> Vec<String> {
    let mut config = base_config();
    merge(&mut config, snippet);
    validator
        .iter_errors(&config)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

#[test]
fn every_deploy_snippet_is_valid_kratos_configuration() {
    let validator = validator();
    assert_eq!(
        errors(&validator, &json!({})),
        Vec::<String>::new(),
        "the base configuration alone must pass, or the snippets are not what is tested"
    );
    let snippets = snippets();
    let names: Vec<&str> = snippets.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "kratos.post-persist.api-key.yaml",
            "kratos.post-persist.basic-auth.yaml",
            "kratos.pre-persist.api-key.yaml",
            "kratos.pre-persist.basic-auth.yaml",
        ]
    );
    for (name, snippet) in &snippets {
        assert_eq!(errors(&validator, snippet), Vec::<String>::new(), "{name}");
    }
}

/// The method keys the schema allows under a flow's `after` (its `hooks` is the fallback list).
fn schema_methods(definition: &str) -> Vec<String> {
    let mut methods: Vec<String> = schema()["definitions"][definition]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "default_browser_return_url")
        .cloned()
        .collect();
    methods.sort();
    methods
}

fn keys(object: &Value) -> Vec<String> {
    let mut keys: Vec<String> = object.as_object().unwrap().keys().cloned().collect();
    keys.sort();
    keys
}

/// (url path, `response.parse`) of each web hook, or `session`, in order.
fn hook_list(hooks: &Value) -> Vec<(String, bool)> {
    hooks
        .as_array()
        .unwrap()
        .iter()
        .map(|hook| match hook["hook"].as_str().unwrap() {
            "web_hook" => {
                let config = &hook["config"];
                let url = url::Url::parse(config["url"].as_str().unwrap()).unwrap();
                let parse = config["response"]["parse"].as_bool().unwrap_or(false);
                (url.path().to_owned(), parse)
            }
            other => (other.to_owned(), false),
        })
        .collect()
}

#[test]
fn deploy_snippets_hook_every_method_kratos_knows() {
    // Kratos runs a method's own list and the flow's `hooks` only for a method without one, and
    // parse:true hooks only from a method's list: a method left out would register people
    // without idmap hearing of it.
    let registration_methods = schema_methods("selfServiceAfterRegistration");
    let settings_methods = schema_methods("selfServiceAfterSettings");
    assert!(registration_methods.len() >= 6, "{registration_methods:?}");
    let registration = "/hooks/ory/registration".to_owned();
    let pre_persist = "/hooks/ory/registration/pre-persist".to_owned();
    let settings = "/hooks/ory/settings".to_owned();
    for (name, snippet) in snippets() {
        let flows = &snippet["selfservice"]["flows"];
        let after = &flows["registration"]["after"];
        assert_eq!(keys(after), registration_methods, "{name}");
        let mut method_list = vec![(registration.clone(), false), ("session".into(), false)];
        if name.contains("pre-persist") {
            method_list.insert(0, (pre_persist.clone(), true));
        }
        for method in &registration_methods {
            let hooks = if method == "hooks" {
                &after["hooks"]
            } else {
                &after[method]["hooks"]
            };
            let expected = if method == "hooks" {
                // The fallback list may hold only web hooks, and parse:true ones never run there.
                vec![(registration.clone(), false)]
            } else {
                method_list.clone()
            };
            assert_eq!(
                hook_list(hooks),
                expected,
                "{name}: registration.after.{method}"
            );
        }
        let after = &flows["settings"]["after"];
        assert_eq!(keys(after), settings_methods, "{name}");
        for method in &settings_methods {
            let hooks = if method == "hooks" {
                &after["hooks"]
            } else {
                &after[method]["hooks"]
            };
            assert_eq!(
                hook_list(hooks),
                vec![(settings.clone(), false)],
                "{name}: settings.after.{method}"
            );
        }
    }
}

#[test]
fn deploy_snippets_inline_the_shipped_jsonnet() {
    let jsonnet = read(&deploy_dir().join("idmap-identity.jsonnet"));
    for (name, snippet) in snippets() {
        let text = snippet.to_string();
        let bodies: Vec<&str> = text
            .split("\"body\":\"")
            .skip(1)
            .map(|rest| &rest[..rest.find('"').unwrap()])
            .collect();
        assert!(!bodies.is_empty(), "{name}");
        for body in bodies {
            let encoded = body.strip_prefix("base64://").unwrap();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .unwrap();
            assert_eq!(
                String::from_utf8(decoded).unwrap().trim(),
                jsonnet.trim(),
                "{name}"
            );
        }
    }
}

/// Sets the value at `path` (object keys and array indexes) in a copy of `value`.
fn with(value: &Value, path: &[&str], new: Value) -> Value {
    let mut copy = value.clone();
    let mut at = &mut copy;
    for key in path {
        at = match at {
            Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
            Value::Object(map) => map.entry(key.to_string()).or_insert(Value::Null),
            other => panic!("cannot descend into {other}"),
        };
    }
    *at = new;
    copy
}

fn without(value: &Value, path: &[&str], key: &str) -> Value {
    let mut copy = value.clone();
    let mut at = &mut copy;
    for step in path {
        at = match at {
            Value::Array(items) => &mut items[step.parse::<usize>().unwrap()],
            Value::Object(map) => map.get_mut(*step).unwrap(),
            other => panic!("cannot descend into {other}"),
        };
    }
    at.as_object_mut().unwrap().remove(key);
    copy
}

#[test]
fn the_schema_test_catches_a_broken_snippet() {
    // If these passed, the test above would prove nothing.
    let validator = validator();
    let (_, snippet) = snippets()
        .into_iter()
        .find(|(name, _)| name == "kratos.pre-persist.api-key.yaml")
        .unwrap();
    let hook = [
        "selfservice",
        "flows",
        "registration",
        "after",
        "password",
        "hooks",
        "0",
    ];
    let config = |rest: &[&'static str]| -> Vec<&'static str> {
        let mut path: Vec<&'static str> = hook.to_vec();
        path.push("config");
        path.extend_from_slice(rest);
        path
    };
    let broken: Vec<(&str, Value)> = vec![
        (
            "parse is not a boolean",
            with(&snippet, &config(&["response", "parse"]), json!("yes")),
        ),
        (
            "ignore and parse together",
            with(&snippet, &config(&["response", "ignore"]), json!(true)),
        ),
        ("no url", without(&snippet, &config(&[]), "url")),
        (
            "api_key auth without `in`",
            without(&snippet, &config(&["auth", "config"]), "in"),
        ),
        (
            "an unknown auth type",
            with(&snippet, &config(&["auth", "type"]), json!("bearer")),
        ),
        (
            "a method Kratos does not have",
            with(
                &snippet,
                &["selfservice", "flows", "registration", "after", "sms"],
                json!({ "hooks": [] }),
            ),
        ),
        (
            "`session` in the flow's fallback list",
            with(
                &snippet,
                &["selfservice", "flows", "registration", "after", "hooks"],
                json!([{ "hook": "session" }]),
            ),
        ),
        (
            "a misspelt key",
            with(&snippet, &config(&["methd"]), json!("POST")),
        ),
    ];
    for (what, config) in broken {
        assert!(
            !errors(&validator, &config).is_empty(),
            "a snippet with {what} passed the schema"
        );
    }
}
