//! `TriggerAuthentication` (namespaced) and `ClusterTriggerAuthentication` (cluster
//! scoped): where a trigger's credentials and other parameters come from. Both kinds
//! share one spec type, [`TriggerAuthenticationSpec`], so the scaler resolves either
//! with the same code.
//!
//! The spec has every property of KEDA v2.20.2's, so KEDA objects are accepted as they
//! are. Blink reads only `secretTargetRef`, `configMapTargetRef` and `env`; the other
//! sources (pod identity, vaults, cloud secret managers, bound tokens, files, OAuth2)
//! are typed so such objects are stored, and the scaler refuses a trigger that needs
//! them with a `Ready=False` condition naming the source, rather than guessing.
//!
//! `TriggerAuthentication` comes from kube's derive. `ClusterTriggerAuthentication` is
//! written out by hand (the derive makes one root type per spec type, and the spec must
//! be shared); its CRD is the namespaced one with the names, scope and columns changed,
//! so the two schemas cannot drift apart.

use std::{borrow::Cow, collections::BTreeMap};

use k8s_openapi::{
    ClusterResourceScope,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceColumnDefinition, CustomResourceDefinition,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    CustomResource, CustomResourceExt, Resource,
    core::{ApiResource, object::HasSpec, object::HasStatus},
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a trigger authenticates: the parameter sources of a `TriggerAuthentication` or
/// `ClusterTriggerAuthentication`.
// kube's `printcolumn(…)` entries repeat `type_ = "…"` by design; clippy takes the
// repeats for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "blink.sh",
    version = "v1alpha1",
    kind = "TriggerAuthentication",
    namespaced,
    shortname = "ta",
    shortname = "triggerauth",
    status = "TriggerAuthenticationStatus",
    derive = "PartialEq",
    doc = "TriggerAuthentication says where a trigger's credentials and other parameters \
           come from (KEDA's TriggerAuthentication, in the blink.sh group).",
    printcolumn(
        name = "PodIdentity",
        type_ = "string",
        json_path = ".spec.podIdentity.provider"
    ),
    printcolumn(
        name = "Secret",
        type_ = "string",
        json_path = ".spec.secretTargetRef[*].name"
    ),
    printcolumn(name = "Env", type_ = "string", json_path = ".spec.env[*].name"),
    printcolumn(
        name = "VaultAddress",
        type_ = "string",
        json_path = ".spec.hashiCorpVault.address"
    ),
    printcolumn(
        name = "ScaledObjects",
        type_ = "string",
        json_path = ".status.scaledobjects",
        priority = 1
    ),
    printcolumn(
        name = "ScaledJobs",
        type_ = "string",
        json_path = ".status.scaledjobs",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TriggerAuthenticationSpec {
    /// Parameters from keys of Secrets in the trigger's namespace (Blink reads this).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_target_ref: Option<Vec<AuthSecretTargetRef>>,
    /// Parameters from keys of ConfigMaps in the trigger's namespace (Blink reads this).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_map_target_ref: Option<Vec<AuthConfigMapTargetRef>>,
    /// Parameters from the scale target's container environment (Blink reads this).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<AuthEnvironment>>,

    /// The platform's workload identity (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_identity: Option<AuthPodIdentity>,
    /// HashiCorp Vault (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hashi_corp_vault: Option<HashiCorpVault>,
    /// Azure Key Vault (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub azure_key_vault: Option<AzureKeyVault>,
    /// GCP Secret Manager (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gcp_secret_manager: Option<GcpSecretManager>,
    /// AWS Secrets Manager (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aws_secret_manager: Option<AwsSecretManager>,
    /// Tokens of ServiceAccounts (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound_service_account_token: Option<Vec<BoundServiceAccountToken>>,
    /// A file of parameters as a JSON string map (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_path: Option<String>,
    /// OAuth2 client credentials (KEDA's; refused by Blink).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
}

impl TriggerAuthenticationSpec {
    /// Names (camelCase, as in the spec) of the sources set here that Blink does not
    /// implement; the scaler refuses a trigger that uses this object while any is set.
    pub fn unsupported_sources(&self) -> Vec<&'static str> {
        [
            ("podIdentity", self.pod_identity.is_some()),
            ("hashiCorpVault", self.hashi_corp_vault.is_some()),
            ("azureKeyVault", self.azure_key_vault.is_some()),
            ("gcpSecretManager", self.gcp_secret_manager.is_some()),
            ("awsSecretManager", self.aws_secret_manager.is_some()),
            (
                "boundServiceAccountToken",
                self.bound_service_account_token.is_some(),
            ),
            ("filePath", self.file_path.is_some()),
            ("oauth2", self.oauth2.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

/// Which objects use a `TriggerAuthentication` (KEDA's status).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TriggerAuthenticationStatus {
    /// Comma-separated names of the ScaledObjects that use it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaledobjects: Option<String>,
    /// Comma-separated names of the ScaledJobs that use it (KEDA's; Blink has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaledjobs: Option<String>,
}

/// A parameter from a key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct AuthSecretTargetRef {
    /// The trigger parameter it supplies (`host`, `password`, …).
    pub parameter: String,
    /// The Secret's name.
    pub name: String,
    /// The key in the Secret.
    pub key: String,
}

/// A parameter from a key of a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct AuthConfigMapTargetRef {
    /// The trigger parameter it supplies.
    pub parameter: String,
    /// The ConfigMap's name.
    pub name: String,
    /// The key in the ConfigMap.
    pub key: String,
}

/// A parameter from an environment variable of the scale target's container.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthEnvironment {
    /// The trigger parameter it supplies.
    pub parameter: String,
    /// The variable's name.
    pub name: String,
    /// The container (default: `scaleTargetRef.envSourceContainerName`, else the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
}

/// KEDA's `AuthPodIdentity`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthPodIdentity {
    /// The identity provider.
    pub provider: PodIdentityProvider,
    /// Identity (client) id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_id: Option<String>,
    /// Azure tenant id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_tenant_id: Option<String>,
    /// Azure authority host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_authority_host: Option<String>,
    /// AWS role to assume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role_arn: Option<String>,
    /// Whose identity is used in auto discovery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_owner: Option<IdentityOwner>,
    /// AWS external id used when assuming `roleArn`.
    #[serde(rename = "externalID", skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

/// The identity provider of a `podIdentity`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PodIdentityProvider {
    /// Azure workload identity.
    AzureWorkload,
    /// GCP workload identity.
    Gcp,
    /// AWS (IRSA or a role).
    Aws,
    /// AWS EKS pod identity.
    AwsEks,
    /// None.
    None,
}

/// Whose identity a `podIdentity` uses in auto discovery: the autoscaler's or the
/// workload's.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdentityOwner {
    /// The autoscaler's identity.
    Keda,
    /// The scaled workload's identity.
    Workload,
}

/// A value read from a key of a Secret (`valueFrom.secretKeyRef`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValueFromSecret {
    /// Where the value comes from.
    pub value_from: ValueFrom,
}

/// `valueFrom` of a [`ValueFromSecret`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValueFrom {
    /// The Secret key.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The key in the Secret.
    pub key: String,
}

/// KEDA's `hashiCorpVault`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HashiCorpVault {
    /// Vault's address.
    pub address: String,
    /// Vault's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// How to log in.
    pub authentication: VaultAuthentication,
    /// Role for Kubernetes authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Mount path of the auth method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Credentials for the chosen method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<VaultCredential>,
    /// Parameters from Vault paths.
    #[schemars(length(min = 1))]
    pub secrets: Vec<VaultSecret>,
}

/// How to log in to Vault.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VaultAuthentication {
    /// A Vault token.
    Token,
    /// A Kubernetes ServiceAccount.
    Kubernetes,
}

/// Credentials for Vault's login method.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultCredential {
    /// A Vault token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Path of a ServiceAccount token file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// Name of a ServiceAccount.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// One parameter from a Vault path.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultSecret {
    /// The trigger parameter it supplies.
    pub parameter: String,
    /// The Vault path.
    pub path: String,
    /// The key at the path.
    pub key: String,
    /// The secret engine.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub secret_type: Option<VaultSecretType>,
    /// PKI request data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pki_data: Option<VaultPkiData>,
}

/// Vault's secret engine for one secret (empty: detected).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum VaultSecretType {
    /// Unset: the engine is detected.
    #[serde(rename = "")]
    Unset,
    /// KV version 2.
    #[serde(rename = "secretV2")]
    SecretV2,
    /// KV version 1.
    #[serde(rename = "secret")]
    Secret,
    /// PKI.
    #[serde(rename = "pki")]
    Pki,
}

/// PKI request data for a Vault secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VaultPkiData {
    /// Common name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub common_name: Option<String>,
    /// Subject alternative names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alt_names: Option<String>,
    /// IP SANs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_sans: Option<String>,
    /// URI SANs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri_sans: Option<String>,
    /// Other SANs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_sans: Option<String>,
    /// Time to live.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// KEDA's `azureKeyVault`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureKeyVault {
    /// The vault's URI.
    pub vault_uri: String,
    /// Service principal credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<AzureKeyVaultCredentials>,
    /// Workload identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_identity: Option<AuthPodIdentity>,
    /// Parameters from vault secrets.
    #[schemars(length(min = 1))]
    pub secrets: Vec<AzureKeyVaultSecret>,
    /// The Azure cloud.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud: Option<AzureKeyVaultCloudInfo>,
}

/// Service principal credentials for Azure Key Vault.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureKeyVaultCredentials {
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: ValueFromSecret,
    /// Tenant id.
    pub tenant_id: String,
}

/// One parameter from an Azure Key Vault secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct AzureKeyVaultSecret {
    /// The trigger parameter it supplies.
    pub parameter: String,
    /// The secret's name.
    pub name: String,
    /// The secret's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The Azure cloud of a Key Vault.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureKeyVaultCloudInfo {
    /// Cloud type.
    #[serde(rename = "type")]
    pub cloud_type: String,
    /// Key Vault resource URL.
    #[serde(
        rename = "keyVaultResourceURL",
        skip_serializing_if = "Option::is_none"
    )]
    pub key_vault_resource_url: Option<String>,
    /// Active Directory endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_directory_endpoint: Option<String>,
}

/// KEDA's `gcpSecretManager`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcpSecretManager {
    /// Parameters from secrets.
    #[schemars(length(min = 1))]
    pub secrets: Vec<GcpSecretManagerSecret>,
    /// Service account key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<GcpCredentials>,
    /// Workload identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_identity: Option<AuthPodIdentity>,
}

/// One parameter from a GCP Secret Manager secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct GcpSecretManagerSecret {
    /// The trigger parameter it supplies.
    pub parameter: String,
    /// The secret's id.
    pub id: String,
    /// The secret's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Service account key for GCP Secret Manager.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcpCredentials {
    /// Service account key.
    pub client_secret: ValueFromSecret,
}

/// KEDA's `awsSecretManager`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsSecretManager {
    /// Parameters from secrets.
    #[schemars(length(min = 1))]
    pub secrets: Vec<AwsSecretManagerSecret>,
    /// Access keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<AwsSecretManagerCredentials>,
    /// Workload identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_identity: Option<AuthPodIdentity>,
    /// AWS region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Access keys for AWS Secrets Manager.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsSecretManagerCredentials {
    /// Access key id.
    pub access_key: ValueFromSecret,
    /// Secret access key.
    pub access_secret_key: ValueFromSecret,
    /// Session token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token: Option<ValueFromSecret>,
}

/// One parameter from an AWS Secrets Manager secret.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsSecretManagerSecret {
    /// The trigger parameter it supplies.
    pub parameter: String,
    /// The secret's name.
    pub name: String,
    /// Version id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// Version stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_stage: Option<String>,
    /// Key inside a JSON secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
}

/// A parameter from a token of a ServiceAccount.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BoundServiceAccountToken {
    /// The trigger parameter it supplies.
    pub parameter: String,
    /// The ServiceAccount.
    pub service_account_name: String,
}

/// KEDA's `oauth2`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OAuth2 {
    /// The grant.
    #[serde(rename = "type")]
    pub grant_type: OAuth2Type,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<ValueFromSecret>,
    /// Token endpoint.
    pub token_url: String,
    /// Scopes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Extra token request parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_url_params: Option<BTreeMap<String, String>>,
}

/// The OAuth2 grant.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OAuth2Type {
    /// The client credentials grant.
    ClientCredentials,
}

/// A cluster-wide `TriggerAuthentication`: the same spec, usable from any namespace.
#[derive(Deserialize, Clone, Debug, PartialEq)]
pub struct ClusterTriggerAuthentication {
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// The parameter sources.
    pub spec: TriggerAuthenticationSpec,
    /// Which objects use it.
    #[serde(default)]
    pub status: Option<TriggerAuthenticationStatus>,
}

impl ClusterTriggerAuthentication {
    /// A new object named `name`.
    pub fn new(name: &str, spec: TriggerAuthenticationSpec) -> Self {
        Self {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }
}

// Written like kube's derive writes it: `apiVersion` and `kind` come from the type,
// never from stored fields, so an object always says what it is.
impl Serialize for ClusterTriggerAuthentication {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut obj = ser.serialize_struct(
            "ClusterTriggerAuthentication",
            4 + usize::from(self.status.is_some()),
        )?;
        obj.serialize_field("apiVersion", &Self::api_version(&()))?;
        obj.serialize_field("kind", &Self::kind(&()))?;
        obj.serialize_field("metadata", &self.metadata)?;
        obj.serialize_field("spec", &self.spec)?;
        if let Some(status) = &self.status {
            obj.serialize_field("status", status)?;
        }
        obj.end()
    }
}

impl Resource for ClusterTriggerAuthentication {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ClusterTriggerAuthentication".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        crate::GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        crate::VERSION.into()
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        crate::API_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "clustertriggerauthentications".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl HasSpec for ClusterTriggerAuthentication {
    type Spec = TriggerAuthenticationSpec;

    fn spec(&self) -> &TriggerAuthenticationSpec {
        &self.spec
    }

    fn spec_mut(&mut self) -> &mut TriggerAuthenticationSpec {
        &mut self.spec
    }
}

impl HasStatus for ClusterTriggerAuthentication {
    type Status = TriggerAuthenticationStatus;

    fn status(&self) -> Option<&TriggerAuthenticationStatus> {
        self.status.as_ref()
    }

    fn status_mut(&mut self) -> &mut Option<TriggerAuthenticationStatus> {
        &mut self.status
    }
}

impl CustomResourceExt for ClusterTriggerAuthentication {
    fn crd() -> CustomResourceDefinition {
        let mut crd = TriggerAuthentication::crd();
        crd.metadata.name = Some(Self::crd_name().to_owned());
        crd.spec.scope = "Cluster".to_owned();
        let names = &mut crd.spec.names;
        names.kind = "ClusterTriggerAuthentication".to_owned();
        names.plural = "clustertriggerauthentications".to_owned();
        names.singular = Some("clustertriggerauthentication".to_owned());
        names.short_names = Some(Self::shortnames().iter().map(|s| (*s).to_owned()).collect());
        for version in &mut crd.spec.versions {
            // KEDA's cluster kind shows `filePath` after `Env`; keep its columns.
            if let Some(columns) = &mut version.additional_printer_columns {
                let at = columns
                    .iter()
                    .position(|c| c.name == "Env")
                    .map_or(columns.len(), |i| i + 1);
                columns.insert(
                    at,
                    CustomResourceColumnDefinition {
                        name: "FilePath".to_owned(),
                        type_: "string".to_owned(),
                        json_path: ".spec.filePath".to_owned(),
                        ..CustomResourceColumnDefinition::default()
                    },
                );
            }
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                schema.title = Some("ClusterTriggerAuthentication".to_owned());
                schema.description = Some(
                    "ClusterTriggerAuthentication says where a trigger's credentials and \
                     other parameters come from, for triggers in any namespace (KEDA's \
                     ClusterTriggerAuthentication, in the blink.sh group)."
                        .to_owned(),
                );
            }
        }
        crd
    }

    fn crd_name() -> &'static str {
        "clustertriggerauthentications.blink.sh"
    }

    fn api_resource() -> ApiResource {
        ApiResource::erase::<Self>(&())
    }

    fn shortnames() -> &'static [&'static str] {
        &["cta", "clustertriggerauth"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_kind_is_cluster_scoped_with_same_schema() {
        let ta = TriggerAuthentication::crd();
        let cta = ClusterTriggerAuthentication::crd();
        assert_eq!(cta.spec.scope, "Cluster");
        assert_eq!(ta.spec.scope, "Namespaced");
        assert_eq!(
            cta.metadata.name.as_deref(),
            Some("clustertriggerauthentications.blink.sh")
        );
        assert_eq!(cta.spec.names.kind, "ClusterTriggerAuthentication");
        let props = |crd: &CustomResourceDefinition| {
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| s.properties.clone())
        };
        assert_eq!(props(&ta), props(&cta));
        assert_eq!(
            ClusterTriggerAuthentication::api_resource().plural,
            "clustertriggerauthentications"
        );
    }

    #[test]
    fn cluster_kind_serializes_type_fields() {
        let cta = ClusterTriggerAuthentication::new("shared", TriggerAuthenticationSpec::default());
        let json = serde_json::to_value(&cta).expect("serializes");
        assert_eq!(json["apiVersion"], "blink.sh/v1alpha1");
        assert_eq!(json["kind"], "ClusterTriggerAuthentication");
        let back: ClusterTriggerAuthentication = serde_json::from_value(json).expect("parses");
        assert_eq!(back, cta);
    }

    #[test]
    fn unsupported_sources_are_named() {
        let spec: TriggerAuthenticationSpec = serde_yaml::from_str(
            r#"
secretTargetRef: [{parameter: host, name: s, key: host}]
podIdentity: {provider: aws}
filePath: /etc/keda/params.json
"#,
        )
        .expect("valid");
        assert_eq!(spec.unsupported_sources(), vec!["podIdentity", "filePath"]);
        assert!(
            TriggerAuthenticationSpec::default()
                .unsupported_sources()
                .is_empty()
        );
    }
}
