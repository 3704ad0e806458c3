//! One pass over the AST in source order: imports and assignments feed a table of what each
//! local name stands for (`o` → `os`, `r` → `subprocess.run`, `f` → `os.system`), every call is
//! resolved through it, and each rule's matchers and checks look at what they are about.
//!
//! Values are followed, not only names: star imports resolve against the names rules care
//! about; `sys.modules[...]`, `globals()[...]`, `vars(mod)[...]`, `builtins.x` and container
//! literals' subscripts resolve to what they hold; string expressions fold (`+`, `join`,
//! f-strings, `%`, `format`, `[::-1]`, `b"..".decode()`, names bound to constants); lambdas
//! and small functions are applied to their arguments; and a dangerous callable that is not
//! called where it is named (put in a list or a dict, passed to `map` or `functools.partial`,
//! a default argument, a return value) counts as called: it is going somewhere to be called.

use std::collections::{HashMap, HashSet};

use ruff_python_ast::visitor::{Visitor, walk_expr, walk_stmt};
use ruff_python_ast::{Expr, Number, Operator, Stmt};
use ruff_text_size::{Ranged, TextSize};

use crate::rules::{RuleSet, glob};

/// A rule that matched, where.
pub struct Hit {
    pub rule: usize,
    pub at: TextSize,
    pub detail: Option<String>,
}

/// Names that mean the builtin unless the program rebinds them.
const BUILTINS: &[&str] = &[
    "eval",
    "exec",
    "compile",
    "__import__",
    "getattr",
    "open",
    "globals",
    "vars",
    "locals",
    "chr",
    "dict",
    "print",
];

/// Calls whose result is decoded or deserialised data.
const DECODERS: &[&str] = &[
    "base64.*",
    "binascii.*",
    "codecs.decode",
    "zlib.decompress",
    "bz2.decompress",
    "lzma.decompress",
    "gzip.decompress",
    "marshal.loads",
    "pickle.loads",
    "bytes.fromhex",
];

/// Calls that delete, move or change files: flagged with an absolute or `..` path.
const FILE_CHANGERS: &[&str] = &[
    "os.remove",
    "os.unlink",
    "os.rmdir",
    "os.removedirs",
    "os.rename",
    "os.replace",
    "os.chmod",
    "os.chown",
    "os.symlink",
    "os.link",
    "os.truncate",
    "shutil.rmtree",
    "shutil.move",
    "shutil.copy",
    "shutil.copyfile",
    "shutil.copy2",
];

const DUNDER_ESCAPES: &[&str] = &["__builtins__", "__subclasses__", "__globals__"];

/// How deep lambdas and small functions are applied inside each other.
const MAX_DEPTH: u32 = 8;

pub fn scan(suite: &[Stmt], rules: &RuleSet) -> Vec<Hit> {
    let mut s = Scanner {
        rules,
        aliases: HashMap::new(),
        loop_depth: 0,
        hits: Vec::new(),
        stars: Vec::new(),
        consts: HashMap::new(),
        lambdas: HashMap::new(),
        called: HashSet::new(),
    };
    for stmt in suite {
        s.visit_stmt(stmt);
    }
    s.hits
}

struct Scanner<'r> {
    rules: &'r RuleSet,
    /// Local name → the qualified name it stands for.
    aliases: HashMap<String, String>,
    loop_depth: u32,
    hits: Vec<Hit>,
    /// Modules imported with `*`, in order.
    stars: Vec<String>,
    /// Names bound to a constant string.
    consts: HashMap<String, String>,
    /// Names bound to a lambda or a small function: its parameters and what it returns.
    lambdas: HashMap<String, (Vec<String>, Expr)>,
    /// Where the call targets seen start: a dangerous name anywhere else is a value.
    called: HashSet<TextSize>,
}

/// The names of a lambda's or function's positional parameters.
fn parameter_names(p: &ruff_python_ast::Parameters) -> Vec<String> {
    p.posonlyargs
        .iter()
        .chain(&p.args)
        .map(|a| a.parameter.name.as_str().to_string())
        .collect()
}

/// `builtins.exec` and `__builtins__.exec` are `exec`.
fn normalize(name: String) -> String {
    for prefix in ["builtins.", "__builtins__."] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    name
}

impl Scanner<'_> {
    fn hit(&mut self, rule: usize, at: TextSize, detail: Option<String>) {
        self.hits.push(Hit { rule, at, detail });
    }

    /// Every rule running this built-in check.
    fn check(&mut self, check: &str, at: TextSize, detail: Option<String>) {
        let ids: Vec<usize> = (self.rules.rules.iter().enumerate())
            .filter(|(_, r)| r.check.as_deref() == Some(check))
            .map(|(i, _)| i)
            .collect();
        for i in ids {
            self.hit(i, at, detail.clone());
        }
    }

    fn imported(&mut self, module: &str, at: TextSize) {
        let ids: Vec<usize> = (self.rules.rules.iter().enumerate())
            .filter(|(_, r)| r.imports.iter().any(|p| glob(p, module)))
            .map(|(i, _)| i)
            .collect();
        for i in ids {
            self.hit(i, at, Some(format!("imports `{module}`")));
        }
    }

    fn called(&mut self, name: &str, at: TextSize) {
        let ids: Vec<usize> = (self.rules.rules.iter().enumerate())
            .filter(|(_, r)| r.calls.iter().any(|p| glob(p, name)))
            .map(|(i, _)| i)
            .collect();
        for i in ids {
            self.hit(i, at, Some(format!("calls `{name}`")));
        }
    }

    /// The string an expression always evaluates to, when that is plain to see: literals and
    /// names bound to them, `+`, `"".join([...])`, f-strings, `%` and `format` of them,
    /// `[::-1]`, `chr(N)`, `b"...".decode()`.
    fn fold(&self, expr: &Expr) -> Option<String> {
        match expr {
            Expr::StringLiteral(s) => Some(s.value.to_str().to_string()),
            Expr::Name(n) => self.consts.get(n.id.as_str()).cloned(),
            Expr::BinOp(b) if b.op == Operator::Add => {
                Some(self.fold(&b.left)? + &self.fold(&b.right)?)
            }
            // `"%s%s" % ("sys", "tem")`
            Expr::BinOp(b) if b.op == Operator::Mod => {
                let template = self.fold(&b.left)?;
                let args: Vec<String> = match &*b.right {
                    Expr::Tuple(t) => t.elts.iter().map(|e| self.fold(e)).collect::<Option<_>>()?,
                    other => vec![self.fold(other)?],
                };
                let mut out = template;
                for a in args {
                    out = out.replacen("%s", &a, 1);
                }
                Some(out)
            }
            Expr::FString(f) => {
                let mut out = String::new();
                for part in f.value.iter() {
                    match part {
                        ruff_python_ast::FStringPart::Literal(l) => out.push_str(l.value.as_ref()),
                        ruff_python_ast::FStringPart::FString(f) => {
                            for e in f.elements.iter() {
                                match e {
                                    ruff_python_ast::InterpolatedStringElement::Literal(l) => {
                                        out.push_str(&l.value)
                                    }
                                    ruff_python_ast::InterpolatedStringElement::Interpolation(
                                        i,
                                    ) => out.push_str(&self.fold(&i.expression)?),
                                }
                            }
                        }
                    }
                }
                Some(out)
            }
            // `"metsys"[::-1]`
            Expr::Subscript(s) => match &*s.slice {
                Expr::Slice(sl)
                    if sl.lower.is_none()
                        && sl.upper.is_none()
                        && sl.step.as_deref().is_some_and(|st| {
                            matches!(st, Expr::UnaryOp(u) if u.op == ruff_python_ast::UnaryOp::USub
                                && index(&u.operand) == Some(1))
                        }) =>
                {
                    Some(self.fold(&s.value)?.chars().rev().collect())
                }
                _ => None,
            },
            Expr::Call(c) => match &*c.func {
                Expr::Attribute(a) if a.attr.as_str() == "join" => {
                    let sep = self.fold(&a.value)?;
                    let parts = match c.arguments.args.first()? {
                        Expr::List(l) => &l.elts,
                        Expr::Tuple(t) => &t.elts,
                        _ => return None,
                    };
                    let parts: Option<Vec<String>> = parts.iter().map(|p| self.fold(p)).collect();
                    Some(parts?.join(&sep))
                }
                // `"{}{}".format("sys", "tem")`
                Expr::Attribute(a) if a.attr.as_str() == "format" => {
                    let mut out = self.fold(&a.value)?;
                    for (i, arg) in c.arguments.args.iter().enumerate() {
                        let v = self.fold(arg)?;
                        out = out.replace(&format!("{{{i}}}"), &v).replacen("{}", &v, 1);
                    }
                    Some(out)
                }
                // `b"system".decode()`
                Expr::Attribute(a) if a.attr.as_str() == "decode" => match &*a.value {
                    Expr::BytesLiteral(b) => {
                        let bytes: Vec<u8> = b
                            .value
                            .iter()
                            .flat_map(|l| l.value.iter().copied())
                            .collect();
                        String::from_utf8(bytes).ok()
                    }
                    _ => None,
                },
                Expr::Name(n) if n.id.as_str() == "chr" => match c.arguments.args.first()? {
                    Expr::NumberLiteral(num) => match &num.value {
                        Number::Int(i) => {
                            char::from_u32(u32::try_from(i.as_i64()?).ok()?).map(String::from)
                        }
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        }
    }

    /// Whether any rule names `name` among its calls.
    fn dangerous(&self, name: &str) -> bool {
        self.rules
            .rules
            .iter()
            .any(|r| r.calls.iter().any(|p| glob(p, name)))
    }

    /// What a bare name stands for: an alias, a builtin, or a dangerous name of a module
    /// imported with `*`.
    fn name(&self, id: &str) -> Option<String> {
        if let Some(q) = self.aliases.get(id) {
            return Some(q.clone());
        }
        if BUILTINS.contains(&id) {
            return Some(id.to_string());
        }
        self.stars
            .iter()
            .rev()
            .map(|m| format!("{m}.{id}"))
            .find(|q| self.dangerous(q))
    }

    /// What an expression names, as a qualified name (`os.system`), when it can be known.
    fn qualified(&self, expr: &Expr) -> Option<String> {
        self.resolve(expr, &HashMap::new(), 0)
    }

    /// [`Scanner::qualified`] with lambda or function parameters bound in `scope`.
    fn resolve(&self, expr: &Expr, scope: &HashMap<String, String>, depth: u32) -> Option<String> {
        if depth > MAX_DEPTH {
            return None;
        }
        let r = |e: &Expr| self.resolve(e, scope, depth);
        let q = match expr {
            Expr::Name(n) => match scope.get(n.id.as_str()) {
                Some(q) => Some(q.clone()),
                None => self.name(n.id.as_str()),
            },
            Expr::Attribute(a) => {
                let base = r(&a.value)?;
                Some(format!("{base}.{}", a.attr.as_str()))
            }
            Expr::Call(c) => self.resolve_call(c, scope, depth),
            Expr::Subscript(s) => self.resolve_subscript(s, scope, depth),
            // `(f := os.system)`
            Expr::Named(n) => r(&n.value),
            // `(os.system if c else print)`: the dangerous branch, if either is.
            Expr::If(i) => {
                let (a, b) = (r(&i.body), r(&i.orelse));
                match (&a, &b) {
                    (_, Some(q)) if self.dangerous(q) => b,
                    _ => a.or(b),
                }
            }
            _ => None,
        };
        q.map(normalize)
    }

    /// What a call returns, when that is a name: an import, a `getattr`, a partial, a lambda
    /// or a small function applied to its arguments.
    fn resolve_call(
        &self,
        c: &ruff_python_ast::ExprCall,
        scope: &HashMap<String, String>,
        depth: u32,
    ) -> Option<String> {
        let args = &c.arguments.args;
        if let Expr::Lambda(l) = &*c.func {
            let params = l
                .parameters
                .as_deref()
                .map(parameter_names)
                .unwrap_or_default();
            return self.apply(&params, &l.body, args, scope, depth);
        }
        if let Expr::Name(n) = &*c.func
            && !scope.contains_key(n.id.as_str())
            && let Some((params, body)) = self.lambdas.get(n.id.as_str())
        {
            return self.apply(params, body, args, scope, depth);
        }
        let func = self.resolve(&c.func, scope, depth)?;
        match func.as_str() {
            // `__import__("m")`, `importlib.import_module("m")`: the module.
            "__import__" | "importlib.import_module" => self.fold(args.first()?),
            // `getattr(mod, "na" + "me")`: mod.name.
            "getattr" => {
                let base = self.resolve(args.first()?, scope, depth)?;
                Some(format!("{base}.{}", self.fold(args.get(1)?)?))
            }
            // `functools.partial(f, ...)` and `staticmethod(f)` call `f`.
            "functools.partial" | "staticmethod" | "classmethod" => {
                self.resolve(args.first()?, scope, depth)
            }
            _ => None,
        }
    }

    /// `params` bound to what `args` name, then what `body` names.
    fn apply(
        &self,
        params: &[String],
        body: &Expr,
        args: &[Expr],
        scope: &HashMap<String, String>,
        depth: u32,
    ) -> Option<String> {
        let mut inner = scope.clone();
        for (p, a) in params.iter().zip(args) {
            match self.resolve(a, scope, depth + 1) {
                Some(q) => inner.insert(p.clone(), q),
                None => inner.remove(p),
            };
        }
        self.resolve(body, &inner, depth + 1)
    }

    /// `sys.modules["m"]`, `globals()["name"]`, `vars(mod)["name"]`, `mod.__dict__["name"]`,
    /// and a list's, tuple's or dict's literal item.
    fn resolve_subscript(
        &self,
        s: &ruff_python_ast::ExprSubscript,
        scope: &HashMap<String, String>,
        depth: u32,
    ) -> Option<String> {
        let r = |e: &Expr| self.resolve(e, scope, depth);
        match &*s.value {
            Expr::List(l) => return r(l.elts.get(index(&s.slice)?)?),
            Expr::Tuple(t) => return r(t.elts.get(index(&s.slice)?)?),
            Expr::Dict(d) => {
                let key = self.fold(&s.slice)?;
                let item = d
                    .items
                    .iter()
                    .find(|i| i.key.as_ref().and_then(|k| self.fold(k)).as_deref() == Some(&key))?;
                return r(&item.value);
            }
            _ => {}
        }
        let key = self.fold(&s.slice)?;
        match &*s.value {
            Expr::Call(c) => match r(&c.func).as_deref() {
                Some("vars") if c.arguments.args.len() == 1 => {
                    Some(format!("{}.{key}", r(c.arguments.args.first()?)?))
                }
                Some("globals" | "locals" | "vars") => self.name(&key),
                _ => None,
            },
            Expr::Attribute(a) if a.attr.as_str() == "__dict__" => {
                Some(format!("{}.{key}", r(&a.value)?))
            }
            v if r(v).as_deref() == Some("sys.modules") => Some(key),
            v if matches!(r(v).as_deref(), Some("__builtins__" | "builtins")) => Some(key),
            _ => None,
        }
    }

    fn on_call(&mut self, call: &ruff_python_ast::ExprCall) {
        let at = call.range().start();
        self.called.insert(call.func.range().start());
        let Some(name) = self.qualified(&call.func) else {
            return;
        };
        self.called(&name, at);
        let args = &call.arguments.args;
        let first = args.first();
        match name.as_str() {
            "eval" | "exec" | "compile" => {
                if let Some(arg) = first {
                    if self.fold(arg).is_none() {
                        self.check(
                            "dynamic_exec",
                            at,
                            Some(format!("`{name}` of computed code")),
                        );
                    }
                    if name != "compile" && self.contains_decoder(arg) {
                        self.check(
                            "exec_decoded",
                            at,
                            Some(format!("`{name}` of decoded data")),
                        );
                    }
                }
            }
            "__import__" | "importlib.import_module" => match first.and_then(|e| self.fold(e)) {
                Some(module) => self.imported(&module, at),
                None => self.check("dynamic_import", at, None),
            },
            "getattr" => {
                if args.get(1).is_some_and(|a| self.fold(a).is_none()) {
                    self.check("dynamic_getattr", at, None);
                }
                // `getattr(builtins, "ex" + "ec")`: reaching into the builtins by name.
                if args
                    .first()
                    .and_then(|a| self.qualified(a))
                    .is_some_and(|b| b == "builtins" || b == "__builtins__")
                {
                    self.check(
                        "builtins_access",
                        at,
                        Some("`getattr` on the builtins".into()),
                    );
                }
                if let Some(key) = args.get(1).and_then(|e| self.fold(e))
                    && DUNDER_ESCAPES.contains(&key.as_str())
                {
                    self.check("builtins_access", at, Some(format!("`{key}`")));
                }
            }
            "open" | "io.open" | "builtins.open" | "codecs.open" => {
                let mode = args.get(1).and_then(|e| self.fold(e)).or_else(|| {
                    call.arguments
                        .keywords
                        .iter()
                        .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == "mode"))
                        .and_then(|k| self.fold(&k.value))
                });
                let writes = mode.is_some_and(|m| m.contains(['w', 'a', 'x', '+']));
                if writes
                    && let Some(path) = first.and_then(|e| self.fold(e)).filter(|p| outside(p))
                {
                    self.check("write_outside", at, Some(format!("writes `{path}`")));
                }
            }
            n if FILE_CHANGERS.contains(&n) => {
                if let Some(path) = first.and_then(|e| self.fold(e)).filter(|p| outside(p)) {
                    self.check("write_outside", at, Some(format!("`{n}` on `{path}`")));
                }
            }
            "os.fork" | "os.forkpty" | "pty.fork" if self.loop_depth > 0 => {
                self.check("fork_loop", at, None);
            }
            "sys.setrecursionlimit" => {
                let big = match first {
                    Some(Expr::NumberLiteral(n)) => match &n.value {
                        Number::Int(i) => i.as_i64().is_none_or(|v| v > 10_000),
                        _ => true,
                    },
                    _ => true,
                };
                if big {
                    self.check("recursion_limit", at, None);
                }
            }
            "os.environ.copy" | "os.environ.items" | "os.environ.keys" | "os.environ.values" => {
                self.check("environ_dump", at, None);
            }
            _ => {}
        }
        if args
            .iter()
            .any(|a| self.qualified(a).as_deref() == Some("os.environ"))
        {
            self.check("environ_dump", at, None);
        }
    }

    /// A dangerous callable named where it is not called (put in a container, passed on,
    /// a default argument, returned): it is going somewhere to be called, so it counts.
    fn value_reference(&mut self, expr: &Expr) {
        let loads = match expr {
            Expr::Name(n) => n.ctx == ruff_python_ast::ExprContext::Load,
            Expr::Attribute(a) => a.ctx == ruff_python_ast::ExprContext::Load,
            _ => false,
        };
        let at = expr.range().start();
        if !loads || self.called.contains(&at) {
            return;
        }
        let Some(name) = self.qualified(expr).filter(|q| self.dangerous(q)) else {
            return;
        };
        let ids: Vec<usize> = (self.rules.rules.iter().enumerate())
            .filter(|(_, r)| r.calls.iter().any(|p| glob(p, &name)))
            .map(|(i, _)| i)
            .collect();
        for i in ids {
            self.hit(i, at, Some(format!("passes `{name}` around to call it")));
        }
    }

    /// A lookup by key in a namespace: `sys.modules["m"]` imports `m`; a key that cannot be
    /// known, on `sys.modules`, `globals()`, `vars()` or the builtins, hides what it gets.
    fn lookup(&mut self, s: &ruff_python_ast::ExprSubscript) {
        let at = s.range().start();
        let namespace = match &*s.value {
            Expr::Call(c) => self
                .qualified(&c.func)
                .filter(|f| matches!(f.as_str(), "globals" | "locals" | "vars")),
            v => self
                .qualified(v)
                .filter(|q| matches!(q.as_str(), "sys.modules" | "builtins" | "__builtins__")),
        };
        let Some(namespace) = namespace else { return };
        match (namespace.as_str(), self.fold(&s.slice)) {
            ("sys.modules", Some(module)) => self.imported(&module, at),
            ("sys.modules", None) => self.check("dynamic_import", at, None),
            (_, None) => self.check("dynamic_getattr", at, None),
            _ => {}
        }
    }

    /// Does `expr` call a decoder anywhere inside it?
    fn contains_decoder(&self, expr: &Expr) -> bool {
        struct Find<'s, 'r> {
            scanner: &'s Scanner<'r>,
            found: bool,
        }
        impl<'a> Visitor<'a> for Find<'_, '_> {
            fn visit_expr(&mut self, expr: &'a Expr) {
                if let Expr::Call(c) = expr {
                    let decodes = match self.scanner.qualified(&c.func) {
                        Some(n) => DECODERS.iter().any(|p| glob(p, &n)),
                        // `something.decode(...)`
                        None => {
                            matches!(&*c.func, Expr::Attribute(a) if a.attr.as_str() == "decode")
                        }
                    };
                    self.found |= decodes;
                }
                walk_expr(self, expr);
            }
        }
        let mut f = Find {
            scanner: self,
            found: false,
        };
        f.visit_expr(expr);
        f.found
    }
}

impl<'a> Visitor<'a> for Scanner<'_> {
    fn visit_stmt(&mut self, stmt: &'a Stmt) {
        match stmt {
            Stmt::Import(i) => {
                for alias in &i.names {
                    let module = alias.name.as_str();
                    self.imported(module, alias.range().start());
                    match &alias.asname {
                        Some(local) => {
                            self.aliases.insert(local.as_str().into(), module.into());
                        }
                        None => {
                            // `import os.path` binds `os`.
                            let root = module.split('.').next().unwrap_or(module);
                            self.aliases.insert(root.into(), root.into());
                        }
                    }
                }
            }
            Stmt::ImportFrom(i) => {
                let module = i.module.as_ref().map(|m| m.as_str()).unwrap_or_default();
                if !module.is_empty() {
                    self.imported(module, i.range().start());
                }
                for alias in &i.names {
                    let name = alias.name.as_str();
                    let full = if module.is_empty() {
                        name.to_string()
                    } else {
                        format!("{module}.{name}")
                    };
                    if name == "*" {
                        self.stars.push(module.to_string());
                    } else {
                        // `from http import client` imports the module `http.client`.
                        self.imported(&full, alias.range().start());
                        let local = alias.asname.as_ref().map_or(name, |a| a.as_str());
                        self.aliases.insert(local.into(), full);
                    }
                }
            }
            Stmt::Assign(a) => {
                walk_stmt(self, stmt);
                // `sp = __import__("subprocess")`, `f = getattr(os, "system")`, `o = os`.
                if let [Expr::Name(target)] = a.targets.as_slice() {
                    let id = target.id.to_string();
                    match self.qualified(&a.value) {
                        Some(q) => self.aliases.insert(id.clone(), q),
                        None => self.aliases.remove(&id),
                    };
                    // `name = "sys" + "tem"`, then `getattr(os, name)`.
                    match self.fold(&a.value) {
                        Some(text) => self.consts.insert(id.clone(), text),
                        None => self.consts.remove(&id),
                    };
                    // `get = lambda m: m.system`, then `get(os)`.
                    match &*a.value {
                        Expr::Lambda(l) => {
                            let params = l.parameters.as_deref().map(parameter_names);
                            self.lambdas
                                .insert(id, (params.unwrap_or_default(), (*l.body).clone()));
                        }
                        _ => {
                            self.lambdas.remove(&id);
                        }
                    }
                }
                return;
            }
            Stmt::For(_) | Stmt::While(_) => {
                self.loop_depth += 1;
                walk_stmt(self, stmt);
                self.loop_depth -= 1;
                return;
            }
            Stmt::FunctionDef(f) => {
                // A function shadows a builtin of its name from here on; what it returns is
                // followed like a lambda's (`def pick(m): return m.system`).
                let name = f.name.as_str().to_string();
                self.aliases.remove(&name);
                self.consts.remove(&name);
                let returned = f.body.iter().find_map(|s| match s {
                    Stmt::Return(r) => r.value.as_deref().cloned(),
                    _ => None,
                });
                match returned {
                    Some(body) => {
                        self.lambdas
                            .insert(name, (parameter_names(&f.parameters), body));
                    }
                    None => {
                        self.lambdas.remove(&name);
                    }
                }
            }
            _ => {}
        }
        walk_stmt(self, stmt);
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
        self.value_reference(expr);
        match expr {
            Expr::Call(c) => self.on_call(c),
            Expr::Name(n) if DUNDER_ESCAPES.contains(&n.id.as_str()) => {
                self.check(
                    "builtins_access",
                    n.range().start(),
                    Some(format!("`{}`", n.id)),
                );
            }
            Expr::Attribute(a) if DUNDER_ESCAPES.contains(&a.attr.as_str()) => {
                self.check(
                    "builtins_access",
                    a.range().start(),
                    Some(format!("`{}`", a.attr)),
                );
            }
            Expr::Subscript(s)
                if self
                    .fold(&s.slice)
                    .is_some_and(|k| DUNDER_ESCAPES.contains(&k.as_str())) =>
            {
                self.check("builtins_access", s.range().start(), None);
            }
            Expr::Subscript(s) => self.lookup(s),
            Expr::StringLiteral(s) => {
                let text = s.value.to_str();
                let at = s.range().start();
                let ids: Vec<(usize, String)> = (self.rules.rules.iter().enumerate())
                    .filter_map(|(i, r)| {
                        r.strings
                            .iter()
                            .find(|needle| text.contains(needle.as_str()))
                            .map(|n| (i, n.clone()))
                    })
                    .collect();
                for (i, needle) in ids {
                    self.hit(i, at, Some(format!("mentions `{needle}`")));
                }
                let len = text.chars().count();
                if len > 1000 || (len >= 200 && entropy(text) > 4.5) {
                    self.check(
                        "long_string",
                        at,
                        Some(format!("{len} characters, {:.1} bits each", entropy(text))),
                    );
                }
            }
            Expr::BinOp(b) if b.op == Operator::Add => {
                let chrs = count_chr(expr, self);
                if chrs >= 5 {
                    self.check(
                        "chr_chain",
                        expr.range().start(),
                        Some(format!("{chrs} chr() calls")),
                    );
                }
            }
            _ => {}
        }
        walk_expr(self, expr);
    }
}

/// `chr(...)` calls in a chain of `+`.
fn count_chr(expr: &Expr, s: &Scanner<'_>) -> usize {
    match expr {
        Expr::BinOp(b) if b.op == Operator::Add => count_chr(&b.left, s) + count_chr(&b.right, s),
        Expr::Call(c) if s.qualified(&c.func).as_deref() == Some("chr") => 1,
        _ => 0,
    }
}

/// A non-negative integer literal (a subscript's index).
fn index(expr: &Expr) -> Option<usize> {
    match expr {
        Expr::NumberLiteral(n) => match &n.value {
            Number::Int(i) => usize::try_from(i.as_u64()?).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// Outside the working directory: absolute (but for `/tmp` and `/dev/null`) or climbing out.
fn outside(path: &str) -> bool {
    let absolute = path.starts_with('/')
        && !path.starts_with("/tmp/")
        && path != "/tmp"
        && path != "/dev/null"
        && !path.starts_with("/work/");
    absolute || path.split('/').any(|p| p == "..") || path.starts_with('~')
}

/// Shannon entropy in bits per character.
fn entropy(text: &str) -> f64 {
    let mut counts: HashMap<char, usize> = HashMap::new();
    let mut n = 0usize;
    for c in text.chars() {
        *counts.entry(c).or_default() += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    counts
        .values()
        .map(|&k| {
            let p = k as f64 / n as f64;
            -p * p.log2()
        })
        .sum()
}
