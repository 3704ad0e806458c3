//! Tenants, their caps, and the tokens that speak for them (`/v1/tenants`, `/v1/tokens`).

use serde::{Deserialize, Serialize};

/// What a user token may do. Every endpoint needs exactly one of these (see `docs/SECURITY.md`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// List and read jobs, shards, results, blobs, receipts, flags, agents and the audit log.
    Read,
    /// Submit, run, cancel, pause, resume, re-prioritise and re-run jobs; review code.
    Submit,
    /// Decide review flags: approve, reject, re-run.
    Review,
    /// Manage the tenant: tokens, agents (release, quarantine, harden), audit pruning. In the
    /// `default` tenant it also manages every tenant (the operator).
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Submit, Scope::Review, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Submit => "submit",
            Scope::Review => "review",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|k| k.as_str() == s.trim())
    }

    /// `read,submit` → the scopes, sorted and without repeats; the unknown word on failure.
    pub fn parse_list(s: &str) -> Result<Vec<Scope>, String> {
        let mut out = Vec::new();
        for word in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            out.push(Scope::parse(word).ok_or_else(|| word.to_string())?);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The stored form: `read,submit`.
    pub fn join(scopes: &[Scope]) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A tenant's caps; `None` is no cap.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantCaps {
    /// Shards of the tenant leased at once, over every agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running_shards: Option<u64>,
    /// Shards submitted in any 24 hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_shards_per_day: Option<u64>,
    /// CPU seconds its shards reported in the last 24 hours; past it, submissions are refused
    /// and no more of its shards are leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_seconds_per_day: Option<u64>,
    /// Bytes of blobs it owns (outputs, streams and files its shards kept, its results); past
    /// it, submissions are refused and no more of its shards are leased.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blob_bytes: Option<u64>,
    /// Submissions (`POST /v1/jobs`, `/v1/run`) a second, per coordinator; above it `429`
    /// with `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submit_rate: Option<f64>,
    /// Its share of shared agents against other tenants with work (default 1): a tenant of
    /// weight 3 runs three shards for every one of a tenant of weight 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// `POST /v1/tenants` (the operator only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantCreate {
    /// Lowercase letters, digits, `-` and `_`, at most 40: the tenant's id.
    pub name: String,
    #[serde(default)]
    pub caps: TenantCaps,
}

/// `POST /v1/tenants/{id}`: caps to change. A field left out keeps its value; `clear` names
/// caps to remove.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantUpdate {
    #[serde(default)]
    pub caps: TenantCaps,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clear: Vec<String>,
}

/// A tenant, with what it has used against its caps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantView {
    pub id: String,
    pub created_at: i64,
    pub caps: TenantCaps,
    /// Its shards leased now.
    pub running_shards: u64,
    /// Shards it submitted in the last 24 hours.
    pub shards_today: u64,
    /// CPU seconds its shards reported in the last 24 hours.
    pub cpu_seconds_today: f64,
    /// Bytes of the blobs it owns.
    #[serde(default)]
    pub blob_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantView>,
}

/// `POST /v1/tokens`: a user token (`scopes`) or an enrolment token (`enroll`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    /// The tenant it speaks for (default: the caller's). Another tenant's needs the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What it may do (a user token); empty for an enrolment token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<Scope>,
    /// An enrolment token: agents enrolled with it belong to the tenant.
    #[serde(default)]
    pub enroll: bool,
    /// How many agents it may enrol (enrolment tokens only; default unbounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u64>,
    /// The pool its agents join (enrolment tokens only; default the tenant's own pool, which
    /// for the `default` tenant is the shared `default`). The tenant must own it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Seconds it works for (default: no end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// A token as listed: never its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    pub tenant: String,
    /// `user`, `admin` (the bootstrap token), `enroll`, `enroll_own` or `agent`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Vec<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses_left: Option<u64>,
    /// The pool an enrolment token's agents join.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// A token just made (or rotated): the only time its secret is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenIssued {
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// `POST /v1/pools`: a pool of agents. Shared pools (the operator's) serve every tenant; a
/// tenant's own serves only it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolCreate {
    /// Lowercase letters, digits, `-` and `_`, at most 40.
    pub name: String,
    /// The owner (default: the caller's tenant; another needs the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Serves every tenant (the operator's pools only).
    #[serde(default)]
    pub shared: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolView {
    pub name: String,
    pub tenant: String,
    pub shared: bool,
    pub created_at: i64,
    /// Its agents online now.
    pub agents_online: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolList {
    pub pools: Vec<PoolView>,
}

/// `GET /v1/whoami`: the caller's tenant and what its token may do (the panel hides the rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Whoami {
    pub tenant: String,
    pub token_id: String,
    pub kind: String,
    pub scopes: Vec<Scope>,
    /// Admin of the `default` tenant: manages every tenant.
    pub operator: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// Whether `name` may name a tenant: 1–40 of `a-z 0-9 - _`, starting with a letter or digit.
pub fn valid_tenant_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_lists_parse_sorted_and_name_the_unknown_word() {
        assert_eq!(
            Scope::parse_list("submit, read,read").unwrap(),
            vec![Scope::Read, Scope::Submit]
        );
        assert_eq!(Scope::parse_list("read,root").unwrap_err(), "root");
        assert_eq!(Scope::join(&[Scope::Read, Scope::Admin]), "read,admin");
    }

    #[test]
    fn tenant_names_are_plain() {
        assert!(valid_tenant_name("acme-2"));
        for bad in ["", "Acme", "a/b", "-x", "x y", &"a".repeat(41), "ä"] {
            assert!(!valid_tenant_name(bad), "{bad}");
        }
    }
}
