//! Who may call which RPC: the callers file (`IDMAP_CALLERS`), the evidence a request carries of
//! its caller (an API key, a SPIFFE id or DNS name from a certificate or a trusted mesh header),
//! and the decision. No transport here: `grpc/auth.rs` reads the evidence off a request and turns a
//! refusal into a status.
//!
//! Keys are never kept: the file holds their SHA-256, and a presented key is hashed at once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{CallerSettings, ConfigError, ENV_CALLERS};

/// The RPCs a caller can be granted, by their proto names: `idmap.v1.IdentityService`'s, and
/// `Check` of Envoy's ext_authz (`envoy.service.auth.v3.Authorization`), which gateways call.
pub const RPCS: [&str; 10] = [
    "ResolveSession",
    "GetUserByOryId",
    "GetByExternalId",
    "LinkIdentity",
    "BatchGetUsers",
    "InvalidateSession",
    "SetExternalId",
    "RemoveExternalId",
    "BatchGetByExternalIds",
    "Check",
];

/// The HTTP gateway routes a caller can be granted, by their paths: the forward-auth route
/// and Oathkeeper's hydrator. Their callers present a key in [`GATEWAY_KEY_HEADER`], since the
/// request's own `Authorization` header is the end user's.
pub const GATEWAY_ROUTES: [&str; 2] = ["/gateway/auth", "/gateway/oathkeeper/hydrate"];

/// The header an HTTP gateway caller sends its API key in (the raw key, as in `Bearer <key>`).
pub const GATEWAY_KEY_HEADER: &str = "x-idmap-api-key";

/// An identified caller, as logs and metrics name it. Never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: Arc<str>,
}

/// What a request shows of its caller.
#[derive(Debug, Clone, Default)]
pub struct Evidence<'a> {
    /// The bearer key of `Authorization: Bearer <key>`.
    pub api_key: Option<&'a str>,
    /// URI SANs (SPIFFE ids) of a verified client certificate, or the `URI=` of a trusted mesh
    /// header.
    pub spiffe_ids: Vec<String>,
    /// DNS SANs of a verified client certificate, or the identity of a trusted mesh header
    /// (Linkerd's `l5d-client-id`).
    pub dns_names: Vec<String>,
    /// The subject of a verified client certificate, for the log when it names no caller.
    pub certificate_subject: Option<&'a str>,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No accepted identity: CALLER_UNAUTHENTICATED. `shown` says what was presented (a SPIFFE
    /// id, a DNS name, or that a key was), for the log; never the key.
    Unauthenticated { shown: String },
    /// An identified caller without the grant: CALLER_NOT_ALLOWED.
    NotAllowed { caller: Caller, rpc: String },
}

/// What a call asks for, as far as authorization is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Health checks: anyone, identified or not (probes carry no credentials).
    Open,
    /// Server reflection: any identified caller.
    Identified,
    /// An RPC of the identity service, by its proto name.
    Rpc(&'a str),
}

/// The authorization in force.
#[derive(Debug)]
pub enum CallerPolicy {
    /// `IDMAP_ALLOW_ANY_CALLER=true` (and `idmap dev`): every call is allowed, unidentified.
    AnyCaller,
    /// The callers file.
    Callers(Callers),
}

impl CallerPolicy {
    /// The policy the settings ask for; the callers file is read and checked here.
    pub fn from_settings(settings: &CallerSettings) -> Result<Self, ConfigError> {
        match (&settings.callers_file, settings.allow_any_caller) {
            (Some(path), _) => Ok(Self::Callers(Callers::load(path)?)),
            (None, true) => Ok(Self::AnyCaller),
            (None, false) => Err(ConfigError::Conflict {
                setting: ENV_CALLERS,
                requirement: "is not set: name a callers file, or set IDMAP_ALLOW_ANY_CALLER=true to let anything that reaches the port call every RPC",
            }),
        }
    }

    /// The names of the callers the file lists (none when any caller is allowed).
    pub fn caller_names(&self) -> Vec<Arc<str>> {
        match self {
            Self::AnyCaller => Vec::new(),
            Self::Callers(callers) => callers.entries.iter().map(|e| e.name.clone()).collect(),
        }
    }

    /// Decides a call. `Ok(None)`: allowed without an identity (open access, or any caller).
    /// The evidence is read only when the decision needs it: not for health checks, and not when
    /// any caller is allowed.
    pub fn authorize<'e>(
        &self,
        access: Access<'_>,
        evidence: impl FnOnce() -> Evidence<'e>,
    ) -> Result<Option<Caller>, Denied> {
        let callers = match self {
            Self::AnyCaller => return Ok(None),
            Self::Callers(callers) => callers,
        };
        if access == Access::Open {
            return Ok(None);
        }
        let evidence = evidence();
        let Some(entry) = callers.identify(&evidence) else {
            return Err(Denied::Unauthenticated {
                shown: shown(&evidence),
            });
        };
        let caller = Caller {
            name: entry.name.clone(),
        };
        match access {
            Access::Open | Access::Identified => Ok(Some(caller)),
            Access::Rpc(rpc) if entry.allows(rpc) => Ok(Some(caller)),
            Access::Rpc(rpc) => Err(Denied::NotAllowed {
                caller,
                rpc: rpc.to_owned(),
            }),
        }
    }
}

/// What a refused request presented, for the log: identities as they are, a key only as "a key".
fn shown(evidence: &Evidence<'_>) -> String {
    let mut parts: Vec<String> = Vec::new();
    parts.extend(evidence.spiffe_ids.iter().map(|id| format!("uri {id}")));
    parts.extend(evidence.dns_names.iter().map(|name| format!("dns {name}")));
    if let Some(subject) = evidence.certificate_subject {
        parts.push(format!("a certificate for {subject:?}"));
    }
    if evidence.api_key.is_some() {
        parts.push("an unknown API key".to_owned());
    }
    if parts.is_empty() {
        "no credentials".to_owned()
    } else {
        parts.join(", ")
    }
}

/// One caller of the callers file.
#[derive(Debug)]
struct CallerEntry {
    name: Arc<str>,
    /// `None`: every RPC (`"*"`).
    rpcs: Option<Vec<&'static str>>,
}

impl CallerEntry {
    fn allows(&self, rpc: &str) -> bool {
        self.rpcs.as_ref().is_none_or(|rpcs| rpcs.contains(&rpc))
    }
}

/// The callers file, indexed by each kind of evidence.
#[derive(Debug)]
pub struct Callers {
    entries: Vec<CallerEntry>,
    by_key: HashMap<[u8; 32], usize>,
    by_spiffe_id: HashMap<String, usize>,
    by_dns_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallersToml {
    callers: Vec<CallerToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerToml {
    name: String,
    #[serde(default)]
    spiffe_ids: Vec<String>,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default)]
    api_key_sha256: Vec<String>,
    rpcs: Vec<String>,
}

impl Callers {
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::CallersFile {
            path: path.display().to_string(),
            line: None,
            problem: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text).map_err(|(line, problem)| ConfigError::CallersFile {
            path: path.display().to_string(),
            line,
            problem,
        })
    }

    /// Parses a callers file; a failure says on which line, where it can.
    fn parse(text: &str) -> Result<Self, (Option<usize>, String)> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let file: CallersToml = toml::from_str(text)
            .map_err(|e| (e.span().map(|s| line_of(s.start)), e.message().to_owned()))?;
        // Where each caller starts, to name its line in errors found after parsing.
        let starts: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[callers]]"))
            .map(|(i, _)| i + 1)
            .collect();
        let mut callers = Self {
            entries: Vec::new(),
            by_key: HashMap::new(),
            by_spiffe_id: HashMap::new(),
            by_dns_name: HashMap::new(),
        };
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        for (i, caller) in file.callers.into_iter().enumerate() {
            let line = starts.get(i).copied();
            let fail = |problem: String| (line, format!("caller {:?}: {problem}", caller.name));
            if caller.name.trim().is_empty() {
                return Err((line, "a caller needs a name".to_owned()));
            }
            if names.insert(caller.name.clone(), i).is_some() {
                return Err(fail("the name is used twice".to_owned()));
            }
            let rpcs = if caller.rpcs.iter().any(|r| r == "*") {
                None
            } else {
                let mut granted = Vec::new();
                for rpc in &caller.rpcs {
                    match RPCS
                        .iter()
                        .chain(GATEWAY_ROUTES.iter())
                        .find(|known| *known == rpc)
                    {
                        Some(known) => granted.push(*known),
                        None => {
                            return Err(fail(format!(
                                "unknown RPC {rpc:?} (known: {}, the gateway routes {}, or \"*\")",
                                RPCS.join(", "),
                                GATEWAY_ROUTES.join(", ")
                            )));
                        }
                    }
                }
                Some(granted)
            };
            if caller.spiffe_ids.is_empty()
                && caller.dns_names.is_empty()
                && caller.api_key_sha256.is_empty()
            {
                return Err(fail(
                    "names no spiffe_ids, dns_names or api_key_sha256, so no call can be it"
                        .to_owned(),
                ));
            }
            let index = callers.entries.len();
            for hash in &caller.api_key_sha256 {
                let bytes: [u8; 32] = hex::decode(hash.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        fail("api_key_sha256 holds something other than 64 hex digits".to_owned())
                    })?;
                if callers.by_key.insert(bytes, index).is_some() {
                    return Err(fail("an API key hash is listed twice".to_owned()));
                }
            }
            for id in &caller.spiffe_ids {
                if callers.by_spiffe_id.insert(id.clone(), index).is_some() {
                    return Err(fail(format!("spiffe id {id} is listed twice")));
                }
            }
            for name in &caller.dns_names {
                if callers
                    .by_dns_name
                    .insert(name.to_ascii_lowercase(), index)
                    .is_some()
                {
                    return Err(fail(format!("dns name {name} is listed twice")));
                }
            }
            callers.entries.push(CallerEntry {
                name: Arc::from(caller.name.as_str()),
                rpcs,
            });
        }
        Ok(callers)
    }

    /// The caller the evidence names, if any: a key first, then certificate or mesh identities.
    fn identify(&self, evidence: &Evidence<'_>) -> Option<&CallerEntry> {
        let index = evidence
            .api_key
            .and_then(|key| {
                self.by_key
                    .get(&<[u8; 32]>::from(Sha256::digest(key.as_bytes())))
            })
            .or_else(|| {
                evidence
                    .spiffe_ids
                    .iter()
                    .find_map(|id| self.by_spiffe_id.get(id))
            })
            .or_else(|| {
                evidence
                    .dns_names
                    .iter()
                    .find_map(|name| self.by_dns_name.get(&name.to_ascii_lowercase()))
            })?;
        self.entries.get(*index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    fn callers(text: &str) -> CallerPolicy {
        CallerPolicy::Callers(Callers::parse(text).unwrap())
    }

    #[test]
    fn a_caller_gets_the_rpcs_it_is_granted_and_no_others() {
        let policy = callers(&format!(
            r#"
[[callers]]
name = "web-bff"
spiffe_ids = ["spiffe://cluster.local/ns/web/sa/bff"]
rpcs = ["ResolveSession", "GetUserByOryId"]

[[callers]]
name = "back-office"
api_key_sha256 = ["{}"]
rpcs = ["*"]
"#,
            sha("bo-secret-key")
        ));
        let bff = Evidence {
            spiffe_ids: vec!["spiffe://cluster.local/ns/web/sa/bff".into()],
            ..Evidence::default()
        };
        let allowed = policy
            .authorize(Access::Rpc("ResolveSession"), || bff.clone())
            .unwrap()
            .unwrap();
        assert_eq!(&*allowed.name, "web-bff");
        assert_eq!(
            policy.authorize(Access::Rpc("LinkIdentity"), || bff.clone()),
            Err(Denied::NotAllowed {
                caller: allowed.clone(),
                rpc: "LinkIdentity".into()
            })
        );
        let bo = Evidence {
            api_key: Some("bo-secret-key"),
            ..Evidence::default()
        };
        assert!(
            policy
                .authorize(Access::Rpc("LinkIdentity"), || bo.clone())
                .is_ok()
        );
        let wrong = Evidence {
            api_key: Some("guess"),
            ..Evidence::default()
        };
        let Err(Denied::Unauthenticated { shown }) =
            policy.authorize(Access::Rpc("ResolveSession"), || wrong.clone())
        else {
            panic!("an unknown key was accepted");
        };
        assert!(!shown.contains("guess"), "{shown}");
        // Health needs nothing; reflection needs an identity, any.
        assert_eq!(policy.authorize(Access::Open, Evidence::default), Ok(None));
        assert!(
            policy
                .authorize(Access::Identified, Evidence::default)
                .is_err()
        );
        assert!(policy.authorize(Access::Identified, || bff.clone()).is_ok());
    }

    #[test]
    fn a_bad_callers_file_is_refused_naming_the_line() {
        for (text, line, needle) in [
            (
                "[[callers]]\nname = \"a\"\napi_key_sha256 = [\"00\"]\nrpcs = [\"*\"]\n",
                Some(1),
                "64 hex digits",
            ),
            (
                "[[callers]]\nname = \"a\"\ndns_names = [\"a.example\"]\nrpcs = [\"*\"]\n\n[[callers]]\nname = \"b\"\ndns_names = [\"b.example\"]\nrpcs = [\"ResolveSesion\"]\n",
                Some(6),
                "unknown RPC \"ResolveSesion\"",
            ),
            ("[[callers]]\nname = \"a\"\nrpcs = [\"*\"\n", Some(3), ""),
            (
                "[[callers]]\nname = \"a\"\nspiffe = [\"x\"]\nrpcs = [\"*\"]\n",
                Some(3),
                "unknown field",
            ),
            (
                "[[callers]]\nname = \"a\"\nrpcs = [\"*\"]\n",
                Some(1),
                "no call can be it",
            ),
        ] {
            let Err((at, problem)) = Callers::parse(text) else {
                panic!("accepted: {text}");
            };
            assert_eq!(at, line, "{problem}");
            assert!(problem.contains(needle), "{problem}");
        }
    }

    #[test]
    fn no_decision_is_refused_and_any_caller_allows_all() {
        let none = CallerSettings::default();
        let err = CallerPolicy::from_settings(&none).unwrap_err();
        assert!(err.to_string().contains("IDMAP_ALLOW_ANY_CALLER"), "{err}");
        let any = CallerSettings {
            allow_any_caller: true,
            ..CallerSettings::default()
        };
        let policy = CallerPolicy::from_settings(&any).unwrap();
        assert_eq!(
            policy.authorize(Access::Rpc("LinkIdentity"), Evidence::default),
            Ok(None)
        );
    }
}
