//! A trigger's parameters: its `metadata` merged with what its `authenticationRef` and
//! KEDA's `…FromEnv` keys point at, and the typed readers the trigger parsers use.
//!
//! Resolution is split so the rules are pure and the cluster reads are thin:
//! 1. [`resolve`] reads the `TriggerAuthentication` (or `ClusterTriggerAuthentication`).
//! 2. [`Plan::new`] (pure) decides which Secret and ConfigMap keys and which container
//!    env vars supply which parameter, and refuses sources Blink does not implement.
//! 3. [`resolve`] reads each Secret and ConfigMap the plan names, once.
//! 4. [`Plan::apply`] (pure) turns those reads into [`TriggerParams`], or into an
//!    [`TriggerError::Authentication`] naming the missing object and key.
//!
//! Lookup order follows KEDA's: `metadata`, then the authentication parameters, then
//! the container env var named by `<key>FromEnv`. An empty value counts as absent, as
//! in KEDA.
//!
//! Values may be secrets: [`TriggerParams`]' `Debug` shows keys only, and error
//! messages name keys, objects and variables, never values read from a Secret.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use blink_crds::auth::{ClusterTriggerAuthentication, TriggerAuthentication};
use blink_crds::trigger::{AuthenticationRef, AuthenticationRefKind};
use blink_crds::{ScaleTrigger, TriggerAuthenticationSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodTemplateSpec, Secret};
use kube::Api;

use super::TriggerError;

/// Where a parameter's value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The trigger's `metadata`.
    Metadata,
    /// The `authenticationRef` (a Secret, a ConfigMap or the container env).
    Authentication,
    /// A container env var named by a `<key>FromEnv` metadata key.
    Env,
}

/// A trigger's resolved parameters. Cloning is cheap enough for a rebuild; `Debug`
/// never prints a value.
#[derive(Clone, Default, PartialEq)]
pub struct TriggerParams {
    metadata: BTreeMap<String, String>,
    auth: BTreeMap<String, String>,
    /// Container env var name → value, for the vars the `…FromEnv` keys name.
    env: BTreeMap<String, String>,
}

impl fmt::Debug for TriggerParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TriggerParams")
            .field("metadata", &self.metadata.keys().collect::<Vec<_>>())
            .field("auth", &self.auth.keys().collect::<Vec<_>>())
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl TriggerParams {
    /// Parameters from `metadata` alone (a trigger without `authenticationRef` or
    /// `…FromEnv` keys).
    pub fn from_metadata(metadata: BTreeMap<String, String>) -> Self {
        Self {
            metadata,
            ..Self::default()
        }
    }

    /// Parameters from all three sources.
    pub fn new(
        metadata: BTreeMap<String, String>,
        auth: BTreeMap<String, String>,
        env: BTreeMap<String, String>,
    ) -> Self {
        Self {
            metadata,
            auth,
            env,
        }
    }

    /// The value of `key` and where it came from: `metadata`, then the authentication
    /// parameters, then the env var that `<key>FromEnv` names. Empty means absent.
    pub fn lookup(&self, key: &str) -> Option<(&str, Source)> {
        let (metadata, auth, env) = (&self.metadata, &self.auth, &self.env);
        if let Some(v) = non_empty(metadata, key) {
            return Some((v, Source::Metadata));
        }
        if let Some(v) = non_empty(auth, key) {
            return Some((v, Source::Authentication));
        }
        let var = non_empty(metadata, &from_env_key(key))?;
        non_empty(env, var).map(|v| (v, Source::Env))
    }

    /// The value of `key` (see [`lookup`](Self::lookup)).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.lookup(key).map(|(v, _)| v)
    }

    /// Whether `key` is set, in any source.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The value of `key`, or an error naming it and the sources that could give it.
    pub fn required(&self, key: &str) -> Result<&str, TriggerError> {
        if let Some(v) = self.get(key) {
            return Ok(v);
        }
        let from_env = from_env_key(key);
        Err(TriggerError::InvalidMetadata(
            match self.metadata.get(&from_env).filter(|v| !v.is_empty()) {
                Some(var) => format!(
                    "metadata.{from_env} names env var {var}, which has no value in the scale \
                     target's container"
                ),
                None => format!(
                    "metadata.{key} is required (or an authenticationRef parameter {key}, or \
                     metadata.{from_env})"
                ),
            },
        ))
    }

    /// A float, `default` when absent.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64, TriggerError> {
        Ok(self.f64_opt(key)?.unwrap_or(default))
    }

    /// A float when present. NaN and infinities are refused: no decision can use them.
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>, TriggerError> {
        self.parse(key, "a number", |s| {
            s.trim().parse::<f64>().ok().filter(|v| v.is_finite())
        })
    }

    /// An integer, `default` when absent.
    pub fn i64_or(&self, key: &str, default: i64) -> Result<i64, TriggerError> {
        Ok(self
            .parse(key, "an integer", |s| s.trim().parse::<i64>().ok())?
            .unwrap_or(default))
    }

    /// A boolean in Go's `strconv.ParseBool` spellings (KEDA's), `default` when absent.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, TriggerError> {
        Ok(self.parse(key, "a boolean", parse_bool)?.unwrap_or(default))
    }

    /// Parses `key` with `parse`; the error names the key, and shows the value only
    /// when it came from `metadata` (a value from a Secret stays unseen).
    fn parse<T>(
        &self,
        key: &str,
        what: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, TriggerError> {
        let Some((raw, source)) = self.lookup(key) else {
            return Ok(None);
        };
        match parse(raw) {
            Some(v) => Ok(Some(v)),
            None if source == Source::Metadata => Err(TriggerError::InvalidMetadata(format!(
                "metadata.{key} must be {what}, not {raw:?}"
            ))),
            None => Err(TriggerError::InvalidMetadata(format!(
                "parameter {key} must be {what}"
            ))),
        }
    }
}

/// The value at `key`, unless empty (KEDA treats an empty value as absent).
fn non_empty<'a>(map: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    map.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

/// KEDA's name for the metadata key that names an env var supplying `key`.
fn from_env_key(key: &str) -> String {
    format!("{key}FromEnv")
}

/// Go's `strconv.ParseBool`, which KEDA uses for boolean metadata.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A string that may be a secret: `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A URL for messages: the password replaced by `***`. Text that does not parse as a
/// URL is shown as `<unparsable URL>`, since it might be a secret itself.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

// ---------------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------------

/// Resolves `trigger`'s parameters for an object in `namespace`.
///
/// `pod_template` is the scale target's pod template, needed when the trigger uses
/// `…FromEnv` keys or an `env` source; `env_source_container` is
/// `scaleTargetRef.envSourceContainerName`. A `ClusterTriggerAuthentication`'s Secrets
/// and ConfigMaps are read in the client's default namespace — in the cluster, the
/// scaler's own, as KEDA reads them in its own.
pub async fn resolve(
    client: &kube::Client,
    namespace: &str,
    trigger: &ScaleTrigger,
    pod_template: Option<&PodTemplateSpec>,
    env_source_container: Option<&str>,
) -> Result<TriggerParams, TriggerError> {
    let auth = match &trigger.authentication_ref {
        Some(r) => Some(read_authentication(client, namespace, r).await?),
        None => None,
    };
    let scope = Scope {
        namespace,
        auth_namespace: match trigger
            .authentication_ref
            .as_ref()
            .map(AuthenticationRef::kind)
        {
            Some(AuthenticationRefKind::ClusterTriggerAuthentication) => client.default_namespace(),
            _ => namespace,
        },
        auth_name: auth.as_ref().map(|(name, _)| name.as_str()),
        pod_template,
        env_source_container,
    };
    let plan = Plan::new(&trigger.metadata, auth.as_ref().map(|(_, s)| s), &scope)?;
    let mut objects = Objects::new();
    for object in plan.objects() {
        let data = read_object(client, &object).await?;
        objects.insert(object, data);
    }
    plan.apply(trigger.metadata.clone(), &objects)
}

/// Reads the referenced authentication object; returns a description for messages
/// (`TriggerAuthentication ns/name`) and its spec.
async fn read_authentication(
    client: &kube::Client,
    namespace: &str,
    r: &AuthenticationRef,
) -> Result<(String, TriggerAuthenticationSpec), TriggerError> {
    let (what, spec) = match r.kind() {
        AuthenticationRefKind::TriggerAuthentication => {
            let what = format!("TriggerAuthentication {namespace}/{}", r.name);
            let api: Api<TriggerAuthentication> = Api::namespaced(client.clone(), namespace);
            let found = api
                .get_opt(&r.name)
                .await
                .map_err(|e| read_error(&what, &e))?;
            (what, found.map(|o| o.spec))
        }
        AuthenticationRefKind::ClusterTriggerAuthentication => {
            let what = format!("ClusterTriggerAuthentication {}", r.name);
            let api: Api<ClusterTriggerAuthentication> = Api::all(client.clone());
            let found = api
                .get_opt(&r.name)
                .await
                .map_err(|e| read_error(&what, &e))?;
            (what, found.map(|o| o.spec))
        }
    };
    match spec {
        Some(spec) => Ok((what, spec)),
        None => Err(TriggerError::Authentication(format!("{what} not found"))),
    }
}

/// Reads a Secret's or ConfigMap's data; `None` when it does not exist.
async fn read_object(
    client: &kube::Client,
    object: &ObjectRef,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, TriggerError> {
    let what = object.to_string();
    match object.kind {
        ObjectKind::Secret => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &object.namespace);
            let found = api
                .get_opt(&object.name)
                .await
                .map_err(|e| read_error(&what, &e))?;
            Ok(found.map(|s| {
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect()
            }))
        }
        ObjectKind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &object.namespace);
            let found = api
                .get_opt(&object.name)
                .await
                .map_err(|e| read_error(&what, &e))?;
            Ok(found.map(|c| {
                let text = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()));
                let binary = c
                    .binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0));
                text.chain(binary).collect()
            }))
        }
    }
}

/// A failed read of a Kubernetes object. The API server's message names the object
/// and the reason (forbidden, timeout), never a Secret's data.
fn read_error(what: &str, e: &kube::Error) -> TriggerError {
    TriggerError::Authentication(format!("reading {what}: {e}"))
}

/// Where resolution happens: the namespaces and the scale target's pod template.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    /// The object's namespace (its scale target's env refers to objects here).
    pub namespace: &'a str,
    /// Where the authentication object's Secrets and ConfigMaps live.
    pub auth_namespace: &'a str,
    /// `TriggerAuthentication ns/name`, for messages.
    pub auth_name: Option<&'a str>,
    pub pod_template: Option<&'a PodTemplateSpec>,
    pub env_source_container: Option<&'a str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ObjectKind {
    Secret,
    ConfigMap,
}

/// A Secret or ConfigMap to read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ObjectKind::Secret => "Secret",
            ObjectKind::ConfigMap => "ConfigMap",
        };
        write!(f, "{kind} {}/{}", self.namespace, self.name)
    }
}

/// The data of the objects read: `None` for one that does not exist.
pub type Objects = BTreeMap<ObjectRef, Option<BTreeMap<String, Vec<u8>>>>;

/// Where one value comes from.
#[derive(Clone, Debug, PartialEq)]
enum ValueRef {
    /// A plain env `value` (not read from any object; kept out of `Debug`).
    Literal(Redacted),
    /// A key of a Secret or ConfigMap.
    Key {
        object: ObjectRef,
        key: String,
        optional: bool,
    },
    /// An env var that only `envFrom` can supply: candidates in precedence order
    /// (the last `envFrom` entry wins in Kubernetes, so it comes first here).
    EnvFrom(Vec<(ObjectRef, String, bool)>),
}

/// One value to find, and what to call it in messages.
#[derive(Clone, Debug, PartialEq)]
struct Wanted {
    /// `parameter host` or `env var RABBIT_URL of container app`.
    what: String,
    source: ValueRef,
}

/// What resolution must read and where each value goes: built without I/O.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Authentication parameter → its source.
    auth: Vec<(String, Wanted)>,
    /// Container env var (named by a `…FromEnv` key) → its source.
    env: Vec<(String, Wanted)>,
}

impl Plan {
    /// Plans the reads for a trigger with `metadata` and (when it has an
    /// `authenticationRef`) the referenced `auth` spec.
    pub fn new(
        metadata: &BTreeMap<String, String>,
        auth: Option<&TriggerAuthenticationSpec>,
        scope: &Scope<'_>,
    ) -> Result<Self, TriggerError> {
        let mut plan = Plan::default();
        if let Some(spec) = auth {
            let name = scope.auth_name.unwrap_or("the TriggerAuthentication");
            let unsupported = spec.unsupported_sources();
            if !unsupported.is_empty() {
                return Err(TriggerError::Unsupported(format!(
                    "{name} uses {}, which Blink does not support (Blink reads \
                     secretTargetRef, configMapTargetRef and env)",
                    unsupported.join(", ")
                )));
            }
            for r in spec.config_map_target_ref.iter().flatten() {
                plan.auth.push((
                    r.parameter.clone(),
                    Wanted {
                        what: format!("parameter {}", r.parameter),
                        source: ValueRef::Key {
                            object: ObjectRef {
                                kind: ObjectKind::ConfigMap,
                                namespace: scope.auth_namespace.to_owned(),
                                name: r.name.clone(),
                            },
                            key: r.key.clone(),
                            optional: false,
                        },
                    },
                ));
            }
            // Secrets after ConfigMaps: a parameter given by both takes the Secret's
            // value (the later entry wins in `apply`), as in KEDA's resolver.
            for r in spec.secret_target_ref.iter().flatten() {
                plan.auth.push((
                    r.parameter.clone(),
                    Wanted {
                        what: format!("parameter {}", r.parameter),
                        source: ValueRef::Key {
                            object: ObjectRef {
                                kind: ObjectKind::Secret,
                                namespace: scope.auth_namespace.to_owned(),
                                name: r.name.clone(),
                            },
                            key: r.key.clone(),
                            optional: false,
                        },
                    },
                ));
            }
            for e in spec.env.iter().flatten() {
                let container_name = e.container_name.as_deref().or(scope.env_source_container);
                let container = pick_container(scope.pod_template, container_name, || {
                    format!("{name} env parameter {}", e.parameter)
                })?;
                let source = env_source(container, &e.name, scope.namespace)?;
                plan.auth.push((
                    e.parameter.clone(),
                    Wanted {
                        what: format!(
                            "parameter {} (env var {} of container {})",
                            e.parameter, e.name, container.name
                        ),
                        source,
                    },
                ));
            }
        }
        for (key, var) in metadata {
            if !key.ends_with("FromEnv") || var.is_empty() {
                continue;
            }
            let container = pick_container(scope.pod_template, scope.env_source_container, || {
                format!("metadata.{key}")
            })?;
            let source = env_source(container, var, scope.namespace)?;
            plan.env.push((
                var.clone(),
                Wanted {
                    what: format!(
                        "env var {var} of container {} (metadata.{key})",
                        container.name
                    ),
                    source,
                },
            ));
        }
        Ok(plan)
    }

    /// The Secrets and ConfigMaps to read, each once.
    pub fn objects(&self) -> BTreeSet<ObjectRef> {
        let mut out = BTreeSet::new();
        for (_, wanted) in self.auth.iter().chain(&self.env) {
            match &wanted.source {
                ValueRef::Literal(_) => {}
                ValueRef::Key { object, .. } => {
                    out.insert(object.clone());
                }
                ValueRef::EnvFrom(candidates) => {
                    out.extend(candidates.iter().map(|(o, _, _)| o.clone()));
                }
            }
        }
        out
    }

    /// Builds the parameters from the objects read. A missing object or key that is
    /// not optional is an [`TriggerError::Authentication`] naming it.
    pub fn apply(
        &self,
        metadata: BTreeMap<String, String>,
        objects: &Objects,
    ) -> Result<TriggerParams, TriggerError> {
        let mut auth = BTreeMap::new();
        for (parameter, wanted) in &self.auth {
            if let Some(value) = find(wanted, objects)? {
                auth.insert(parameter.clone(), value);
            }
        }
        let mut env = BTreeMap::new();
        for (var, wanted) in &self.env {
            if let Some(value) = find(wanted, objects)? {
                env.insert(var.clone(), value);
            }
        }
        Ok(TriggerParams::new(metadata, auth, env))
    }
}

/// The container the env comes from: `name` if given, else the first.
fn pick_container<'a>(
    template: Option<&'a PodTemplateSpec>,
    name: Option<&str>,
    needed_by: impl Fn() -> String,
) -> Result<&'a Container, TriggerError> {
    let containers = template
        .and_then(|t| t.spec.as_ref())
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    if template.is_none() {
        return Err(TriggerError::Authentication(format!(
            "{} reads the scale target's container env, but the target's pod template is \
             not available",
            needed_by()
        )));
    }
    match name {
        Some(name) => containers.iter().find(|c| c.name == name).ok_or_else(|| {
            TriggerError::Authentication(format!(
                "{} reads container {name}, which the scale target's pod template does not have",
                needed_by()
            ))
        }),
        None => containers.first().ok_or_else(|| {
            TriggerError::Authentication(format!(
                "{} reads the scale target's container env, but its pod template has no \
                 containers",
                needed_by()
            ))
        }),
    }
}

/// Where container env var `var` gets its value, as the kubelet would decide it:
/// the last `env` entry of that name, else the last `envFrom` source that has it.
fn env_source(container: &Container, var: &str, namespace: &str) -> Result<ValueRef, TriggerError> {
    let object = |kind, name: &str| ObjectRef {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    if let Some(e) = container.env.iter().flatten().rev().find(|e| e.name == var) {
        let Some(from) = &e.value_from else {
            return Ok(ValueRef::Literal(Redacted(
                e.value.clone().unwrap_or_default(),
            )));
        };
        if let Some(r) = &from.secret_key_ref {
            return Ok(ValueRef::Key {
                object: object(ObjectKind::Secret, &r.name),
                key: r.key.clone(),
                optional: r.optional.unwrap_or(false),
            });
        }
        if let Some(r) = &from.config_map_key_ref {
            return Ok(ValueRef::Key {
                object: object(ObjectKind::ConfigMap, &r.name),
                key: r.key.clone(),
                optional: r.optional.unwrap_or(false),
            });
        }
        let kind = if from.field_ref.is_some() {
            "fieldRef"
        } else if from.resource_field_ref.is_some() {
            "resourceFieldRef"
        } else {
            "fileKeyRef"
        };
        return Err(TriggerError::Unsupported(format!(
            "env var {var} of container {} takes its value from {kind}, which only the \
             kubelet can resolve; use value, secretKeyRef or configMapKeyRef",
            container.name
        )));
    }
    let candidates: Vec<(ObjectRef, String, bool)> = container
        .env_from
        .iter()
        .flatten()
        .rev()
        .filter_map(|source| {
            let prefix = source.prefix.as_deref().unwrap_or("");
            let key = var.strip_prefix(prefix)?.to_owned();
            if let Some(r) = &source.secret_ref {
                return Some((
                    object(ObjectKind::Secret, &r.name),
                    key,
                    r.optional.unwrap_or(false),
                ));
            }
            source.config_map_ref.as_ref().map(|r| {
                (
                    object(ObjectKind::ConfigMap, &r.name),
                    key,
                    r.optional.unwrap_or(false),
                )
            })
        })
        .collect();
    if candidates.is_empty() {
        return Err(TriggerError::Authentication(format!(
            "container {} of the scale target has no env var {var}",
            container.name
        )));
    }
    Ok(ValueRef::EnvFrom(candidates))
}

/// Finds one wanted value in the objects read; `None` when an optional source lacks it.
fn find(wanted: &Wanted, objects: &Objects) -> Result<Option<String>, TriggerError> {
    let what = &wanted.what;
    match &wanted.source {
        ValueRef::Literal(v) => Ok(Some(v.0.clone())),
        ValueRef::Key {
            object,
            key,
            optional,
        } => match objects.get(object) {
            Some(Some(data)) => match data.get(key) {
                Some(bytes) => utf8(bytes, object, key, what).map(Some),
                None if *optional => Ok(None),
                None => Err(TriggerError::Authentication(format!(
                    "{object} has no key {key} (for {what})"
                ))),
            },
            _ if *optional => Ok(None),
            _ => Err(TriggerError::Authentication(format!(
                "{object} not found (for {what}, key {key})"
            ))),
        },
        ValueRef::EnvFrom(candidates) => {
            for (object, key, optional) in candidates {
                match objects.get(object) {
                    Some(Some(data)) => {
                        if let Some(bytes) = data.get(key) {
                            return utf8(bytes, object, key, what).map(Some);
                        }
                    }
                    _ if *optional => {}
                    _ => {
                        return Err(TriggerError::Authentication(format!(
                            "{object} not found (envFrom of {what})"
                        )));
                    }
                }
            }
            Ok(None)
        }
    }
}

fn utf8(bytes: &[u8], object: &ObjectRef, key: &str, what: &str) -> Result<String, TriggerError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        TriggerError::Authentication(format!("{object} key {key} (for {what}) is not UTF-8 text"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blink_crds::auth::{
        AuthConfigMapTargetRef, AuthEnvironment, AuthPodIdentity, AuthSecretTargetRef,
        PodIdentityProvider,
    };
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec,
        SecretEnvSource, SecretKeySelector,
    };

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn secret(ns: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind: ObjectKind::Secret,
            namespace: ns.to_owned(),
            name: name.to_owned(),
        }
    }

    fn config_map(ns: &str, name: &str) -> ObjectRef {
        ObjectRef {
            kind: ObjectKind::ConfigMap,
            ..secret(ns, name)
        }
    }

    fn data(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, Vec<u8>>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn env_var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.to_owned(),
            value: Some(value.to_owned()),
            ..EnvVar::default()
        }
    }

    fn env_secret(name: &str, secret: &str, key: &str) -> EnvVar {
        EnvVar {
            name: name.to_owned(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.to_owned(),
                    key: key.to_owned(),
                    optional: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }
    }

    fn template(containers: Vec<Container>) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: None,
            spec: Some(PodSpec {
                containers,
                ..PodSpec::default()
            }),
        }
    }

    fn container(name: &str, env: Vec<EnvVar>) -> Container {
        Container {
            name: name.to_owned(),
            env: Some(env),
            ..Container::default()
        }
    }

    fn scope<'a>(template: Option<&'a PodTemplateSpec>, container: Option<&'a str>) -> Scope<'a> {
        Scope {
            namespace: "app",
            auth_namespace: "app",
            auth_name: Some("TriggerAuthentication app/auth"),
            pod_template: template,
            env_source_container: container,
        }
    }

    #[test]
    fn lookup_order_is_metadata_then_auth_then_env() {
        let params = TriggerParams::new(
            map(&[("a", "meta"), ("b", ""), ("cFromEnv", "C_VAR"), ("d", "")]),
            map(&[("a", "auth"), ("b", "auth"), ("d", "")]),
            map(&[("C_VAR", "env")]),
        );
        assert_eq!(params.lookup("a"), Some(("meta", Source::Metadata)));
        assert_eq!(params.lookup("b"), Some(("auth", Source::Authentication)));
        assert_eq!(params.lookup("c"), Some(("env", Source::Env)));
        assert_eq!(params.lookup("d"), None, "empty everywhere is absent");
        assert_eq!(params.lookup("e"), None);
    }

    #[test]
    fn debug_shows_keys_never_values() {
        let params = TriggerParams::new(
            map(&[("host", "amqp://u:hunter2@h/v")]),
            map(&[("password", "hunter2")]),
            map(&[("URL", "hunter2")]),
        );
        let shown = format!("{params:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("host") && shown.contains("password") && shown.contains("URL"));
        assert_eq!(format!("{:?}", Redacted("hunter2".into())), "***");
    }

    #[test]
    fn typed_readers_name_the_key_and_apply_defaults() {
        let params = TriggerParams::new(
            map(&[
                ("n", "1.5"),
                ("i", "7"),
                ("b", "True"),
                ("bad", "x1"),
                ("nan", "NaN"),
            ]),
            map(&[("secretNumber", "hunter2")]),
            BTreeMap::new(),
        );
        assert_eq!(params.f64_or("n", 0.0).ok(), Some(1.5));
        assert_eq!(params.f64_or("missing", 20.0).ok(), Some(20.0));
        assert_eq!(params.i64_or("i", 0).ok(), Some(7));
        assert_eq!(params.i64_or("missing", 10).ok(), Some(10));
        assert_eq!(params.bool_or("b", false).ok(), Some(true));
        assert_eq!(params.bool_or("missing", true).ok(), Some(true));
        for (key, result) in [
            ("bad", params.f64_or("bad", 0.0).map(|_| ())),
            ("bad", params.i64_or("bad", 0).map(|_| ())),
            ("bad", params.bool_or("bad", false).map(|_| ())),
            ("nan", params.f64_or("nan", 0.0).map(|_| ())),
            ("n", params.i64_or("n", 0).map(|_| ())),
        ] {
            let err = result.expect_err(key);
            assert!(matches!(err, TriggerError::InvalidMetadata(_)));
            assert!(
                err.to_string().contains(&format!("metadata.{key}")),
                "{err}"
            );
        }
        let err = params
            .f64_or("secretNumber", 0.0)
            .expect_err("not a number");
        assert!(err.to_string().contains("secretNumber"));
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn go_bool_spellings() {
        for (s, want) in [
            ("1", Some(true)),
            ("t", Some(true)),
            ("TRUE", Some(true)),
            ("True", Some(true)),
            ("0", Some(false)),
            ("F", Some(false)),
            ("false", Some(false)),
            ("yes", None),
            ("", None),
            ("tRUE", None),
        ] {
            assert_eq!(parse_bool(s), want, "{s:?}");
        }
    }

    #[test]
    fn required_says_where_the_value_could_come_from() {
        let params = TriggerParams::from_metadata(map(&[("hostFromEnv", "RABBIT")]));
        let err = params.required("host").expect_err("no env value");
        assert!(err.to_string().contains("RABBIT"), "{err}");
        let err = params.required("queueName").expect_err("absent");
        assert!(err.to_string().contains("metadata.queueName"), "{err}");
    }

    #[test]
    fn redacts_url_passwords() {
        assert_eq!(
            redact_url("amqp://user:hunter2@rabbit:5672/vh"),
            "amqp://user:***@rabbit:5672/vh"
        );
        assert_eq!(redact_url("http://h:9090"), "http://h:9090/");
        assert_eq!(redact_url("hunter2 not a url"), "<unparsable URL>");
    }

    #[test]
    fn secret_and_config_map_refs_resolve() {
        let spec = TriggerAuthenticationSpec {
            secret_target_ref: Some(vec![AuthSecretTargetRef {
                parameter: "host".into(),
                name: "rabbit".into(),
                key: "url".into(),
            }]),
            config_map_target_ref: Some(vec![
                AuthConfigMapTargetRef {
                    parameter: "vhostName".into(),
                    name: "settings".into(),
                    key: "vhost".into(),
                },
                AuthConfigMapTargetRef {
                    parameter: "host".into(),
                    name: "settings".into(),
                    key: "host".into(),
                },
            ]),
            ..TriggerAuthenticationSpec::default()
        };
        let metadata = map(&[("queueName", "q")]);
        let plan = Plan::new(&metadata, Some(&spec), &scope(None, None)).expect("plan");
        assert_eq!(
            plan.objects(),
            [secret("app", "rabbit"), config_map("app", "settings")].into()
        );
        let objects: Objects = [
            (secret("app", "rabbit"), data(&[("url", "amqp://s")])),
            (
                config_map("app", "settings"),
                data(&[("vhost", "v"), ("host", "amqp://cm")]),
            ),
        ]
        .into();
        let params = plan.apply(metadata, &objects).expect("resolves");
        assert_eq!(params.get("host"), Some("amqp://s"), "the Secret wins");
        assert_eq!(params.get("vhostName"), Some("v"));
        assert_eq!(params.get("queueName"), Some("q"));
    }

    #[test]
    fn missing_secret_or_key_names_them_and_not_the_value() {
        let spec = TriggerAuthenticationSpec {
            secret_target_ref: Some(vec![AuthSecretTargetRef {
                parameter: "password".into(),
                name: "creds".into(),
                key: "pw".into(),
            }]),
            ..TriggerAuthenticationSpec::default()
        };
        let plan = Plan::new(&BTreeMap::new(), Some(&spec), &scope(None, None)).expect("plan");
        let missing: Objects = [(secret("app", "creds"), None)].into();
        let err = plan
            .apply(BTreeMap::new(), &missing)
            .expect_err("no Secret");
        assert!(matches!(err, TriggerError::Authentication(_)));
        let msg = err.to_string();
        assert!(
            msg.contains("Secret app/creds") && msg.contains("pw"),
            "{msg}"
        );

        let other_key: Objects = [(secret("app", "creds"), data(&[("other", "hunter2")]))].into();
        let err = plan.apply(BTreeMap::new(), &other_key).expect_err("no key");
        let msg = err.to_string();
        assert!(
            msg.contains("has no key pw") && !msg.contains("hunter2"),
            "{msg}"
        );

        let binary: Objects = [(
            secret("app", "creds"),
            Some([("pw".to_owned(), vec![0xff, 0xfe])].into()),
        )]
        .into();
        assert!(plan.apply(BTreeMap::new(), &binary).is_err());
    }

    #[test]
    fn unsupported_sources_are_refused_by_name() {
        let spec = TriggerAuthenticationSpec {
            pod_identity: Some(AuthPodIdentity {
                provider: PodIdentityProvider::Aws,
                identity_id: None,
                identity_tenant_id: None,
                identity_authority_host: None,
                role_arn: None,
                identity_owner: None,
                external_id: None,
            }),
            file_path: Some("/x".into()),
            ..TriggerAuthenticationSpec::default()
        };
        let err =
            Plan::new(&BTreeMap::new(), Some(&spec), &scope(None, None)).expect_err("refused");
        assert!(matches!(err, TriggerError::Unsupported(_)));
        let msg = err.to_string();
        assert!(
            msg.contains("podIdentity") && msg.contains("filePath"),
            "{msg}"
        );
        assert!(msg.contains("app/auth"), "{msg}");
    }

    #[test]
    fn from_env_reads_the_chosen_container() {
        let t = template(vec![
            container("first", vec![env_var("URL", "amqp://first")]),
            container(
                "app",
                vec![
                    env_var("URL", "amqp://shadowed"),
                    env_secret("URL", "rabbit", "url"),
                    env_var("GROUP", "g1"),
                ],
            ),
        ]);
        let metadata = map(&[
            ("hostFromEnv", "URL"),
            ("consumerGroupFromEnv", "GROUP"),
            ("queueName", "q"),
        ]);
        // envSourceContainerName picks `app`; its last URL entry (a secretKeyRef) wins.
        let plan = Plan::new(&metadata, None, &scope(Some(&t), Some("app"))).expect("plan");
        assert_eq!(plan.objects(), [secret("app", "rabbit")].into());
        let objects: Objects =
            [(secret("app", "rabbit"), data(&[("url", "amqp://secret")]))].into();
        let params = plan.apply(metadata.clone(), &objects).expect("resolves");
        assert_eq!(params.lookup("host"), Some(("amqp://secret", Source::Env)));
        assert_eq!(params.get("consumerGroup"), Some("g1"));

        // Without a container name, the first container.
        let plan = Plan::new(
            &map(&[("hostFromEnv", "URL")]),
            None,
            &scope(Some(&t), None),
        )
        .expect("plan");
        let params = plan
            .apply(map(&[("hostFromEnv", "URL")]), &Objects::new())
            .expect("resolves");
        assert_eq!(params.get("host"), Some("amqp://first"));
    }

    #[test]
    fn from_env_errors_name_container_and_variable() {
        let t = template(vec![container("app", vec![env_var("A", "1")])]);
        let metadata = map(&[("hostFromEnv", "MISSING")]);
        let err = Plan::new(&metadata, None, &scope(Some(&t), None)).expect_err("no var");
        assert!(err.to_string().contains("MISSING") && err.to_string().contains("app"));

        let err = Plan::new(&metadata, None, &scope(Some(&t), Some("sidecar")))
            .expect_err("no container");
        assert!(err.to_string().contains("sidecar"), "{err}");

        let err = Plan::new(&metadata, None, &scope(None, None)).expect_err("no template");
        assert!(err.to_string().contains("hostFromEnv"), "{err}");

        let field = template(vec![container(
            "app",
            vec![EnvVar {
                name: "POD".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        api_version: None,
                        field_path: "metadata.name".into(),
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            }],
        )]);
        let err = Plan::new(
            &map(&[("hostFromEnv", "POD")]),
            None,
            &scope(Some(&field), None),
        )
        .expect_err("fieldRef");
        assert!(matches!(err, TriggerError::Unsupported(_)));
        assert!(err.to_string().contains("fieldRef"));
    }

    #[test]
    fn env_from_sources_with_prefix_and_precedence() {
        let mut c = container("app", vec![]);
        c.env_from = Some(vec![
            EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "base".into(),
                    optional: None,
                }),
                prefix: Some("RMQ_".into()),
                secret_ref: None,
            },
            EnvFromSource {
                config_map_ref: None,
                prefix: Some("RMQ_".into()),
                secret_ref: Some(SecretEnvSource {
                    name: "override".into(),
                    optional: Some(true),
                }),
            },
        ]);
        let t = template(vec![c]);
        let metadata = map(&[("hostFromEnv", "RMQ_HOST")]);
        let plan = Plan::new(&metadata, None, &scope(Some(&t), None)).expect("plan");
        // The later envFrom (the optional Secret) is missing: the ConfigMap supplies it.
        let objects: Objects = [
            (secret("app", "override"), None),
            (config_map("app", "base"), data(&[("HOST", "amqp://base")])),
        ]
        .into();
        let params = plan.apply(metadata.clone(), &objects).expect("resolves");
        assert_eq!(params.get("host"), Some("amqp://base"));
        // When the Secret has the key, it wins.
        let objects: Objects = [
            (
                secret("app", "override"),
                data(&[("HOST", "amqp://override")]),
            ),
            (config_map("app", "base"), data(&[("HOST", "amqp://base")])),
        ]
        .into();
        let params = plan.apply(metadata, &objects).expect("resolves");
        assert_eq!(params.get("host"), Some("amqp://override"));
    }

    #[test]
    fn auth_env_source_uses_its_container_name() {
        let t = template(vec![
            container("first", vec![env_var("PASS", "one")]),
            container("second", vec![env_var("PASS", "two")]),
        ]);
        let spec = TriggerAuthenticationSpec {
            env: Some(vec![
                AuthEnvironment {
                    parameter: "password".into(),
                    name: "PASS".into(),
                    container_name: Some("second".into()),
                },
                AuthEnvironment {
                    parameter: "username".into(),
                    name: "PASS".into(),
                    container_name: None,
                },
            ]),
            ..TriggerAuthenticationSpec::default()
        };
        let plan = Plan::new(&BTreeMap::new(), Some(&spec), &scope(Some(&t), None)).expect("plan");
        let params = plan
            .apply(BTreeMap::new(), &Objects::new())
            .expect("resolves");
        assert_eq!(
            params.lookup("password"),
            Some(("two", Source::Authentication))
        );
        assert_eq!(params.get("username"), Some("one"));
    }
}
