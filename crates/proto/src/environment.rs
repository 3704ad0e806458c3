//! `[environment]`: the Python packages a job's program needs.
//!
//! Each agent (and the coordinator, for its re-checks) builds the environment once per
//! [`EnvironmentSpec::hash`] into a virtual environment on its own interpreter, and every shard
//! that asks for it runs on that interpreter with the environment bound read-only. Requirements
//! name packages of the package index the agent is configured with: options (`-r`, `-e`,
//! `--index-url`) and direct URLs or paths are refused, so a job cannot point an agent's build at
//! a file or a server of its choosing.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::SpecError;

/// Most requirements one environment may list.
pub const MAX_REQUIREMENTS: usize = 200;
/// Longest requirement line.
pub const MAX_REQUIREMENT_BYTES: usize = 200;

/// The packages a job asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentSpec {
    /// PEP 508 requirements (`"numpy==1.26.4"`, `"sympy>=1.12"`), from the agent's index.
    #[serde(default)]
    pub requirements: Vec<String>,
    /// A `requirements.txt`, read by the client (relative to the spec file) and sent as
    /// `requirements`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements_file: Option<String>,
}

/// The environment a run used, as its report names it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvironmentInfo {
    /// [`EnvironmentSpec::hash`]: the same on every machine for the same requirements.
    pub hash: String,
    /// What the installer resolved, sorted by name.
    pub packages: Vec<Package>,
}

/// One installed distribution.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl EnvironmentSpec {
    /// Requirements from the text of a `requirements.txt`: one per line, `#` comments and
    /// blank lines skipped; option lines are refused (the agent's index decides where
    /// packages come from).
    pub fn parse_requirements_txt(text: &str) -> Result<Vec<String>, SpecError> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = match line
                .find(" #")
                .or_else(|| line.starts_with('#').then_some(0))
            {
                Some(at) => &line[..at],
                None => line,
            }
            .trim();
            if line.is_empty() {
                continue;
            }
            check_requirement(line).map_err(|why| {
                SpecError::new(
                    "environment.requirements_file",
                    format!("line {}: `{line}` {why}", i + 1),
                )
            })?;
            out.push(line.to_string());
        }
        Ok(out)
    }

    /// Check what a coordinator stores: a non-empty list of plain requirements.
    pub fn validate(&self) -> Result<(), SpecError> {
        if let Some(path) = &self.requirements_file {
            return Err(SpecError::new(
                "environment.requirements_file",
                format!(
                    "`{path}` must be read by the client and sent as `requirements` (`fleetbox submit` does this)"
                ),
            ));
        }
        if self.requirements.is_empty() {
            return Err(SpecError::new(
                "environment.requirements",
                "must list at least one package (leave `[environment]` out to use the host's packages)",
            ));
        }
        if self.requirements.len() > MAX_REQUIREMENTS {
            return Err(SpecError::new(
                "environment.requirements",
                format!("at most {MAX_REQUIREMENTS} requirements"),
            ));
        }
        for (i, r) in self.requirements.iter().enumerate() {
            check_requirement(r.trim()).map_err(|why| {
                SpecError::new(
                    format!("environment.requirements[{i}]"),
                    format!("`{r}` {why}"),
                )
            })?;
        }
        Ok(())
    }

    /// The requirements as built: trimmed, sorted, without duplicates.
    pub fn canonical(&self) -> Vec<String> {
        let mut reqs: Vec<String> = self
            .requirements
            .iter()
            .map(|r| r.trim().to_string())
            .collect();
        reqs.sort();
        reqs.dedup();
        reqs
    }

    /// SHA-256 (hex) of the canonical requirements: names the environment everywhere.
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"fleetbox-environment-v1\n");
        for r in self.canonical() {
            h.update(r.as_bytes());
            h.update(b"\n");
        }
        hex::encode(h.finalize())
    }
}

/// Why a requirement line is not a plain named requirement, if it is not.
pub fn check_requirement(r: &str) -> Result<(), &'static str> {
    if r.is_empty() {
        return Err("is empty");
    }
    if r.len() > MAX_REQUIREMENT_BYTES {
        return Err("is too long (at most 200 bytes)");
    }
    if r.chars().any(char::is_control) {
        return Err("contains control characters");
    }
    if r.starts_with('-') {
        return Err("is an installer option: only package requirements are accepted");
    }
    if !r.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a package name");
    }
    if r.contains("://") || r.contains('@') {
        return Err("is a direct reference: name a package of the agent's index instead");
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || " ._-[],<>=!~;*'\"()+".contains(c);
    if !r.chars().all(allowed) {
        return Err("contains characters a requirement cannot have");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(reqs: &[&str]) -> EnvironmentSpec {
        EnvironmentSpec {
            requirements: reqs.iter().map(|s| s.to_string()).collect(),
            requirements_file: None,
        }
    }

    #[test]
    fn the_hash_ignores_order_duplicates_and_padding() {
        let a = spec(&["sympy", "numpy==1.26.4"]);
        let b = spec(&[" numpy==1.26.4", "sympy", "sympy"]);
        assert_eq!(a.hash(), b.hash());
        assert_ne!(a.hash(), spec(&["sympy"]).hash());
        assert_eq!(a.hash().len(), 64);
    }

    #[test]
    fn plain_requirements_pass_and_the_rest_are_refused_by_index() {
        spec(&[
            "numpy==1.26.4",
            "requests[socks]>=2,<3",
            "tomli; python_version < '3.11'",
        ])
        .validate()
        .unwrap();
        for (bad, why) in [
            ("--index-url=http://evil", "installer option"),
            ("-r /etc/passwd", "installer option"),
            ("pkg @ https://example.org/x.whl", "direct reference"),
            ("/etc/shadow", "package name"),
            ("./local", "package name"),
            ("a\nb", "control"),
            ("pkg$(id)", "characters"),
        ] {
            let err = spec(&["ok", bad]).validate().unwrap_err();
            assert_eq!(err.field, "environment.requirements[1]", "{bad}");
            assert!(err.message.contains(why), "{bad}: {}", err.message);
        }
        assert!(spec(&[]).validate().is_err());
        let many: Vec<String> = (0..=MAX_REQUIREMENTS).map(|i| format!("p{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(spec(&many).validate().is_err());
    }

    #[test]
    fn requirements_txt_skips_comments_and_refuses_options() {
        let reqs = EnvironmentSpec::parse_requirements_txt(
            "# pinned\nnumpy==1.26.4  # the array library\n\n  sympy\n",
        )
        .unwrap();
        assert_eq!(reqs, vec!["numpy==1.26.4", "sympy"]);
        let err = EnvironmentSpec::parse_requirements_txt("six\n-e ./local\n").unwrap_err();
        assert_eq!(err.field, "environment.requirements_file");
        assert!(err.message.starts_with("line 2:"), "{}", err.message);
    }
}
