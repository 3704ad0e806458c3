//! The review against a corpus of programs (`tests/fixtures/review/`): half benign but tricky
//! (`subprocess` in a string or a comment, a local function named `system`, data work, files in
//! the working directory), half hostile (alias-laundered, obfuscated, packed). Each file's first
//! line says what is expected: `# expect: run` or `# expect: flagged` (any other decision).
//! Precision and recall of "flagged" must both be at least 0.95.

use fleetbox_proto::Decision;
use fleetbox_review::{BuiltinReviewer, Reviewer};

#[test]
fn the_corpus_is_classified_with_high_precision_and_recall() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/review");
    let reviewer = BuiltinReviewer::shipped();
    let (mut tp, mut fp, mut fneg, mut total) = (0u32, 0u32, 0u32, 0u32);
    let mut wrong = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "py") {
            continue;
        }
        let code = std::fs::read_to_string(&path).unwrap();
        let expect = code
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", path.display()))
            .trim()
            .to_string();
        let review = reviewer
            .review_code(&code)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let flagged = review.decision != Decision::Run;
        total += 1;
        match (expect.as_str(), flagged) {
            ("flagged", true) => tp += 1,
            ("run", false) => {}
            ("run", true) => {
                fp += 1;
                wrong.push(format!("{}: flagged {:?}", path.display(), review.findings));
            }
            ("flagged", false) => {
                fneg += 1;
                wrong.push(format!("{}: not flagged", path.display()));
            }
            (other, _) => panic!("{}: unknown expectation `{other}`", path.display()),
        }
    }
    assert!(total >= 60, "the corpus has {total} programs");
    let precision = f64::from(tp) / f64::from((tp + fp).max(1));
    let recall = f64::from(tp) / f64::from((tp + fneg).max(1));
    eprintln!("review corpus: {total} programs, precision {precision:.3}, recall {recall:.3}");
    assert!(
        precision >= 0.95 && recall >= 0.95,
        "precision {precision:.3}, recall {recall:.3}:\n{}",
        wrong.join("\n")
    );
}
