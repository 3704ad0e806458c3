//! The job spec: what a user submits, validated at the edge with errors that name the field.
//!
//! A spec arrives as TOML (from `fleetbox submit`) or JSON (the HTTP API). Files it names
//! (`code_file`, `shards.lines`) are read by the client and sent inline (`code`, `shards.text`):
//! the coordinator never reads paths from a request.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Limits;

/// Most shards one job may have.
pub const MAX_SHARDS: u64 = 1_000_000;
/// Largest inline program.
pub const MAX_CODE_BYTES: usize = 1 << 20;
/// The sandbox backends a job may ask for.
pub const BACKENDS: &[&str] = &["process", "jail", "docker"];
/// Most files a job may attach to its shards' workspaces, and their total decoded size.
pub const MAX_FILES: usize = 64;
pub const MAX_FILES_BYTES: usize = 4 << 20;
/// The shard contract's own files in the workspace.
pub const INPUT_FILE: &str = "input.json";
pub const OUTPUT_FILE: &str = "output.json";
/// Default number of lines per shard for `shards.lines`.
pub const DEFAULT_LINES_PER_SHARD: u64 = 1000;

/// A job as submitted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({
    "name": "squares",
    "code": "import json, os\nn = json.load(open(os.environ['FLEETBOX_INPUT']))['index']\nprint(n * n)",
    "shards": {"count": 4},
    "aggregate": "sum",
    "limits": {"timeout": "10s", "memory": "256MiB"}
}))]
pub struct JobSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// A path, read by the client (relative to the spec file) and sent as `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_file: Option<String>,
    pub shards: ShardSpec,
    #[serde(default)]
    pub limits: Limits,
    /// Higher runs first.
    #[serde(default)]
    pub priority: i32,
    /// Executions of one shard before it is `dead` (lease losses and sandbox errors count).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<AggregateSpec>,
    /// Complete with the shards that succeeded when some did not (the result is marked
    /// `partial`); without it (or `min_success_rate`) such a job is `failed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_partial: bool,
    /// The share of shards (0 < r <= 1) that must succeed for the job to complete with a
    /// partial result; `1` (every shard) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_success_rate: Option<f64>,
    /// Verification settings (`[verify]`; defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<crate::VerifySpec>,
    /// The sandbox backend every shard must run in (`process` or `jail`); any agent's when
    /// absent. Only agents with that backend lease its shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The pool of agents its shards must run in (`fleetbox pool list`); any pool the tenant
    /// may use when absent. Checked at submission: a pool the tenant may not use is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Files put in every shard's workspace before it starts: relative name → base64 content.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files: std::collections::BTreeMap<String, String>,
    /// Python packages the program needs (`[environment]`); the host's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<crate::EnvironmentSpec>,
    /// Follow-up rules (`[[followup]]`): what this job starts once it has finished.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub followup: Vec<crate::followup::FollowupRule>,
    /// Ask the coordinator's AI planner (when it has one) for a follow-up from its templates
    /// once this job has finished.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ai_followup: bool,
}

fn default_max_attempts() -> u32 {
    3
}

/// How a job is cut into shards: exactly one of `range`, `items`, `lines`/`text`, `count`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<RangeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<Value>>,
    /// A text file whose lines are the items (read by the client).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<String>,
    /// The uploaded contents of `lines`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// N identical shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Items or lines per shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_shard: Option<u64>,
}

/// `start..end` (end exclusive) cut into `count` shards or shards of `size` numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RangeSpec {
    pub start: i64,
    pub end: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// `aggregate = "sum"` or `aggregate = { reducer = "sort", key = "n" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum AggregateSpec {
    Name(String),
    Table(AggregateTable),
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateTable {
    pub reducer: String,
    /// `sort`: the object field to sort by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `sort`: largest first.
    #[serde(default)]
    pub descending: bool,
    /// `histogram`: number of equal-width bins (without it, distinct values are counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bins: Option<u32>,
    /// `python`: the reducer program (reads the list of shard values from `input.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_file: Option<String>,
}

/// A validated reducer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "reducer", rename_all = "snake_case")]
pub enum Reducer {
    /// Shard values as a list, in shard order (the default).
    Collect,
    Count,
    Sum,
    Min,
    Max,
    Mean,
    Concat,
    Sort {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key: Option<String>,
        #[serde(default)]
        descending: bool,
    },
    Merge,
    Histogram {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bins: Option<u32>,
    },
    Python {
        code: String,
    },
}

impl Reducer {
    pub fn name(&self) -> &'static str {
        match self {
            Reducer::Collect => "collect",
            Reducer::Count => "count",
            Reducer::Sum => "sum",
            Reducer::Min => "min",
            Reducer::Max => "max",
            Reducer::Mean => "mean",
            Reducer::Concat => "concat",
            Reducer::Sort { .. } => "sort",
            Reducer::Merge => "merge",
            Reducer::Histogram { .. } => "histogram",
            Reducer::Python { .. } => "python",
        }
    }
}

const REDUCERS: &str =
    "collect, count, sum, min, max, mean, concat, sort, merge, histogram, python";

/// Why `name` cannot be an attached file's name, if it cannot: a relative path of plain
/// components (no `.`, `..` or leading `/`), 1 to 255 bytes, not the shard contract's files.
pub fn check_file_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 255 {
        return Err("a file name must be 1 to 255 bytes");
    }
    if name.chars().any(char::is_control) || name.contains('\\') {
        return Err("a file name must not contain control characters or backslashes");
    }
    if name.starts_with('/')
        || name
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("a file name must be a relative path without `.`, `..` or empty parts");
    }
    if name == INPUT_FILE || name == OUTPUT_FILE {
        return Err("`input.json` and `output.json` are the shard contract's");
    }
    Ok(())
}

/// Attached files as bytes, checked: names, base64, how many, how large.
pub fn decode_files(
    files: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<(String, Vec<u8>)>, SpecError> {
    use base64::Engine as _;
    if files.len() > MAX_FILES {
        return Err(SpecError::new(
            "files",
            format!("at most {MAX_FILES} files may be attached"),
        ));
    }
    let mut out = Vec::with_capacity(files.len());
    let mut total = 0;
    for (name, text) in files {
        let field = || format!("files.{name:?}");
        check_file_name(name).map_err(|why| SpecError::new(field(), why))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| SpecError::new(field(), format!("is not base64: {e}")))?;
        total += bytes.len();
        if total > MAX_FILES_BYTES {
            return Err(SpecError::new(
                "files",
                format!(
                    "attached files are limited to {} MiB in all (send larger data as a blob or a shard input)",
                    MAX_FILES_BYTES >> 20
                ),
            ));
        }
        out.push((name.clone(), bytes));
    }
    Ok(out)
}

/// Files as a spec carries them (base64).
pub fn encode_files(files: &[(String, Vec<u8>)]) -> std::collections::BTreeMap<String, String> {
    use base64::Engine as _;
    files
        .iter()
        .map(|(n, b)| {
            (
                n.clone(),
                base64::engine::general_purpose::STANDARD.encode(b),
            )
        })
        .collect()
}

/// A spec that cannot run, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A spec after validation: the program, the shard inputs and the reducer.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPlan {
    pub code: String,
    pub inputs: Vec<Value>,
    pub reducer: Reducer,
}

fn serde_error(path: String, err: impl std::fmt::Display) -> SpecError {
    let message = err.to_string();
    // `?` is serde_path_to_error's "somewhere unknown" (syntax errors).
    let mut field = if path.is_empty() || path == "." || path == "?" {
        String::new()
    } else {
        path
    };
    // serde names a missing field only in its message: move it into the path.
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(name) = rest.split('`').next()
    {
        if !field.is_empty() {
            field.push('.');
        }
        field.push_str(name);
    }
    if field.is_empty() {
        field = "spec".to_string();
    }
    SpecError::new(field, message)
}

impl JobSpec {
    /// The share of shards that must succeed for the job to complete: `1` by default, `0`
    /// (at least one) with `allow_partial`.
    pub fn success_needed(&self) -> f64 {
        if self.allow_partial {
            0.0
        } else {
            self.min_success_rate.unwrap_or(1.0)
        }
    }

    /// Parse JSON, naming the field a type error is in.
    pub fn from_json(bytes: &[u8]) -> Result<JobSpec, SpecError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            serde_error(path, e.into_inner())
        })
    }

    /// Parse TOML, naming the field a type error is in.
    pub fn from_toml(text: &str) -> Result<JobSpec, SpecError> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            serde_error(path, e.into_inner().message().to_string())
        })
    }

    /// Check everything a coordinator needs and cut the shards.
    pub fn plan(&self) -> Result<JobPlan, SpecError> {
        let name = self.name.trim();
        if name.is_empty() {
            return Err(SpecError::new("name", "must not be empty"));
        }
        if name.len() > 200 {
            return Err(SpecError::new("name", "must be at most 200 bytes"));
        }
        if name.chars().any(char::is_control) {
            return Err(SpecError::new(
                "name",
                "must not contain control characters (NUL, newlines, escapes)",
            ));
        }
        let code = match (&self.code, &self.code_file) {
            (Some(code), _) => code.clone(),
            (None, Some(path)) => {
                return Err(SpecError::new(
                    "code_file",
                    format!(
                        "`{path}` must be read by the client and sent as `code` (`fleetbox submit` does this)"
                    ),
                ));
            }
            (None, None) => {
                return Err(SpecError::new(
                    "code",
                    "one of `code` or `code_file` is required",
                ));
            }
        };
        if code.trim().is_empty() {
            return Err(SpecError::new("code", "must not be empty"));
        }
        if code.contains('\0') {
            return Err(SpecError::new(
                "code",
                "contains a NUL byte (Python source cannot hold one)",
            ));
        }
        if code.len() > MAX_CODE_BYTES {
            return Err(SpecError::new(
                "code",
                format!(
                    "is {} bytes; at most {MAX_CODE_BYTES} are accepted",
                    code.len()
                ),
            ));
        }
        if !(1..=100).contains(&self.max_attempts) {
            return Err(SpecError::new("max_attempts", "must be between 1 and 100"));
        }
        if let Some(r) = self.min_success_rate {
            if !(r > 0.0 && r <= 1.0) {
                return Err(SpecError::new(
                    "min_success_rate",
                    "must be more than 0 and at most 1 (the share of shards that must succeed)",
                ));
            }
            if self.allow_partial {
                return Err(SpecError::new(
                    "min_success_rate",
                    "say `allow_partial = true` (any share) or `min_success_rate`, not both",
                ));
            }
        }
        if !(-1000..=1000).contains(&self.priority) {
            return Err(SpecError::new("priority", "must be between -1000 and 1000"));
        }
        validate_limits(&self.limits)?;
        if let Some(v) = &self.verify {
            v.validate()?;
            if v.replicas > self.max_attempts {
                return Err(SpecError::new(
                    "max_attempts",
                    format!(
                        "must be at least `verify.replicas` ({}): every replica is an attempt",
                        v.replicas
                    ),
                ));
            }
        }
        if let Some(e) = &self.environment {
            e.validate()?;
        }
        decode_files(&self.files)?;
        crate::followup::validate_rules(&self.followup)?;
        if let Some(b) = &self.backend
            && !BACKENDS.contains(&b.as_str())
        {
            return Err(SpecError::new(
                "backend",
                format!(
                    "unknown backend `{b}` (expected one of: {})",
                    BACKENDS.join(", ")
                ),
            ));
        }
        if let Some(p) = &self.pool
            && !crate::tenancy::valid_tenant_name(p)
        {
            return Err(SpecError::new(
                "pool",
                format!("`{p}` is not a pool name (lowercase letters, digits, `-`, `_`)"),
            ));
        }
        let inputs = self.shards.plan()?;
        let reducer = match &self.aggregate {
            None => Reducer::Collect,
            Some(spec) => spec.reducer()?,
        };
        Ok(JobPlan {
            code,
            inputs,
            reducer,
        })
    }
}

/// The largest memory, `/tmp` and file size a job may ask for (agents cap lower).
const MAX_MEMORY: u64 = 1 << 40;

fn validate_limits(l: &Limits) -> Result<(), SpecError> {
    const DAY_MS: u64 = 24 * 3600 * 1000;
    if l.timeout.0 == 0 || l.timeout.0 > DAY_MS {
        return Err(SpecError::new(
            "limits.timeout",
            "must be between 1ms and 24h",
        ));
    }
    if l.cpu_time.0 == 0 || l.cpu_time.0 > DAY_MS {
        return Err(SpecError::new(
            "limits.cpu_time",
            "must be between 1ms and 24h",
        ));
    }
    if l.memory.0 < 16 << 20 || l.memory.0 > MAX_MEMORY {
        return Err(SpecError::new(
            "limits.memory",
            "must be between 16MiB and 1TiB",
        ));
    }
    if l.tmp_size.0 > MAX_MEMORY {
        return Err(SpecError::new("limits.tmp_size", "must be at most 1TiB"));
    }
    if l.max_file_size.0 > MAX_MEMORY {
        return Err(SpecError::new(
            "limits.max_file_size",
            "must be at most 1TiB",
        ));
    }
    if l.workspace_size.0 < 1 << 20 || l.workspace_size.0 > MAX_MEMORY {
        return Err(SpecError::new(
            "limits.workspace_size",
            "must be between 1MiB and 1TiB",
        ));
    }
    if l.workspace_files < 16 || l.workspace_files > 1 << 32 {
        return Err(SpecError::new(
            "limits.workspace_files",
            "must be between 16 and 4294967296",
        ));
    }
    if l.max_output.0 > 1 << 30 {
        return Err(SpecError::new("limits.max_output", "must be at most 1GiB"));
    }
    if l.max_open_files == 0 || l.max_open_files > 1 << 20 {
        return Err(SpecError::new(
            "limits.max_open_files",
            "must be between 1 and 1048576",
        ));
    }
    if l.max_processes > 1 << 16 {
        return Err(SpecError::new(
            "limits.max_processes",
            "must be at most 65536",
        ));
    }
    if l.max_output.0 == 0 {
        return Err(SpecError::new("limits.max_output", "must be more than 0"));
    }
    if !(l.cpus > 0.0 && l.cpus <= 1024.0) {
        return Err(SpecError::new(
            "limits.cpus",
            "must be more than 0 and at most 1024",
        ));
    }
    if l.max_processes == 0 {
        return Err(SpecError::new("limits.max_processes", "must be at least 1"));
    }
    Ok(())
}

impl ShardSpec {
    /// The JSON input of every shard, in shard order.
    pub fn plan(&self) -> Result<Vec<Value>, SpecError> {
        let lines_given = self.lines.is_some() || self.text.is_some();
        let given = [
            self.range.is_some(),
            self.items.is_some(),
            lines_given,
            self.count.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(SpecError::new(
                "shards",
                "give exactly one of `range`, `items`, `lines` (or `text`), `count`",
            ));
        }
        if self.per_shard == Some(0) {
            return Err(SpecError::new("shards.per_shard", "must be at least 1"));
        }
        if let Some(range) = &self.range {
            if self.per_shard.is_some() {
                return Err(SpecError::new(
                    "shards.per_shard",
                    "does not apply to `range` (use `range.count` or `range.size`)",
                ));
            }
            return range.plan();
        }
        if let Some(items) = &self.items {
            let per = self.per_shard.unwrap_or(1);
            return chunked(items, per, "items", "shards.items");
        }
        if lines_given {
            let Some(text) = &self.text else {
                return Err(SpecError::new(
                    "shards.lines",
                    "the file's contents must be uploaded as `shards.text` (`fleetbox submit` does this)",
                ));
            };
            let lines: Vec<Value> = text.lines().map(|l| Value::String(l.to_string())).collect();
            let per = self.per_shard.unwrap_or(DEFAULT_LINES_PER_SHARD);
            return chunked(&lines, per, "lines", "shards.text");
        }
        let count = self.count.unwrap_or(0);
        if self.per_shard.is_some() {
            return Err(SpecError::new(
                "shards.per_shard",
                "does not apply to `count`",
            ));
        }
        if count == 0 || count > MAX_SHARDS {
            return Err(SpecError::new(
                "shards.count",
                format!("must be between 1 and {MAX_SHARDS}"),
            ));
        }
        Ok((0..count)
            .map(|i| serde_json::json!({ "index": i }))
            .collect())
    }
}

fn chunked(items: &[Value], per: u64, key: &str, field: &str) -> Result<Vec<Value>, SpecError> {
    if items.is_empty() {
        return Err(SpecError::new(
            field,
            "is empty: a job needs at least one shard",
        ));
    }
    let per = usize::try_from(per).unwrap_or(usize::MAX);
    let shards = items.len().div_ceil(per);
    if shards as u64 > MAX_SHARDS {
        return Err(SpecError::new(
            field,
            format!("would make {shards} shards; at most {MAX_SHARDS} (raise `shards.per_shard`)"),
        ));
    }
    Ok(items
        .chunks(per)
        .map(|chunk| serde_json::json!({ key: chunk }))
        .collect())
}

impl RangeSpec {
    fn plan(&self) -> Result<Vec<Value>, SpecError> {
        if self.end <= self.start {
            return Err(SpecError::new(
                "shards.range.end",
                format!("must be greater than `start` ({})", self.start),
            ));
        }
        let len = (self.end as i128 - self.start as i128) as u128;
        let count: u128 = match (self.count, self.size) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(SpecError::new(
                    "shards.range",
                    "give exactly one of `count` or `size`",
                ));
            }
            (Some(0), None) => {
                return Err(SpecError::new("shards.range.count", "must be at least 1"));
            }
            (None, Some(0)) => {
                return Err(SpecError::new("shards.range.size", "must be at least 1"));
            }
            (Some(c), None) => {
                if c as u128 > len {
                    return Err(SpecError::new(
                        "shards.range.count",
                        format!("is larger than the range ({len} numbers)"),
                    ));
                }
                c as u128
            }
            (None, Some(s)) => len.div_ceil(s as u128),
        };
        if count > MAX_SHARDS as u128 {
            return Err(SpecError::new(
                "shards.range",
                format!("would make {count} shards; at most {MAX_SHARDS}"),
            ));
        }
        let base = len / count;
        let extra = len % count;
        let mut start = self.start as i128;
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count {
            let size = match self.size {
                Some(s) => (s as u128).min((self.end as i128 - start) as u128),
                None => base + u128::from(i < extra),
            };
            let end = start + size as i128;
            out.push(serde_json::json!({ "start": start as i64, "end": end as i64 }));
            start = end;
        }
        Ok(out)
    }
}

impl AggregateSpec {
    /// The reducer this names, with its options checked.
    pub fn reducer(&self) -> Result<Reducer, SpecError> {
        let table = match self {
            AggregateSpec::Name(name) => AggregateTable {
                reducer: name.clone(),
                ..Default::default()
            },
            AggregateSpec::Table(t) => t.clone(),
        };
        let field = match self {
            AggregateSpec::Name(_) => "aggregate",
            AggregateSpec::Table(_) => "aggregate.reducer",
        };
        let only = |allowed: &[&str]| -> Result<(), SpecError> {
            let set = [
                ("key", table.key.is_some()),
                ("descending", table.descending),
                ("bins", table.bins.is_some()),
                ("code", table.code.is_some() || table.code_file.is_some()),
            ];
            for (name, present) in set {
                if present && !allowed.contains(&name) {
                    return Err(SpecError::new(
                        format!("aggregate.{name}"),
                        format!("does not apply to the `{}` reducer", table.reducer),
                    ));
                }
            }
            Ok(())
        };
        let reducer = match table.reducer.trim() {
            "collect" => Reducer::Collect,
            "count" => Reducer::Count,
            "sum" => Reducer::Sum,
            "min" => Reducer::Min,
            "max" => Reducer::Max,
            "mean" => Reducer::Mean,
            "concat" => Reducer::Concat,
            "merge" => Reducer::Merge,
            "sort" => {
                only(&["key", "descending"])?;
                return Ok(Reducer::Sort {
                    key: table.key,
                    descending: table.descending,
                });
            }
            "histogram" => {
                only(&["bins"])?;
                if table.bins == Some(0) {
                    return Err(SpecError::new("aggregate.bins", "must be at least 1"));
                }
                return Ok(Reducer::Histogram { bins: table.bins });
            }
            "python" => {
                only(&["code"])?;
                return match (table.code, table.code_file) {
                    (Some(code), _) if !code.trim().is_empty() => Ok(Reducer::Python { code }),
                    (None, Some(path)) => Err(SpecError::new(
                        "aggregate.code_file",
                        format!("`{path}` must be read by the client and sent as `aggregate.code`"),
                    )),
                    _ => Err(SpecError::new(
                        "aggregate.code",
                        "the `python` reducer needs its program in `code` or `code_file`",
                    )),
                };
            }
            other => {
                return Err(SpecError::new(
                    field,
                    format!("unknown reducer `{other}` (expected one of {REDUCERS})"),
                ));
            }
        };
        only(&[])?;
        Ok(reducer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> Result<JobPlan, SpecError> {
        JobSpec::from_toml(toml_text)?.plan()
    }

    #[test]
    fn range_by_count_covers_every_number_once() {
        let plan = spec(
            "name = \"s\"\ncode = \"pass\"\n[shards]\nrange = { start = 0, end = 10, count = 3 }\n",
        )
        .unwrap();
        assert_eq!(
            plan.inputs,
            vec![
                serde_json::json!({"start": 0, "end": 4}),
                serde_json::json!({"start": 4, "end": 7}),
                serde_json::json!({"start": 7, "end": 10}),
            ]
        );
    }

    #[test]
    fn range_by_size_ends_with_the_remainder() {
        let plan = spec(
            "name = \"s\"\ncode = \"pass\"\n[shards]\nrange = { start = -5, end = 5, size = 4 }\n",
        )
        .unwrap();
        assert_eq!(plan.inputs.len(), 3);
        assert_eq!(plan.inputs[2], serde_json::json!({"start": 3, "end": 5}));
    }

    #[test]
    fn items_and_lines_are_chunked() {
        let plan = spec(
            "name = \"s\"\ncode = \"pass\"\nshards = { items = [1,2,3,4,5], per_shard = 2 }\n",
        )
        .unwrap();
        assert_eq!(plan.inputs.len(), 3);
        assert_eq!(plan.inputs[2], serde_json::json!({"items": [5]}));
        let plan = spec(
            "name = \"s\"\ncode = \"pass\"\nshards = { text = \"a\\nb\\nc\\n\", per_shard = 2 }\n",
        )
        .unwrap();
        assert_eq!(plan.inputs[0], serde_json::json!({"lines": ["a", "b"]}));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("code = \"pass\"\nshards = { count = 1 }\n", "name"),
            ("name = \"x\"\nshards = { count = 1 }\n", "code"),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 0 }\n",
                "shards.count",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 1, items = [1] }\n",
                "shards",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = \"many\" }\n",
                "shards.count",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 1 }\nlimits = { memory = \"lots\" }\n",
                "limits.memory",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 1 }\nlimits = { timeout = \"0s\" }\n",
                "limits.timeout",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 1 }\naggregate = \"median\"\n",
                "aggregate",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 1 }\naggregate = { reducer = \"sum\", key = \"k\" }\n",
                "aggregate.key",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 1 }\nsurprise = 1\n",
                "surprise",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\n[shards]\nrange = { start = 5, end = 1, count = 2 }\n",
                "shards.range.end",
            ),
            (
                "name = \"x\"\ncode = \"pass\"\nshards = { count = 1 }\nmax_attempts = 0\n",
                "max_attempts",
            ),
        ];
        for (text, field) in cases {
            let err = spec(text).expect_err(text);
            assert_eq!(err.field, field, "{text}: {err}");
        }
    }

    #[test]
    fn json_errors_name_nested_fields() {
        let err = JobSpec::from_json(
            br#"{"name":"x","code":"pass","shards":{"range":{"start":"a","end":2,"count":1}}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "shards.range.start");
    }
}
