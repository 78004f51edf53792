//! The module map of `docs/architecture.md`, held to the code: which top-level module of `src/`
//! may import which, and which outside crates stay out of the inner layers. A `use` that breaks the
//! map fails here, naming the file, instead of growing an import circle unnoticed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What each top-level module may import from the crate (`crate::<module>`), as
/// `docs/architecture.md` draws it. Modules not listed are leaves used by anyone (`proto`,
/// `shutdown`, `telemetry`, `tls`) or the binary's wiring (`lib.rs`, `main.rs`).
const MAY_IMPORT: &[(&str, &[&str])] = &[
    ("config", &["domain"]),
    ("auth", &["config"]),
    ("domain", &[]),
    ("assertion", &[]),
    ("store", &["config", "domain", "metrics", "tls"]),
    ("ory", &["config", "domain", "metrics", "telemetry", "tls"]),
    ("cache", &["config", "domain", "metrics", "store"]),
    ("error", &["config", "domain", "ory", "store"]),
    (
        "service",
        &[
            "assertion",
            "cache",
            "config",
            "domain",
            "error",
            "metrics",
            "ory",
            "store",
        ],
    ),
    ("jobs", &["domain", "error", "ory", "service", "store"]),
    ("gateway", &["config", "domain", "error", "service"]),
    ("worker", &["cache", "config", "domain", "ory", "store"]),
    (
        "grpc",
        &[
            "auth",
            "config",
            "domain",
            "error",
            "gateway",
            "metrics",
            "proto",
            "service",
            "telemetry",
            "tls",
        ],
    ),
    (
        "http",
        &[
            "auth",
            "config",
            "domain",
            "error",
            "gateway",
            "metrics",
            "ory",
            "service",
            "store",
            "telemetry",
            "tls",
        ],
    ),
    (
        "app",
        &[
            "assertion",
            "auth",
            "cache",
            "config",
            "gateway",
            "grpc",
            "http",
            "jobs",
            "ory",
            "proto",
            "service",
            "store",
            "tls",
            "worker",
        ],
    ),
    (
        "cmd",
        &[
            "app",
            "auth",
            "config",
            "error",
            "jobs",
            "shutdown",
            "store",
            "telemetry",
        ],
    ),
];

/// Crates whose types belong to one edge each, and the modules allowed to name them.
const EDGE_CRATES: &[(&str, &[&str])] = &[
    ("tonic", &["grpc", "app", "proto"]),
    ("prost", &["grpc", "proto"]),
    ("diesel", &["store"]),
    ("diesel_async", &["store"]),
    ("tokio_postgres", &["store"]),
    ("reqwest", &["ory"]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source of `file` without its `#[cfg(test)] mod tests` (tests may reach anywhere) and
/// without comments.
fn production_code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .map(|line| match line.trim_start().starts_with("//") {
            true => "",
            false => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `<prefix>::<name>` path start in `code`.
fn paths_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let needle = format!("{prefix}::");
    let mut rest = code;
    while let Some(at) = rest.find(&needle) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + needle.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

#[test]
fn modules_import_only_what_the_architecture_allows() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, BTreeSet<&str>> = MAY_IMPORT
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let module = top_module(&src, file);
        let Some(may) = allowed.get(module.as_str()) else {
            continue;
        };
        let code = production_code(file);
        for imported in paths_after(&code, "crate") {
            if imported != module && !may.contains(imported.as_str()) {
                broken.push(format!(
                    "{}: {module} imports crate::{imported}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
        for (krate, owners) in EDGE_CRATES {
            let named =
                code.contains(&format!("use {krate}::")) || !paths_after(&code, krate).is_empty();
            if named && !owners.contains(&module.as_str()) {
                broken.push(format!(
                    "{}: {module} names {krate}, which belongs to {owners:?}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports that break docs/architecture.md:\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_place_on_the_map() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mapped: BTreeSet<&str> = MAY_IMPORT.iter().map(|(m, _)| *m).collect();
    let leaves = [
        "metrics",
        "proto",
        "shutdown",
        "telemetry",
        "tls",
        "lib",
        "main",
    ];
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in &files {
        let module = top_module(&src, file);
        assert!(
            mapped.contains(module.as_str()) || leaves.contains(&module.as_str()),
            "src/{module} is on neither the map nor the list of leaves; add it to docs/architecture.md and here"
        );
    }
}
