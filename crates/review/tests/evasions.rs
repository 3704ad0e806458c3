//! Programs written to slip past the review (`tests/fixtures/review/evasions.toml`): every
//! evasion gets a decision other than `run`, every known attack `hold` or `reject`, and every
//! benign look-alike `run`. No threshold: each one must hold.

use fleetbox_proto::Decision;
use fleetbox_review::{BuiltinReviewer, Reviewer};

#[derive(serde::Deserialize)]
struct Corpus {
    case: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    code: String,
}

#[test]
fn no_evasion_runs_no_attack_runs_anywhere_and_no_look_alike_is_flagged() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/review/evasions.toml");
    let corpus: Corpus = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let reviewer = BuiltinReviewer::shipped();
    let mut wrong = Vec::new();
    let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
    for case in &corpus.case {
        *kinds.entry(case.kind.as_str()).or_default() += 1;
        let review = reviewer
            .review_code(&case.code)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let ok = match case.kind.as_str() {
            "evasion" => review.decision != Decision::Run,
            "attack" => matches!(review.decision, Decision::Hold | Decision::Reject),
            "benign" => review.decision == Decision::Run,
            other => panic!("{}: unknown kind `{other}`", case.name),
        };
        if !ok {
            wrong.push(format!(
                "{} ({}): {:?}, risk {}, {:?}",
                case.name,
                case.kind,
                review.decision,
                review.risk,
                review
                    .findings
                    .iter()
                    .map(|f| f.rule.as_str())
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(kinds["evasion"] >= 40, "{kinds:?}");
    assert!(
        wrong.is_empty(),
        "{} of {} wrong:\n{}",
        wrong.len(),
        corpus.case.len(),
        wrong.join("\n")
    );
}
