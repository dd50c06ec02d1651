//! Ingest keys: who may publish, under which name, to which organizations.
//!
//! Two sources make one set. `FANOUT_INGEST_KEYS` holds unscoped keys, named by their
//! position ("1", "2", ...), as it always has. `FANOUT_INGEST_KEYS_FILE` holds named keys,
//! each scoped to organizations, one per line: `name key org1,org2`, or `name key *` for
//! all. A key used for an organization outside its scope is refused with 403, so a leaked
//! key of one tenant's worker cannot publish into another tenant's dashboards.
//!
//! The file is re-read while the replica runs, so a key is added, rescoped or retired
//! without a restart and without dropping a request: each request checks against the set
//! in force when it arrives, and a reload swaps the whole set at once. A file that does not
//! parse leaves the last good set in force (logged; `fanout_ingest_keys_file_stale` is 1
//! until a good version is read). The file is polled, not watched: a Kubernetes Secret
//! volume is updated by swapping a symlink, which a watch on the file itself misses; and a
//! change is applied only once two polls in a row read the same bytes, so a file caught
//! half-written by an editor is never taken for a set of keys.
//!
//! Names, never secrets, appear in answers, logs and metric labels. Matching compares the
//! presented key with every key in constant time, so timing tells neither whether nor which
//! key matched.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::auth::{Bearer, bearer};
use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::protocol::OrgId;

/// How often the keys file is read for changes.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// A file key shorter than this is refused: it could be guessed.
pub const MIN_FILE_KEY_LEN: usize = 16;

const MAX_NAME_LEN: usize = 64;

/// What answers, logs and metrics call a key: its name in the keys file, or its position in
/// `FANOUT_INGEST_KEYS` (from 1). Never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyName(Arc<str>);

impl KeyName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The organizations a key may publish to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Orgs(Arc<HashSet<OrgId>>),
}

/// What a request's key grants: its name, and its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub name: KeyName,
    pub scope: Scope,
}

impl Grant {
    pub fn covers(&self, org: &OrgId) -> bool {
        match &self.scope {
            Scope::All => true,
            Scope::Orgs(orgs) => orgs.contains(org),
        }
    }
}

/// One line of the keys file.
#[derive(Clone)]
pub struct NamedKey {
    pub grant: Grant,
    secret: String,
}

impl fmt::Debug for NamedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret stays out of every log line and panic message.
        f.debug_struct("NamedKey")
            .field("grant", &self.grant)
            .finish_non_exhaustive()
    }
}

/// Why the keys file (or the set it makes with `FANOUT_INGEST_KEYS`) was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("cannot read it: {0}")]
    Read(String),
    #[error("{0}")]
    Conflict(String),
    #[error(
        "holds no key, and FANOUT_INGEST_KEYS none either: workers could not publish; add a line `name key org1,org2` (or `name key *`)"
    )]
    NoKeys,
}

fn line_error(line: usize, problem: impl Into<String>) -> KeysError {
    KeysError::Line {
        line,
        problem: problem.into(),
    }
}

/// Parses the keys file: one key per line, `name key scope`, fields separated by spaces or
/// tabs; blank lines and lines starting with `#` are ignored. Names and keys are unique.
pub fn parse_file(text: &str) -> Result<Vec<NamedKey>, KeysError> {
    let mut keys: Vec<NamedKey> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, secret, scope] = fields[..] else {
            return Err(line_error(
                line_no,
                format!(
                    "has {} fields; expected 3: `name key org1,org2` or `name key *`",
                    fields.len()
                ),
            ));
        };
        let name = parse_name(name).map_err(|p| line_error(line_no, p))?;
        if secret.len() < MIN_FILE_KEY_LEN {
            return Err(line_error(
                line_no,
                format!(
                    "the key of {name:?} is shorter than {MIN_FILE_KEY_LEN} characters, which can be guessed; generate one, e.g. `openssl rand -hex 24`"
                ),
            ));
        }
        let scope = parse_scope(scope).map_err(|p| line_error(line_no, p))?;
        if keys.iter().any(|k| k.grant.name.as_str() == name) {
            return Err(line_error(
                line_no,
                format!("the name {name:?} is used twice"),
            ));
        }
        if let Some(other) = keys.iter().find(|k| k.secret == secret) {
            return Err(line_error(
                line_no,
                format!(
                    "{name:?} has the same key as {:?}; each name needs its own key",
                    other.grant.name.as_str()
                ),
            ));
        }
        keys.push(NamedKey {
            grant: Grant {
                name: KeyName(name.into()),
                scope,
            },
            secret: secret.to_owned(),
        });
    }
    Ok(keys)
}

fn parse_name(name: &str) -> Result<&str, String> {
    let ok = name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "the name {name:?} must start with a letter and hold at most {MAX_NAME_LEN} letters, digits, '.', '_' or '-'"
        ))
    }
}

fn parse_scope(scope: &str) -> Result<Scope, String> {
    if scope == "*" {
        return Ok(Scope::All);
    }
    let mut orgs = HashSet::new();
    for org in scope.split(',') {
        if org == "*" {
            return Err("`*` stands alone: it already covers every organization".into());
        }
        let id = OrgId::parse(org).map_err(|e| {
            format!("the organization {org:?} is not a valid id ({e}); list ids separated by commas, without spaces, or `*` for all")
        })?;
        orgs.insert(id);
    }
    Ok(Scope::Orgs(Arc::new(orgs)))
}

/// The keys in force: compared in constant time, each to its grant.
pub struct KeySet {
    secrets: Vec<Vec<u8>>,
    grants: Vec<Grant>,
}

impl KeySet {
    /// `FANOUT_INGEST_KEYS` (unscoped; empty entries and repeats dropped, a repeat keeping the
    /// place of its first) and the file's keys. A key in both is refused: its scope would be
    /// ambiguous.
    pub fn new(unscoped: &[String], named: &[NamedKey]) -> Result<Self, KeysError> {
        let mut seen = HashSet::new();
        let mut set = Self {
            secrets: Vec::new(),
            grants: Vec::new(),
        };
        for key in unscoped.iter().filter(|k| !k.is_empty()) {
            if seen.insert(key.as_str()) {
                set.secrets.push(key.as_bytes().to_vec());
                set.grants.push(Grant {
                    name: KeyName(set.secrets.len().to_string().into()),
                    scope: Scope::All,
                });
            }
        }
        for key in named {
            if !seen.insert(key.secret.as_str()) {
                return Err(KeysError::Conflict(format!(
                    "the key of {:?} is also in FANOUT_INGEST_KEYS; keep it in one place",
                    key.grant.name.as_str()
                )));
            }
            set.secrets.push(key.secret.as_bytes().to_vec());
            set.grants.push(key.grant.clone());
        }
        if set.secrets.is_empty() {
            return Err(KeysError::NoKeys);
        }
        Ok(set)
    }

    /// How many keys are in force.
    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The grant of the key an `Authorization` header value `Bearer <key>` presents.
    pub fn check_header(&self, header: Option<&str>) -> Option<&Grant> {
        let Some(Bearer::Token(presented)) = header.and_then(bearer) else {
            return None;
        };
        use subtle::{ConditionallySelectable, ConstantTimeEq};
        // Every key is compared (no early return, no branch on a match).
        let mut found = 0u64;
        for (i, key) in self.secrets.iter().enumerate() {
            let id = i as u64 + 1;
            found.conditional_assign(&id, key.as_slice().ct_eq(presented.as_bytes()));
        }
        (found != 0).then(|| &self.grants[found as usize - 1])
    }
}

/// Where the keys file is, and what was read from it at start.
#[derive(Debug, Clone)]
pub struct KeysFile {
    pub path: PathBuf,
    pub keys: Vec<NamedKey>,
    /// The bytes the keys were parsed from: the reload task's starting point.
    read: Vec<u8>,
}

impl KeysFile {
    /// Reads and parses the file (at start: an error here stops the replica).
    pub fn load(path: PathBuf) -> Result<Self, KeysError> {
        let read = std::fs::read(&path).map_err(|e| KeysError::Read(e.to_string()))?;
        let text = std::str::from_utf8(&read)
            .map_err(|_| KeysError::Read("it is not UTF-8 text".into()))?;
        let keys = parse_file(text)?;
        Ok(Self { path, keys, read })
    }
}

/// The live set: swapped whole when the keys file changes.
pub struct Keys {
    current: RwLock<Arc<KeySet>>,
    unscoped: Vec<String>,
    file: Option<PathBuf>,
    /// The bytes of the file last taken up (applied, or refused): where a restarted reload
    /// task starts from.
    taken: Mutex<Option<Vec<u8>>>,
}

impl Keys {
    pub fn new(unscoped: Vec<String>, file: Option<KeysFile>) -> Result<Self, KeysError> {
        let named = file.as_ref().map(|f| f.keys.as_slice()).unwrap_or_default();
        let set = KeySet::new(&unscoped, named)?;
        ::metrics::gauge!(metrics::INGEST_KEYS).set(set.len() as f64);
        ::metrics::gauge!(metrics::INGEST_KEYS_FILE_STALE).set(0.0);
        Ok(Self {
            current: RwLock::new(Arc::new(set)),
            unscoped,
            taken: Mutex::new(file.as_ref().map(|f| f.read.clone())),
            file: file.map(|f| f.path),
        })
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<KeySet> {
        self.current.read().unwrap().clone()
    }

    /// Whether there is a file to watch.
    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// Takes `text` as the file's new content, or says why not (the set in force stays).
    fn apply(&self, text: &str) -> Result<usize, KeysError> {
        let set = KeySet::new(&self.unscoped, &parse_file(text)?)?;
        let n = set.len();
        *self.current.write().unwrap() = Arc::new(set);
        Ok(n)
    }

    /// The reload task: polls the file, applies each change once it reads the same twice.
    pub async fn watch(self: Arc<Self>, shutdown: Shutdown) {
        let Some(path) = self.file.clone() else {
            return shutdown.wait().await;
        };
        // What was last taken up, and what the previous poll read (None: unreadable).
        let mut applied = self.taken.lock().unwrap().clone();
        let mut last = applied.clone();
        let mut every = tokio::time::interval(POLL_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.wait() => return,
            }
            let file = path.clone();
            let read = tokio::task::spawn_blocking(move || std::fs::read(file)).await;
            let now = match read.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
                Ok(bytes) => Some(bytes),
                Err(e) => {
                    if last.is_some() {
                        tracing::warn!(path = %path.display(), "FANOUT_INGEST_KEYS_FILE cannot be read ({e}); the keys in force stay");
                        ::metrics::counter!(metrics::INGEST_KEYS_RELOADS, "result" => "error")
                            .increment(1);
                        ::metrics::gauge!(metrics::INGEST_KEYS_FILE_STALE).set(1.0);
                    }
                    last = None;
                    continue;
                }
            };
            let settled = now == last;
            last = now;
            if !settled || last == applied {
                continue;
            }
            applied = last.clone();
            self.taken.lock().unwrap().clone_from(&applied);
            let text = String::from_utf8_lossy(applied.as_deref().unwrap_or_default());
            match self.apply(&text) {
                Ok(n) => {
                    tracing::info!(path = %path.display(), keys = n, "FANOUT_INGEST_KEYS_FILE reloaded");
                    ::metrics::counter!(metrics::INGEST_KEYS_RELOADS, "result" => "ok")
                        .increment(1);
                    ::metrics::gauge!(metrics::INGEST_KEYS).set(n as f64);
                    ::metrics::gauge!(metrics::INGEST_KEYS_FILE_STALE).set(0.0);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), "FANOUT_INGEST_KEYS_FILE not reloaded, the keys in force stay: {e}");
                    ::metrics::counter!(metrics::INGEST_KEYS_RELOADS, "result" => "error")
                        .increment(1);
                    ::metrics::gauge!(metrics::INGEST_KEYS_FILE_STALE).set(1.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0123456789abcdef-one";
    const K2: &str = "0123456789abcdef-two";

    fn org(s: &str) -> OrgId {
        OrgId::parse(s).unwrap()
    }

    #[test]
    fn parses_names_keys_and_scopes() {
        let text = format!("# workers\n\nci-eu {K1} acme,42\n  ops\t{K2}   *  \n");
        let keys = parse_file(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].grant.name.as_str(), "ci-eu");
        assert!(keys[0].grant.covers(&org("acme")));
        assert!(keys[0].grant.covers(&org("42")));
        assert!(!keys[0].grant.covers(&org("globex")));
        assert_eq!(keys[1].grant.scope, Scope::All);
        assert!(keys[1].grant.covers(&org("globex")));
    }

    #[test]
    fn every_bad_line_is_named_with_its_problem() {
        let cases = [
            (format!("ci {K1}"), "has 2 fields"),
            (format!("ci {K1} acme extra"), "has 4 fields"),
            ("ci short acme".to_string(), "shorter than 16"),
            (format!("1ci {K1} acme"), "must start with a letter"),
            (format!("c:i {K1} acme"), "must start with a letter"),
            (format!("ci {K1} acme,,b"), "is not a valid id"),
            (format!("ci {K1} ac:me"), "is not a valid id"),
            (format!("ci {K1} acme,*"), "stands alone"),
            (format!("ci {K1} *\nci {K2} *"), "used twice"),
            (format!("ci {K1} *\nops {K1} *"), "same key as \"ci\""),
        ];
        for (text, expected) in cases {
            let err = parse_file(&format!("# header\n{text}\n")).unwrap_err();
            let KeysError::Line { line, problem } = &err else {
                panic!("{text:?}: {err:?}")
            };
            assert!(*line >= 2, "{text:?}: line {line}");
            assert!(problem.contains(expected), "{text:?}: {problem}");
            assert!(!problem.contains(K1) && !problem.contains(K2), "{problem}");
        }
    }

    #[test]
    fn set_names_unscoped_keys_by_position_and_file_keys_by_name() {
        let named = parse_file(&format!("ci {K2} acme")).unwrap();
        let unscoped: Vec<String> = ["k1", "", "k2", "k1"].map(String::from).to_vec();
        let set = KeySet::new(&unscoped, &named).unwrap();
        assert_eq!(set.len(), 3);
        let name = |h: &str| set.check_header(Some(h)).map(|g| g.name.to_string());
        assert_eq!(name("Bearer k1").as_deref(), Some("1"));
        assert_eq!(name("bearer k2").as_deref(), Some("2"));
        assert_eq!(name(&format!("Bearer {K2}")).as_deref(), Some("ci"));
        for refused in ["Bearer k3", "Bearer ", "k1", "Basic k1"] {
            assert_eq!(name(refused), None, "{refused:?}");
        }
        assert_eq!(set.check_header(None), None);
        let ci = set.check_header(Some(&format!("Bearer {K2}"))).unwrap();
        assert!(ci.covers(&org("acme")) && !ci.covers(&org("globex")));
    }

    #[test]
    fn a_key_in_both_places_or_no_key_at_all_is_refused() {
        let named = parse_file(&format!("ci {K1} acme")).unwrap();
        let err = KeySet::new(&[K1.to_string()], &named).err().unwrap();
        assert!(
            err.to_string().contains("also in FANOUT_INGEST_KEYS"),
            "{err}"
        );
        assert_eq!(KeySet::new(&[], &[]).err(), Some(KeysError::NoKeys));
    }

    #[test]
    fn a_bad_reload_keeps_the_set_in_force() {
        let text = format!("ci {K1} acme");
        let file = KeysFile {
            path: "unused".into(),
            keys: parse_file(&text).unwrap(),
            read: text.into_bytes(),
        };
        let keys = Keys::new(vec![], Some(file)).unwrap();
        assert!(keys.apply("ci short acme").is_err());
        assert!(keys.apply("# nothing\n").is_err());
        let header = format!("Bearer {K1}");
        assert!(keys.current().check_header(Some(&header)).is_some());
        assert_eq!(keys.apply(&format!("ops {K2} *")).unwrap(), 1);
        assert!(keys.current().check_header(Some(&header)).is_none());
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let keys = parse_file(&format!("ci {K1} acme")).unwrap();
        assert!(!format!("{keys:?}").contains(K1));
    }
}
