//! The deadline that stops an evaluation, not only the wait for it.
//!
//! The CEL interpreter cannot be cancelled, and a thread cannot be stopped from outside: a
//! rule past its deadline would go on burning a blocking thread after the planner stopped
//! waiting. So the expression evaluated is a copy of the compiled one in which every
//! comprehension looks at the clock once per item, before the item's work:
//! `__fleetbox_tick() ? null : <the item's expression>`. Past the deadline the tick fails, its
//! comprehension fails with it, and every enclosing one fails at its next item: the evaluation
//! ends within about one item's work. The shapes the interpreter runs fast (`@result + [e]`,
//! `guard ? @result + [e] : @result`, `@result && e`) are kept; the check goes inside them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cel::common::ast::{
    CallExpr, ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue, operators,
};
use cel::{Context, ExecutionError, Value as Cel};

/// The clock check's name: not one a rule may call (the name check refuses it).
const TICK: &str = "__fleetbox_tick";

/// `expr` with a clock check before each comprehension item's work.
pub(super) fn ticking(expr: &IdedExpr) -> IdedExpr {
    let mut copy = expr.clone();
    instrument(&mut copy);
    copy
}

/// Whether an evaluation ran past its deadline: set by the tick that saw it, read after the
/// evaluation (an error a comprehension deferred, `error && false`, may not reach the top).
#[derive(Debug, Clone, Default)]
pub(super) struct Expired(Arc<AtomicBool>);

impl Expired {
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Register the clock check for an evaluation that must end by `deadline`.
pub(super) fn add_tick(
    context: &mut Context,
    deadline: Instant,
) -> Result<Expired, cel::DeclarationError> {
    let expired = Expired::default();
    let seen = expired.clone();
    context.add_function(TICK, move || -> Result<Cel, ExecutionError> {
        if Instant::now() < deadline {
            return Ok(Cel::Bool(false));
        }
        seen.0.store(true, Ordering::Relaxed);
        Err(ExecutionError::function_error(TICK, "past the deadline"))
    })?;
    Ok(expired)
}

fn instrument(node: &mut IdedExpr) {
    match &mut node.expr {
        Expr::Call(call) => {
            if let Some(target) = call.target.as_mut() {
                instrument(target);
            }
            call.args.iter_mut().for_each(instrument);
        }
        Expr::Comprehension(c) => {
            for part in [
                &mut c.iter_range,
                &mut c.accu_init,
                &mut c.loop_cond,
                &mut c.loop_step,
                &mut c.result,
            ] {
                instrument(part);
            }
            guard_items(c);
        }
        Expr::List(list) => list.elements.iter_mut().for_each(instrument),
        Expr::Map(map) => map.entries.iter_mut().for_each(|e| entry(&mut e.expr)),
        Expr::Struct(s) => s.entries.iter_mut().for_each(|e| entry(&mut e.expr)),
        Expr::Select(select) => instrument(&mut select.operand),
        _ => {}
    }
}

fn entry(e: &mut EntryExpr) {
    match e {
        EntryExpr::MapEntry(m) => {
            instrument(&mut m.key);
            instrument(&mut m.value);
        }
        EntryExpr::StructField(f) => instrument(&mut f.value),
    }
}

/// Put the check in front of the work the comprehension does per item.
fn guard_items(c: &mut ComprehensionExpr) {
    let accu = c.accu_var.clone();
    match item_slot(&mut c.loop_step, &accu) {
        Some(slot) => checked(slot),
        None => checked(&mut c.loop_step),
    }
}

/// The per-item expression inside a step shape the interpreter recognises, if it is one.
fn item_slot<'a>(step: &'a mut IdedExpr, accu: &str) -> Option<&'a mut IdedExpr> {
    let Expr::Call(call) = &mut step.expr else {
        return None;
    };
    if call.target.is_some() {
        return None;
    }
    let is_accu = |e: &IdedExpr| matches!(&e.expr, Expr::Ident(name) if name == accu);
    let args = &call.args;
    let slot = match (call.func_name.as_str(), args.len()) {
        (operators::ADD, 2) if is_accu(&args[0]) => Slot::Appended,
        (operators::CONDITIONAL, 3) if is_accu(&args[2]) => Slot::Arg(0),
        (operators::LOGICAL_AND | operators::LOGICAL_OR, 2) if is_accu(&args[0]) => Slot::Arg(1),
        _ => return None,
    };
    match slot {
        Slot::Arg(i) => call.args.get_mut(i),
        Slot::Appended => match &mut call.args[1].expr {
            Expr::List(list) if list.elements.len() == 1 => list.elements.first_mut(),
            _ => None,
        },
    }
}

/// Where a recognised step keeps its per-item work.
enum Slot {
    /// The one element of `@result + [e]`.
    Appended,
    /// An argument: the guard of `guard ? ... : @result`, the `e` of `@result && e`.
    Arg(usize),
}

/// `slot` → `__fleetbox_tick() ? null : slot`.
fn checked(slot: &mut IdedExpr) {
    let id = slot.id;
    let inner = std::mem::take(slot);
    let node = |expr| IdedExpr { id, expr };
    *slot = node(Expr::Call(CallExpr {
        func_name: operators::CONDITIONAL.to_string(),
        target: None,
        args: vec![
            node(Expr::Call(CallExpr {
                func_name: TICK.to_string(),
                target: None,
                args: Vec::new(),
            })),
            node(Expr::Literal(LiteralValue::Null)),
            inner,
        ],
    }));
}
