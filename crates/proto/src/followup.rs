//! Follow-up rules (`[[followup]]` in a job spec): what a finished job starts by itself.
//!
//! The structure is checked here (pure); the rules' CEL expressions are compiled and
//! type-checked by the coordinator's planner, which also evaluates them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::{JobSpec, SpecError};

/// Most rules one spec may carry.
pub const MAX_RULES: usize = 16;
/// The deepest chain any rule may ask for (`max_depth`); the coordinator may cap lower.
pub const MAX_DEPTH: u32 = 64;
/// Longest expression accepted.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// The names an `input` table may build.
pub const INPUT_KEYS: &[&str] = &["items", "count"];

/// One `[[followup]]` rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FollowupRule {
    /// Shown in the chain and the audit log; `followup[i]` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A CEL expression over `summary`, `result` and `job`; the rule fires when it is true.
    pub when: String,
    /// What it does: a new job (`then`, the default), `rerun_failed` or `notify`.
    #[serde(default)]
    pub action: FollowupAction,
    /// The child job: an inline job spec, or `"self"` (this rule's own spec again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<Value>,
    /// A job spec file, read by the client and sent as `then`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_file: Option<String>,
    /// The child's shards built from the parent: `items` (a list) or `count` (an int), each a
    /// CEL expression.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input: BTreeMap<String, String>,
    /// The deepest the chain may grow through this rule (the root is depth 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    /// `notify`: where the job's summary is POSTed (`https://` or `http://`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FollowupAction {
    /// Submit `then` as a child job.
    #[default]
    Job,
    /// A child job of only the failed and dead shards, with the same code; its result is the
    /// parent's accepted values merged with its own.
    RerunFailed,
    /// POST the job's summary to `url`, retried with back-off.
    Notify,
}

impl FollowupAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FollowupAction::Job => "job",
            FollowupAction::RerunFailed => "rerun_failed",
            FollowupAction::Notify => "notify",
        }
    }
}

/// What `then` names once validated.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildSpec {
    /// This rule's own job spec again.
    SelfSpec,
    Inline(Box<JobSpec>),
}

impl FollowupRule {
    /// The rule's name, or `followup[index]`.
    pub fn display_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("followup[{index}]"))
    }

    /// The child spec `then` holds, parsed (errors name the field under `field`).
    pub fn child(&self, field: &str) -> Result<Option<ChildSpec>, SpecError> {
        let Some(then) = &self.then else {
            return Ok(None);
        };
        if then.as_str() == Some("self") {
            return Ok(Some(ChildSpec::SelfSpec));
        }
        if !then.is_object() {
            return Err(SpecError::new(
                format!("{field}.then"),
                "must be a job spec (a table) or \"self\"",
            ));
        }
        let bytes = serde_json::to_vec(then).unwrap_or_default();
        JobSpec::from_json(&bytes)
            .map(|s| Some(ChildSpec::Inline(Box::new(s))))
            .map_err(|e| SpecError::new(format!("{field}.then.{}", e.field), e.message))
    }

    /// Check the rule's structure; `field` is where it sits (`followup[0]`).
    pub fn validate(&self, field: &str) -> Result<(), SpecError> {
        let at = |name: &str| format!("{field}.{name}");
        if let Some(name) = &self.name
            && (name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control))
        {
            return Err(SpecError::new(
                at("name"),
                "must be 1 to 200 bytes without control characters",
            ));
        }
        for (name, text) in std::iter::once(("when".to_string(), &self.when))
            .chain(self.input.iter().map(|(k, v)| (format!("input.{k}"), v)))
        {
            if text.trim().is_empty() {
                return Err(SpecError::new(at(&name), "must not be empty"));
            }
            if text.len() > MAX_EXPRESSION_BYTES {
                return Err(SpecError::new(
                    at(&name),
                    format!("is longer than {MAX_EXPRESSION_BYTES} bytes"),
                ));
            }
        }
        if let Some(key) = self
            .input
            .keys()
            .find(|k| !INPUT_KEYS.contains(&k.as_str()))
        {
            return Err(SpecError::new(
                at(&format!("input.{key}")),
                format!("unknown input (expected one of: {})", INPUT_KEYS.join(", ")),
            ));
        }
        if self.input.len() > 1 {
            return Err(SpecError::new(
                at("input"),
                "give one of `items` or `count`, not both",
            ));
        }
        if let Some(d) = self.max_depth
            && !(1..=MAX_DEPTH).contains(&d)
        {
            return Err(SpecError::new(
                at("max_depth"),
                format!("must be between 1 and {MAX_DEPTH}"),
            ));
        }
        if let Some(file) = &self.job_file {
            return Err(SpecError::new(
                at("job_file"),
                format!(
                    "`{file}` must be read by the client and sent as `then` (`fleetbox submit` does this)"
                ),
            ));
        }
        let needs = |what: &str, why: &str| Err(SpecError::new(at(what), why.to_string()));
        match self.action {
            FollowupAction::Job => {
                let child = self.child(field)?;
                let Some(child) = child else {
                    return needs(
                        "then",
                        "a `job` follow-up needs `then` (an inline job spec or \"self\") or `job_file`",
                    );
                };
                if self.url.is_some() {
                    return needs("url", "only a `notify` follow-up has a `url`");
                }
                if let ChildSpec::Inline(spec) = child {
                    let mut spec = *spec;
                    // The shards are built from the parent: stand in for them while checking.
                    if self.input.contains_key("items") {
                        spec.shards = crate::ShardSpec {
                            items: Some(vec![Value::Null]),
                            per_shard: spec.shards.per_shard,
                            ..Default::default()
                        };
                    } else if self.input.contains_key("count") {
                        spec.shards = crate::ShardSpec {
                            count: Some(1),
                            ..Default::default()
                        };
                    }
                    spec.plan().map_err(|e| {
                        SpecError::new(format!("{field}.then.{}", e.field), e.message)
                    })?;
                }
            }
            FollowupAction::RerunFailed => {
                for (what, set) in [
                    ("then", self.then.is_some()),
                    ("input", !self.input.is_empty()),
                    ("url", self.url.is_some()),
                ] {
                    if set {
                        return needs(
                            what,
                            "`rerun_failed` re-runs the parent's failed shards with its code: it takes no `then`, `input` or `url`",
                        );
                    }
                }
            }
            FollowupAction::Notify => {
                for (what, set) in [
                    ("then", self.then.is_some()),
                    ("input", !self.input.is_empty()),
                ] {
                    if set {
                        return needs(what, "a `notify` follow-up only has a `url`");
                    }
                }
                let Some(url) = &self.url else {
                    return needs("url", "a `notify` follow-up needs a `url`");
                };
                check_url(url).map_err(|why| SpecError::new(at("url"), why))?;
            }
        }
        Ok(())
    }
}

/// A webhook address Fleetbox can POST to: `http(s)://host[:port]/path`.
pub fn check_url(url: &str) -> Result<(), String> {
    if url.len() > 2048 || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must be at most 2048 bytes without spaces or control characters".into());
    }
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return Err("must start with `https://` or `http://`".into());
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.contains('@') {
        return Err("must name a host (and no user:password@)".into());
    }
    Ok(())
}

/// Check every rule of a spec.
pub fn validate_rules(rules: &[FollowupRule]) -> Result<(), SpecError> {
    if rules.len() > MAX_RULES {
        return Err(SpecError::new(
            "followup",
            format!("at most {MAX_RULES} rules"),
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        rule.validate(&format!("followup[{i}]"))?;
    }
    Ok(())
}

/// Where a follow-up job came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lineage {
    pub parent_job_id: String,
    pub root_job_id: String,
    /// The root is 0; its children 1.
    pub depth: u32,
    /// Index of the parent's rule that made it.
    pub rule_index: u32,
    /// That rule's name.
    pub rule: String,
}

/// A `rerun_failed` child: which of the parent's shards its shards are, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RerunOf {
    pub job_id: String,
    pub shards: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> FollowupRule {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn a_job_rule_needs_a_valid_child_spec() {
        let r = rule("when = 'true'");
        assert_eq!(
            r.validate("followup[0]").unwrap_err().field,
            "followup[0].then"
        );
        let r = rule(
            "when = 'true'\n[then]\nname = 'x'\ncode = 'print(1)'\n[then.shards]\ncount = 0\n",
        );
        let e = r.validate("followup[0]").unwrap_err();
        assert!(e.field.starts_with("followup[0].then.shards"), "{e}");
        let r = rule(
            "when = 'true'\n[input]\nitems = 'result'\n[then]\nname = 'x'\ncode = 'print(1)'\n[then.shards]\n",
        );
        r.validate("followup[0]").unwrap();
        let r = rule("when = 'true'\nthen = 'self'\n");
        r.validate("followup[0]").unwrap();
        let r = rule("when = 'true'\nthen = 'other'\n");
        assert!(r.validate("followup[0]").is_err());
    }

    #[test]
    fn inputs_and_actions_are_checked_by_name() {
        let r = rule("when = 'true'\nthen = 'self'\n[input]\nrows = 'result'\n");
        assert_eq!(r.validate("f").unwrap_err().field, "f.input.rows");
        let r = rule("when = 'true'\naction = 'rerun_failed'\nthen = 'self'\n");
        assert_eq!(r.validate("f").unwrap_err().field, "f.then");
        let r = rule("when = 'true'\naction = 'notify'\n");
        assert_eq!(r.validate("f").unwrap_err().field, "f.url");
        let r = rule("when = 'true'\naction = 'notify'\nurl = 'ftp://x'\n");
        assert!(r.validate("f").unwrap_err().message.contains("https://"));
        rule("when = 'true'\naction = 'notify'\nurl = 'https://hooks.example/x'\n")
            .validate("f")
            .unwrap();
        rule("when = 'true'\naction = 'notify'\nurl = 'http://127.0.0.1:9/hook'\n")
            .validate("f")
            .unwrap();
        let r = rule("when = 'true'\nthen = 'self'\nmax_depth = 0\n");
        assert_eq!(r.validate("f").unwrap_err().field, "f.max_depth");
        let r = rule("when = '  '\nthen = 'self'\n");
        assert_eq!(r.validate("f").unwrap_err().field, "f.when");
    }
}
