//! Follow-up rule expressions: CEL, compiled and name-checked at submission, evaluated after a
//! job finishes with a step budget and a deadline (expressions come from users and run on the
//! coordinator).
//!
//! CEL always terminates, but nested comprehensions over a large result can take ages
//! (`result.all(a, result.all(b, ...))` is n²). Before evaluating, [`Rule::steps`] bounds the
//! work from the expression's shape and the data's sizes; over [`STEP_BUDGET`] the rule is an
//! error, not a hang. The evaluation itself stops at [`DEADLINE`] (`planner::deadline`): a
//! rule past it ends there, rather than run on in a thread nobody waits for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cel::common::ast::{EntryExpr, Expr as Node, IdedExpr};
use cel::extractors::Arguments;
use cel::objects::Key;
use cel::{Context, ExecutionError, Program, Value as Cel};
use serde_json::Value;

/// The most steps one evaluation may be bounded by.
pub const STEP_BUDGET: u64 = 10_000_000;
/// The most values (JSON nodes) an expression may produce: a child's `items` is bounded by
/// the spec anyway, and a rule must not build more in memory on the way.
pub const MAX_VALUES: u64 = 1_000_000;
/// The longest one evaluation may run.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// The names a rule may read. `result` is the job's value, any shape.
pub const ROOTS: &[&str] = &["summary", "result", "job"];
/// `summary.*`, and the fields under those that have some.
pub const SUMMARY_FIELDS: &[(&str, &[&str])] = &[
    ("shards", &[]),
    ("accepted", &[]),
    ("failed", &[]),
    ("dead", &[]),
    ("success_rate", &[]),
    ("partial", &[]),
    ("attempts", &[]),
    ("verified", &[]),
    ("flags", &[]),
    ("anomalies", &[]),
    ("job_ms", &[]),
    ("duration_ms", &["p50", "p95", "max", "mean"]),
    ("peak_memory_bytes", &["p50", "max"]),
];
/// `job.*`.
pub const JOB_FIELDS: &[&str] = &["id", "name", "state", "depth"];
/// Functions beside the operators: CEL's standard ones and Fleetbox's list statistics.
const FUNCTIONS: &[&str] = &[
    "size",
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "type",
    "dyn",
    "contains",
    "startsWith",
    "endsWith",
    "has",
    "sum",
    "mean",
    "median",
    "min",
    "max",
];
/// The functions that walk a whole list.
const LIST_FUNCTIONS: &[&str] = &[
    "sum", "mean", "median", "min", "max", "@in", "_==_", "_!=_", "_+_", "string",
];

/// Where in the expression something is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct CheckError {
    pub line: u32,
    pub column: u32,
    pub message: String,
}

/// Why an evaluation gave no value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error(
        "the expression may take up to {steps} steps on this job's data (budget {STEP_BUDGET}): work on the summary or a smaller list (each nested pass over a list multiplies the work by its size)"
    )]
    Budget { steps: u64 },
    #[error(
        "the expression may produce up to {values} values on this job's data (at most {MAX_VALUES}): a pass over a list that yields the whole list again grows as its square"
    )]
    Size { values: u64 },
    #[error("the expression ran past its {}s deadline", DEADLINE.as_secs())]
    Deadline,
    #[error("{0}")]
    Failed(String),
}

/// A compiled, name-checked expression.
#[derive(Debug)]
pub struct Rule {
    program: Program,
    /// The program's expression with a clock check per comprehension item (`deadline`).
    ticking: IdedExpr,
    source: String,
}

impl Rule {
    /// Parse and check `source` against the names rules may read.
    pub fn compile(source: &str) -> Result<Rule, CheckError> {
        let program = Program::compile(source).map_err(|errors| {
            let first = errors.errors.first();
            let (line, column) = first.map_or((1, 1), |e| (e.pos.0.max(1), e.pos.1.max(0) + 1));
            CheckError {
                line: line as u32,
                column: column as u32,
                message: first.map_or_else(|| "does not parse".to_string(), |e| e.msg.clone()),
            }
        })?;
        let rule = Rule {
            ticking: super::deadline::ticking(program.expression()),
            program,
            source: source.to_string(),
        };
        rule.check(rule.program.expression(), &mut Vec::new())?;
        Ok(rule)
    }

    fn error_at(&self, node: &IdedExpr, message: String) -> CheckError {
        let offset = self
            .program
            .source_info()
            .offset_for(node.id)
            .map_or(0, |(start, _)| start as usize);
        let (mut line, mut column) = (1u32, 1u32);
        for c in self.source.chars().take(offset) {
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        CheckError {
            line,
            column,
            message,
        }
    }

    fn check(&self, node: &IdedExpr, scope: &mut Vec<String>) -> Result<(), CheckError> {
        match &node.expr {
            Node::Ident(name) => {
                if !scope.contains(name) && !ROOTS.contains(&name.as_str()) {
                    return Err(self.error_at(
                        node,
                        format!("unknown name `{name}` (a rule reads {})", ROOTS.join(", ")),
                    ));
                }
            }
            Node::Select(select) => {
                self.check_path(node, scope)?;
                self.check(&select.operand, scope)?;
            }
            Node::Call(call) => {
                let name = call.func_name.as_str();
                let operator = name.starts_with(['_', '!', '-', '@']);
                if !operator && !FUNCTIONS.contains(&name) {
                    return Err(self.error_at(
                        node,
                        format!(
                            "unknown function `{name}` (functions: {})",
                            FUNCTIONS.join(", ")
                        ),
                    ));
                }
                if let Some(target) = &call.target {
                    self.check(target, scope)?;
                }
                for arg in &call.args {
                    self.check(arg, scope)?;
                }
            }
            Node::Comprehension(c) => {
                self.check(&c.iter_range, scope)?;
                self.check(&c.accu_init, scope)?;
                let depth = scope.len();
                scope.push(c.iter_var.clone());
                scope.extend(c.iter_var2.clone());
                scope.push(c.accu_var.clone());
                for part in [&c.loop_cond, &c.loop_step, &c.result] {
                    self.check(part, scope)?;
                }
                scope.truncate(depth);
            }
            Node::List(list) => {
                for e in &list.elements {
                    self.check(e, scope)?;
                }
            }
            Node::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(e) = &entry.expr {
                        self.check(&e.key, scope)?;
                        self.check(&e.value, scope)?;
                    }
                }
            }
            Node::Struct(s) => {
                return Err(self.error_at(
                    node,
                    format!("message types (`{}{{...}}`) are not available", s.type_name),
                ));
            }
            Node::Literal(_) | Node::Unspecified => {}
        }
        Ok(())
    }

    /// `summary.x.y` and `job.x`: the fields must exist.
    fn check_path(&self, node: &IdedExpr, scope: &[String]) -> Result<(), CheckError> {
        let mut path = Vec::new();
        let mut at = node;
        while let Node::Select(s) = &at.expr {
            path.push(s.field.as_str());
            at = &s.operand;
        }
        let Node::Ident(root) = &at.expr else {
            return Ok(());
        };
        if scope.contains(root) {
            return Ok(());
        }
        path.reverse();
        // Only the whole path is checked (from the outermost select).
        let known = match root.as_str() {
            "summary" => match SUMMARY_FIELDS.iter().find(|(f, _)| *f == path[0]) {
                None => false,
                Some((_, under)) => {
                    path.len() == 1 || (path.len() == 2 && under.contains(&path[1]))
                }
            },
            "job" => path.len() == 1 && JOB_FIELDS.contains(&path[0]),
            _ => true,
        };
        if known {
            return Ok(());
        }
        let names: Vec<String> = match root.as_str() {
            "summary" => SUMMARY_FIELDS
                .iter()
                .flat_map(|(f, under)| {
                    std::iter::once(format!("summary.{f}"))
                        .chain(under.iter().map(move |u| format!("summary.{f}.{u}")))
                })
                .collect(),
            _ => JOB_FIELDS.iter().map(|f| format!("job.{f}")).collect(),
        };
        Err(self.error_at(
            node,
            format!(
                "unknown name `{root}.{}` (known: {})",
                path.join("."),
                names.join(", ")
            ),
        ))
    }

    /// The most things any collection can hold while this expression runs on `vars`.
    fn largest(&self, vars: &Vars) -> u64 {
        let mut size = vars.largest.max(1);
        let mut pluses = 0u64;
        count(self.program.expression(), &mut |node| match &node.expr {
            Node::List(l) => size = size.max(l.elements.len() as u64),
            Node::Map(m) => size = size.max(m.entries.len() as u64),
            Node::Call(c) if c.func_name == "_+_" && !is_append(c) => pluses += 1,
            _ => {}
        });
        // No collection can grow past what `+` can join: the largest input, once per `+`.
        size.saturating_mul(pluses + 1)
    }

    /// An upper bound of the steps evaluating this expression takes on `vars`.
    pub fn steps(&self, vars: &Vars) -> u64 {
        cost(self.program.expression(), self.largest(vars))
    }

    /// An upper bound of the values (JSON nodes) evaluating this expression produces on
    /// `vars`: a step budget alone lets `result.map(x, result)` build the list's square.
    pub fn produced(&self, vars: &Vars) -> u64 {
        let mut sizes = Sizes {
            vars,
            largest: self.largest(vars),
            scope: Vec::new(),
        };
        sizes.of(self.program.expression())
    }

    /// Evaluate on `vars` within the budget and the deadline.
    pub async fn evaluate(self: &Arc<Self>, vars: Arc<Vars>) -> Result<Value, EvalError> {
        let steps = self.steps(&vars);
        if steps > STEP_BUDGET {
            return Err(EvalError::Budget { steps });
        }
        let values = self.produced(&vars);
        if values > MAX_VALUES {
            return Err(EvalError::Size { values });
        }
        let rule = self.clone();
        let deadline = Instant::now() + DEADLINE;
        let run = tokio::task::spawn_blocking(move || rule.evaluate_by(&vars, deadline));
        // The evaluation stops itself at the deadline; the wait allows it a moment to.
        match tokio::time::timeout(DEADLINE + Duration::from_secs(1), run).await {
            Err(_) => Err(EvalError::Deadline),
            Ok(Err(e)) => Err(EvalError::Failed(format!("the evaluation failed: {e}"))),
            Ok(Ok(r)) => r,
        }
    }

    /// Evaluate on `vars`, stopping at `deadline` (see `planner::deadline`).
    fn evaluate_by(&self, vars: &Vars, deadline: Instant) -> Result<Value, EvalError> {
        let mut context = Context::default();
        let expired = super::deadline::add_tick(&mut context, deadline)
            .map_err(|e| EvalError::Failed(e.to_string()))?;
        for (name, value) in &vars.values {
            context.add_variable_from_value(name.as_str(), value.clone());
        }
        for (name, f) in [
            ("sum", sum as fn(Arguments) -> Result<Cel, ExecutionError>),
            ("mean", mean),
            ("median", median),
            ("min", min),
            ("max", max),
        ] {
            context
                .add_function(name, f)
                .map_err(|e| EvalError::Failed(e.to_string()))?;
        }
        let value = Cel::resolve(&self.ticking, &context);
        if expired.happened() {
            return Err(EvalError::Deadline);
        }
        value
            .map_err(|e| EvalError::Failed(e.to_string()))?
            .json()
            .map_err(|e| EvalError::Failed(format!("the value has no JSON form: {e:?}")))
    }
}

/// What [`Rule::produced`] knows while it walks: the variables' sizes and the comprehension
/// variables in scope (a loop's element, an accumulator).
struct Sizes<'a> {
    vars: &'a Vars,
    largest: u64,
    scope: Vec<(String, u64)>,
}

impl Sizes<'_> {
    /// An upper bound of the JSON nodes `node` evaluates to.
    fn of(&mut self, node: &IdedExpr) -> u64 {
        match &node.expr {
            Node::Ident(name) => match self.scope.iter().rev().find(|(n, _)| n == name) {
                Some((_, size)) => *size,
                None if ROOTS.contains(&name.as_str()) => self.vars.total.max(1),
                None => 1,
            },
            Node::Literal(_) | Node::Struct(_) | Node::Unspecified => 1,
            Node::Select(s) => self.of(&s.operand),
            Node::List(_) | Node::Map(_) => children(node)
                .into_iter()
                .map(|e| self.of(e))
                .fold(1, u64::saturating_add),
            Node::Call(c) => {
                let parts: Vec<u64> = children(node).into_iter().map(|e| self.of(e)).collect();
                match c.func_name.as_str() {
                    "_+_" => parts.iter().fold(0, |a, b| a.saturating_add(*b)),
                    "_?_:_" => parts.iter().skip(1).copied().max().unwrap_or(1),
                    _ => parts.iter().copied().max().unwrap_or(1).max(1),
                }
            }
            Node::Comprehension(c) => {
                self.of(&c.iter_range);
                let element = self.vars.element.max(1);
                let vars = 1 + usize::from(c.iter_var2.is_some());
                self.scope.push((c.iter_var.clone(), element));
                if let Some(v2) = &c.iter_var2 {
                    self.scope.push((v2.clone(), element));
                }
                let init = self.of(&c.accu_init);
                // The accumulator counts once, at the end: each step adds what it appends.
                self.scope.push((c.accu_var.clone(), 0));
                let step = self.of(&c.loop_step);
                let total = init.saturating_add(self.largest.saturating_mul(step));
                self.scope.pop();
                self.scope.push((c.accu_var.clone(), total));
                let out = self.of(&c.result);
                self.scope.truncate(self.scope.len() - 1 - vars);
                out
            }
        }
    }
}

/// `@result + [x]`: the append a `map`/`filter` macro makes (linear in all, not per step).
fn is_append(c: &cel::common::ast::CallExpr) -> bool {
    matches!(c.args.first().map(|a| &a.expr), Some(Node::Ident(n)) if n.starts_with('@'))
}

/// Visit every node.
fn count(node: &IdedExpr, f: &mut impl FnMut(&IdedExpr)) {
    f(node);
    for child in children(node) {
        count(child, f);
    }
}

fn children(node: &IdedExpr) -> Vec<&IdedExpr> {
    match &node.expr {
        Node::Select(s) => vec![&s.operand],
        Node::Call(c) => c.target.iter().map(|t| &**t).chain(&c.args).collect(),
        Node::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Node::List(l) => l.elements.iter().collect(),
        Node::Map(m) => m
            .entries
            .iter()
            .flat_map(|e| match &e.expr {
                EntryExpr::MapEntry(e) => vec![&e.key, &e.value],
                EntryExpr::StructField(f) => vec![&f.value],
            })
            .collect(),
        Node::Struct(_) | Node::Ident(_) | Node::Literal(_) | Node::Unspecified => Vec::new(),
    }
}

/// Steps of `node` when no collection holds more than `largest` things.
fn cost(node: &IdedExpr, largest: u64) -> u64 {
    match &node.expr {
        Node::Comprehension(c) => {
            let once = [&c.loop_cond, &c.loop_step]
                .iter()
                .map(|p| cost(p, largest))
                .fold(1u64, u64::saturating_add);
            cost(&c.iter_range, largest)
                .saturating_add(cost(&c.accu_init, largest))
                .saturating_add(largest.saturating_mul(once))
                .saturating_add(cost(&c.result, largest))
        }
        Node::Call(c) => {
            let own = if LIST_FUNCTIONS.contains(&c.func_name.as_str()) && !is_append(c) {
                largest
            } else {
                1
            };
            children(node)
                .into_iter()
                .map(|n| cost(n, largest))
                .fold(own, u64::saturating_add)
        }
        _ => children(node)
            .into_iter()
            .map(|n| cost(n, largest))
            .fold(1u64, u64::saturating_add),
    }
}

/// What a rule reads, converted once.
#[derive(Debug, Default)]
pub struct Vars {
    values: Vec<(String, Cel)>,
    /// The longest list, map or string anywhere in them.
    largest: u64,
    /// All their JSON nodes.
    total: u64,
    /// The most JSON nodes in one item of any list or map in them.
    element: u64,
}

impl Vars {
    pub fn new(values: impl IntoIterator<Item = (&'static str, Value)>) -> Vars {
        let mut vars = Vars::default();
        for (name, v) in values {
            vars.total = vars.total.saturating_add(nodes(&v, &mut vars.element));
            let value = to_cel(&v, &mut vars.largest);
            vars.values.push((name.to_string(), value));
        }
        vars
    }
}

/// The JSON nodes of `v`, noting in `element` the most in any one item of a list or map.
fn nodes(v: &Value, element: &mut u64) -> u64 {
    let items: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(items) => Box::new(items.iter()),
        Value::Object(map) => Box::new(map.values()),
        _ => return 1,
    };
    items.fold(1, |n, item| {
        let size = nodes(item, element);
        *element = (*element).max(size);
        n.saturating_add(size)
    })
}

/// JSON into CEL: integers stay `int` (`uint` only past i64), so `x > 10` compares as written.
fn to_cel(v: &Value, largest: &mut u64) -> Cel {
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Cel::Int(i)
            } else if let Some(u) = n.as_u64() {
                Cel::UInt(u)
            } else {
                Cel::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => {
            *largest = (*largest).max(s.len() as u64);
            Cel::String(Arc::new(s.clone()))
        }
        Value::Array(items) => {
            *largest = (*largest).max(items.len() as u64);
            Cel::List(Arc::new(items.iter().map(|i| to_cel(i, largest)).collect()))
        }
        Value::Object(map) => {
            *largest = (*largest).max(map.len() as u64);
            let map: HashMap<Key, Cel> = map
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v, largest)))
                .collect();
            Cel::from(map)
        }
    }
}

/// The numbers of a list argument (or of the arguments themselves).
fn numbers(args: &[Cel], function: &str) -> Result<Vec<f64>, ExecutionError> {
    let items: &[Cel] = match args {
        [Cel::List(list)] => list,
        _ => args,
    };
    items
        .iter()
        .map(|v| match v {
            Cel::Int(i) => Ok(*i as f64),
            Cel::UInt(u) => Ok(*u as f64),
            Cel::Float(f) => Ok(*f),
            other => Err(ExecutionError::function_error(
                function,
                format!("expects numbers, got {:?}", other.type_of()),
            )),
        })
        .collect()
}

/// `sum` keeps integers integers.
fn sum(Arguments(args): Arguments) -> Result<Cel, ExecutionError> {
    let items: &[Cel] = match args.as_slice() {
        [Cel::List(list)] => list,
        _ => &args,
    };
    if items.iter().all(|v| matches!(v, Cel::Int(_))) {
        let mut total = 0i64;
        for v in items {
            if let Cel::Int(i) = v {
                total = total
                    .checked_add(*i)
                    .ok_or_else(|| ExecutionError::function_error("sum", "integer overflow"))?;
            }
        }
        return Ok(Cel::Int(total));
    }
    Ok(Cel::Float(numbers(&args, "sum")?.iter().sum()))
}

fn mean(Arguments(args): Arguments) -> Result<Cel, ExecutionError> {
    let xs = numbers(&args, "mean")?;
    if xs.is_empty() {
        return Err(ExecutionError::function_error("mean", "of an empty list"));
    }
    Ok(Cel::Float(xs.iter().sum::<f64>() / xs.len() as f64))
}

fn median(Arguments(args): Arguments) -> Result<Cel, ExecutionError> {
    let mut xs = numbers(&args, "median")?;
    if xs.is_empty() {
        return Err(ExecutionError::function_error("median", "of an empty list"));
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Ok(Cel::Float(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }))
}

fn extreme(
    args: &[Cel],
    function: &str,
    pick: fn(f64, f64) -> bool,
) -> Result<Cel, ExecutionError> {
    let items: &[Cel] = match args {
        [Cel::List(list)] => list,
        _ => args,
    };
    let xs = numbers(args, function)?;
    let best = (0..xs.len())
        .reduce(|a, b| if pick(xs[b], xs[a]) { b } else { a })
        .ok_or_else(|| ExecutionError::function_error(function, "of an empty list"))?;
    Ok(items[best].clone())
}

fn min(Arguments(args): Arguments) -> Result<Cel, ExecutionError> {
    extreme(&args, "min", |a, b| a < b)
}

fn max(Arguments(args): Arguments) -> Result<Cel, ExecutionError> {
    extreme(&args, "max", |a, b| a > b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(result: Value) -> Arc<Vars> {
        Arc::new(Vars::new([
            (
                "summary",
                json!({"shards": 4, "accepted": 3, "failed": 1, "dead": 0, "success_rate": 0.75,
                "duration_ms": {"p50": 10, "p95": 20, "max": 30, "mean": 12.5}}),
            ),
            ("result", result),
            (
                "job",
                json!({"id": "job_1", "name": "n", "state": "completed", "depth": 0}),
            ),
        ]))
    }

    async fn eval(source: &str, result: Value) -> Result<Value, EvalError> {
        Arc::new(Rule::compile(source).unwrap())
            .evaluate(vars(result))
            .await
    }

    #[tokio::test]
    async fn rules_read_the_summary_the_result_and_the_job() {
        assert_eq!(
            eval("summary.failed > 0", json!(null)).await,
            Ok(json!(true))
        );
        assert_eq!(
            eval("result.filter(x, x > mean(result))", json!([1, 5, 2, 8])).await,
            Ok(json!([5, 8]))
        );
        assert_eq!(
            eval("result.total * 2", json!({"total": 21})).await,
            Ok(json!(42))
        );
        assert_eq!(
            eval("size(result) == 3 && sum(result) == 6", json!([1, 2, 3])).await,
            Ok(json!(true))
        );
        assert_eq!(
            eval("max(result) - min(result)", json!([4, 9, 1])).await,
            Ok(json!(8))
        );
        assert_eq!(
            eval("median(result)", json!([4, 9, 1, 2])).await,
            Ok(json!(3.0))
        );
        assert_eq!(
            eval(
                "job.state == 'completed' && summary.duration_ms.p95 < 100",
                json!(1)
            )
            .await,
            Ok(json!(true))
        );
        assert_eq!(
            eval("result.map(x, x * 2)", json!([1, 2])).await,
            Ok(json!([2, 4]))
        );
        assert!(matches!(
            eval("result.total", json!([1])).await,
            Err(EvalError::Failed(_))
        ));
    }

    #[test]
    fn unknown_names_and_syntax_errors_are_refused_with_their_position() {
        let e = Rule::compile("summary.failed > 0 &&\n  sumary.dead == 0").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3), "{e}");
        assert!(e.message.contains("`sumary`"), "{e}");
        let e = Rule::compile("summary.faild > 0").unwrap_err();
        assert_eq!((e.line, e.column), (1, 8), "{e}");
        assert!(e.message.contains("summary.faild"), "{e}");
        let e = Rule::compile("summary.duration_ms.p99 > 1").unwrap_err();
        assert!(e.message.contains("summary.duration_ms.p99"), "{e}");
        let e = Rule::compile("job.owner == 'x'").unwrap_err();
        assert!(e.message.contains("job.owner"), "{e}");
        let e = Rule::compile("result.filter(x, x > ").unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        let e = Rule::compile("launch(result)").unwrap_err();
        assert!(e.message.contains("unknown function `launch`"), "{e}");
        // Comprehension variables are names inside their comprehension only.
        Rule::compile("result.exists(summary, summary > 1)").unwrap();
        Rule::compile("result.all(x, result.exists(y, y == x))").unwrap();
        let e = Rule::compile("result.all(x, x > 0) && x > 1").unwrap_err();
        assert!(e.message.contains("`x`"), "{e}");
    }

    /// A pass that yields the whole list again per item passes the step budget but would build
    /// the list's square: refused before it runs; linear passes, and nested lists, are not.
    #[tokio::test]
    async fn an_expression_that_would_build_the_square_of_a_list_is_refused() {
        let big: Vec<i64> = (0..2000).collect();
        match eval("result.map(x, result)", json!(big)).await {
            Err(EvalError::Size { values }) => assert!(values > MAX_VALUES, "{values}"),
            other => panic!("{other:?}"),
        }
        let rule = Rule::compile("result.map(x, result)").unwrap();
        let small: Vec<i64> = (0..300).collect();
        assert!(rule.produced(&vars(json!(small))) >= 300 * 300);
        // Linear: allowed, and their bounds stay linear.
        let doubled = eval("result.map(x, x * 2).size()", json!(big)).await;
        assert_eq!(doubled, Ok(json!(2000)));
        let linear = Rule::compile("result.filter(x, x % 2 == 0)").unwrap();
        assert!(linear.produced(&vars(json!(big))) < 10 * 2000);
        // A list of lists: each item's own size counts, once.
        let rows: Vec<Vec<i64>> = (0..100).map(|_| (0..100).collect()).collect();
        let flat = eval("result.map(r, r.size()).size()", json!(rows)).await;
        assert_eq!(flat, Ok(json!(100)));
    }

    /// A rule slower than its deadline ends at the deadline: the evaluation itself stops, not
    /// only the wait for it. Measured against the same rule run
    /// to its end, so the machine's speed does not matter.
    #[test]
    fn the_deadline_stops_the_evaluation_not_only_the_wait() {
        // Past the step budget (the deadline is the backstop behind it), so that a run takes
        // long enough to measure well.
        let data: Vec<i64> = (0..400).collect();
        let v = vars(json!(data));
        for source in [
            "result.all(a, result.exists(b, b == -1) || a >= 0)",
            "result.map(a, result.filter(b, b == a).size()).size()",
            "result.exists_one(a, result.map(b, b * a).size() == 0)",
        ] {
            let rule = Rule::compile(source).unwrap();
            let started = Instant::now();
            let far = started + Duration::from_secs(3600);
            assert!(rule.evaluate_by(&v, far).is_ok(), "{source}");
            let whole = started.elapsed();
            let started = Instant::now();
            let stopped = rule.evaluate_by(&v, started + whole / 10);
            let took = started.elapsed();
            assert_eq!(stopped, Err(EvalError::Deadline), "{source}");
            assert!(
                took < whole / 2,
                "{source}: stopped after {took:?}; the whole run took {whole:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_expression_that_would_run_for_ever_hits_the_budget() {
        let big: Vec<i64> = (0..2000).collect();
        let bomb = "result.all(a, result.all(b, result.all(c, a + b + c >= 0)))";
        match eval(bomb, json!(big)).await {
            Err(EvalError::Budget { steps }) => assert!(steps > STEP_BUDGET),
            other => panic!("{other:?}"),
        }
        // One pass over the same data is well within it.
        let one = eval("result.filter(x, x % 2 == 0).size() == 1000", json!(big)).await;
        assert_eq!(one, Ok(json!(true)));
        // The bound holds what actually runs.
        let small: Vec<i64> = (0..40).collect();
        let rule = Rule::compile(bomb).unwrap();
        let v = vars(json!(small));
        assert!(rule.steps(&v) >= 40 * 40 * 40);
    }
}
