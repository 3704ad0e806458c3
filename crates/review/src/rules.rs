//! The rules as data (`resources/review/rules.toml`) and the policy that turns risk into a
//! decision.

use std::collections::BTreeMap;

use fleetbox_proto::{Decision, Finding, Severity};
use serde::Deserialize;

/// Built-in checks a rule may name (`check = "..."`).
pub const CHECKS: &[&str] = &[
    "dynamic_exec",
    "exec_decoded",
    "dynamic_import",
    "dynamic_getattr",
    "builtins_access",
    "write_outside",
    "environ_dump",
    "fork_loop",
    "recursion_limit",
    "long_string",
    "chr_chain",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub id: String,
    pub severity: Severity,
    pub description: String,
    /// Qualified names called (globs).
    #[serde(default)]
    pub calls: Vec<String>,
    /// Modules imported (globs).
    #[serde(default)]
    pub imports: Vec<String>,
    /// Substrings of string literals.
    #[serde(default)]
    pub strings: Vec<String>,
    /// A built-in check ([`CHECKS`]).
    #[serde(default)]
    pub check: Option<String>,
    /// A known attack's shape: fires when every rule named here fired (a network client and
    /// a started program: a reverse shell; a network client and computed code: download and
    /// execute). Its weight adds to theirs.
    #[serde(default)]
    pub all: Vec<String>,
    /// A program the rule must flag.
    pub fires: String,
    /// A program it must not.
    pub passes: String,
}

/// Risk thresholds: the strongest decision whose threshold the risk reaches.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub run_on_server_only: u32,
    pub hold: u32,
    pub reject: u32,
}

impl Policy {
    pub fn decide(&self, risk: u32) -> Decision {
        if risk >= self.reject {
            Decision::Reject
        } else if risk >= self.hold {
            Decision::Hold
        } else if risk >= self.run_on_server_only {
            Decision::RunOnServerOnly
        } else {
            Decision::Run
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    policy: Policy,
    #[serde(rename = "rule")]
    rules: Vec<Rule>,
}

/// A checked set of rules with its policy.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub policy: Policy,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RulesError {
    #[error("the review rules do not parse: {0}")]
    Parse(String),
    #[error("review rule `{id}`: {why}")]
    Invalid { id: String, why: String },
}

impl RuleSet {
    pub fn parse(text: &str) -> Result<RuleSet, RulesError> {
        let file: File = toml::from_str(text).map_err(|e| RulesError::Parse(e.to_string()))?;
        let mut seen = BTreeMap::new();
        for r in &file.rules {
            let invalid = |why: &str| RulesError::Invalid {
                id: r.id.clone(),
                why: why.into(),
            };
            if seen.insert(r.id.clone(), ()).is_some() {
                return Err(invalid("is defined twice"));
            }
            if r.calls.is_empty()
                && r.imports.is_empty()
                && r.strings.is_empty()
                && r.check.is_none()
                && r.all.is_empty()
            {
                return Err(invalid(
                    "matches nothing (give calls, imports, strings, check or all)",
                ));
            }
            if let Some(unknown) = r.all.iter().find(|id| {
                !file
                    .rules
                    .iter()
                    .any(|other| &other.id == *id && other.all.is_empty())
            }) {
                return Err(invalid(&format!(
                    "`all` names `{unknown}`, which is not a rule of its own (compound rules name plain ones)"
                )));
            }
            if let Some(c) = &r.check
                && !CHECKS.contains(&c.as_str())
            {
                return Err(invalid(&format!(
                    "unknown check `{c}` (known: {})",
                    CHECKS.join(", ")
                )));
            }
        }
        let p = file.policy;
        if !(p.run_on_server_only <= p.hold && p.hold <= p.reject) {
            return Err(RulesError::Parse(
                "policy thresholds must be run_on_server_only <= hold <= reject".into(),
            ));
        }
        Ok(RuleSet {
            policy: p,
            rules: file.rules,
        })
    }

    /// The weights of the rules that fired, each rule once, capped at 100.
    pub fn risk(&self, findings: &[Finding]) -> u32 {
        let mut by_rule: BTreeMap<&str, u32> = BTreeMap::new();
        for f in findings {
            let w = by_rule.entry(f.rule.as_str()).or_default();
            *w = (*w).max(f.severity.weight());
        }
        by_rule.values().sum::<u32>().min(100)
    }
}

/// `pattern` against `name`: `*` matches any run of characters.
pub fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else {
                return false;
            };
            if tail.is_empty() {
                return true;
            }
            (0..=rest.len())
                .filter(|i| rest.is_char_boundary(*i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("subprocess.*", "subprocess.run"));
        assert!(glob("os.exec*", "os.execvp"));
        assert!(!glob("os.exec*", "os.getcwd"));
        assert!(glob("socket", "socket"));
        assert!(!glob("socket", "socketserver"));
        assert!(glob("a*b*c", "axxbyyc"));
    }

    #[test]
    fn bad_rule_files_are_refused_naming_the_rule() {
        let base = "[policy]\nrun_on_server_only = 1\nhold = 2\nreject = 3\n";
        let rule = |extra: &str| {
            format!(
                "{base}[[rule]]\nid = \"r\"\nseverity = \"low\"\ndescription = \"d\"\nfires = \"\"\npasses = \"\"\n{extra}"
            )
        };
        assert!(RuleSet::parse(&rule("calls = [\"x\"]")).is_ok());
        let e = RuleSet::parse(&rule("")).unwrap_err().to_string();
        assert!(e.contains("`r`") && e.contains("matches nothing"), "{e}");
        let e = RuleSet::parse(&rule("check = \"nope\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown check"), "{e}");
        assert!(RuleSet::parse("not toml [").is_err());
    }
}
