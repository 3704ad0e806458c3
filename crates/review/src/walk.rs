//! One pass over the AST in source order: imports and assignments feed a table of what each
//! local name stands for (`o` → `os`, `r` → `subprocess.run`, `f` → `os.system`), every call is
//! resolved through it, and each rule's matchers and checks look at what they are about.

use std::collections::HashMap;

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

pub fn scan(suite: &[Stmt], rules: &RuleSet) -> Vec<Hit> {
    let mut s = Scanner {
        rules,
        aliases: HashMap::new(),
        loop_depth: 0,
        hits: Vec::new(),
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

    /// What an expression names, as a qualified name (`os.system`), when it can be known.
    fn qualified(&self, expr: &Expr) -> Option<String> {
        match expr {
            Expr::Name(n) => {
                let id = n.id.as_str();
                match self.aliases.get(id) {
                    Some(q) => Some(q.clone()),
                    None if BUILTINS.contains(&id) => Some(id.to_string()),
                    None => None,
                }
            }
            Expr::Attribute(a) => {
                let base = self.qualified(&a.value)?;
                Some(format!("{base}.{}", a.attr.as_str()))
            }
            Expr::Call(c) => {
                let func = self.qualified(&c.func)?;
                let args = &c.arguments.args;
                match func.as_str() {
                    // `__import__("m")`, `importlib.import_module("m")`: the module.
                    "__import__" | "importlib.import_module" => fold(args.first()?),
                    // `getattr(mod, "na" + "me")`: mod.name.
                    "getattr" => {
                        let base = self.qualified(args.first()?)?;
                        Some(format!("{base}.{}", fold(args.get(1)?)?))
                    }
                    _ => None,
                }
            }
            // `vars(mod)["name"]`, `mod.__dict__["name"]`: mod.name.
            Expr::Subscript(s) => {
                let key = fold(&s.slice)?;
                let base = match &*s.value {
                    Expr::Call(c) if self.qualified(&c.func).as_deref() == Some("vars") => {
                        self.qualified(c.arguments.args.first()?)?
                    }
                    Expr::Attribute(a) if a.attr.as_str() == "__dict__" => {
                        self.qualified(&a.value)?
                    }
                    _ => return None,
                };
                Some(format!("{base}.{key}"))
            }
            _ => None,
        }
    }

    fn on_call(&mut self, call: &ruff_python_ast::ExprCall) {
        let at = call.range().start();
        let Some(name) = self.qualified(&call.func) else {
            return;
        };
        self.called(&name, at);
        let args = &call.arguments.args;
        let first = args.first();
        match name.as_str() {
            "eval" | "exec" | "compile" => {
                if let Some(arg) = first {
                    if fold(arg).is_none() {
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
            "__import__" | "importlib.import_module" => match first.and_then(fold) {
                Some(module) => self.imported(&module, at),
                None => self.check("dynamic_import", at, None),
            },
            "getattr" => {
                if args.get(1).is_some_and(|a| fold(a).is_none()) {
                    self.check("dynamic_getattr", at, None);
                }
                if let Some(key) = args.get(1).and_then(fold)
                    && DUNDER_ESCAPES.contains(&key.as_str())
                {
                    self.check("builtins_access", at, Some(format!("`{key}`")));
                }
            }
            "open" | "io.open" | "builtins.open" | "codecs.open" => {
                let mode = args.get(1).and_then(fold).or_else(|| {
                    call.arguments
                        .keywords
                        .iter()
                        .find(|k| k.arg.as_ref().is_some_and(|a| a.as_str() == "mode"))
                        .and_then(|k| fold(&k.value))
                });
                let writes = mode.is_some_and(|m| m.contains(['w', 'a', 'x', '+']));
                if writes && let Some(path) = first.and_then(fold).filter(|p| outside(p)) {
                    self.check("write_outside", at, Some(format!("writes `{path}`")));
                }
            }
            n if FILE_CHANGERS.contains(&n) => {
                if let Some(path) = first.and_then(fold).filter(|p| outside(p)) {
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
                    if name != "*" {
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
                    match self.qualified(&a.value) {
                        Some(q) => {
                            self.aliases.insert(target.id.to_string(), q);
                        }
                        None => {
                            self.aliases.remove(target.id.as_str());
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
                // A function shadows a builtin of its name from here on.
                self.aliases.remove(f.name.as_str());
            }
            _ => {}
        }
        walk_stmt(self, stmt);
    }

    fn visit_expr(&mut self, expr: &'a Expr) {
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
                if fold(&s.slice).is_some_and(|k| DUNDER_ESCAPES.contains(&k.as_str())) =>
            {
                self.check("builtins_access", s.range().start(), None);
            }
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

/// The string an expression always evaluates to, when that is plain to see: literals, `+` of
/// them, `"".join([...])` of them, `chr(N)`.
fn fold(expr: &Expr) -> Option<String> {
    match expr {
        Expr::StringLiteral(s) => Some(s.value.to_str().to_string()),
        Expr::BinOp(b) if b.op == Operator::Add => Some(fold(&b.left)? + &fold(&b.right)?),
        Expr::Call(c) => match &*c.func {
            Expr::Attribute(a) if a.attr.as_str() == "join" => {
                let sep = fold(&a.value)?;
                let parts = match c.arguments.args.first()? {
                    Expr::List(l) => &l.elts,
                    Expr::Tuple(t) => &t.elts,
                    _ => return None,
                };
                let parts: Option<Vec<String>> = parts.iter().map(fold).collect();
                Some(parts?.join(&sep))
            }
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
