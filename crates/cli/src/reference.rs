//! `docs/CLI.md`: the command-line and environment reference, written from the commands' own
//! clap definitions so it cannot drift from them. A unit test compares the file with what
//! [`markdown`] writes; `FLEETBOX_BLESS=1 cargo test -p fleetbox reference` rewrites it.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clap::{Arg, Command};

/// The reference for `root` and every subcommand under it, then every environment variable
/// a flag reads.
pub fn markdown(root: &Command) -> String {
    let mut out = String::new();
    out.push_str("# Command-line reference\n\n");
    out.push_str(
        "Written from the commands' own definitions (`crates/cli/src/reference.rs`): a test fails \
         when this file and the code differ, and `FLEETBOX_BLESS=1 cargo test -p fleetbox reference` \
         rewrites it. Flags also read `fleetbox.toml` where README's *Configuration* says so; \
         flags beat the environment, which beats the file.\n\n",
    );
    let mut env = Env::new();
    let mut commands = Vec::new();
    walk(root, &mut Vec::new(), &mut commands);
    out.push_str("## Commands\n\n");
    for (path, _) in &commands {
        let _ = writeln!(out, "- [`{path}`](#{})", anchor(path));
    }
    out.push_str("\nOptions every command takes:\n\n");
    table(
        &mut out,
        "fleetbox",
        root.get_arguments().filter(|a| a.is_global_set()),
        &mut env,
    );
    let everywhere: Vec<&str> = root
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| a.get_id().as_str())
        .collect();
    for (path, cmd) in &commands {
        command(&mut out, path, cmd, &everywhere, &mut env);
    }
    out.push_str("## Environment variables\n\n");
    out.push_str(
        "Read through the flags above (those read elsewhere, for logging, tracing and run \
         settings, are listed in `crates/proto/src/env.rs`).\n\n",
    );
    out.push_str("| variable | flag | commands |\n|---|---|---|\n");
    for ((var, flag), paths) in &env {
        let on = if paths.len() > 4 {
            format!("{} commands", paths.len())
        } else {
            paths
                .iter()
                .map(|p| format!("`{p}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(out, "| `{var}` | `{flag}` | {on} |");
    }
    out
}

/// (variable, flag) → the commands whose flag reads it.
type Env = BTreeMap<(String, String), Vec<String>>;

/// Every command under `cmd` (itself included when it does something), depth first.
fn walk<'a>(cmd: &'a Command, path: &mut Vec<String>, out: &mut Vec<(String, &'a Command)>) {
    path.push(cmd.get_name().to_string());
    let runs_itself = !cmd.is_subcommand_required_set() && path.len() > 1;
    if runs_itself || cmd.get_subcommands().next().is_none() {
        out.push((path.join(" "), cmd));
    }
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" && !sub.is_hide_set() {
            walk(sub, path, out);
        }
    }
    path.pop();
}

/// A GitHub-style heading anchor of `## \`PATH\``.
fn anchor(path: &str) -> String {
    path.chars()
        .filter_map(|c| match c {
            ' ' | '-' => Some('-'),
            c if c.is_ascii_alphanumeric() => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn command(out: &mut String, path: &str, cmd: &Command, everywhere: &[&str], env: &mut Env) {
    let _ = writeln!(out, "## `{path}`\n");
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        let _ = writeln!(out, "{}\n", one_paragraph(&about.to_string()));
    }
    // The options every command takes are listed once, at the top.
    let own = cmd
        .get_arguments()
        .filter(|a| !everywhere.contains(&a.get_id().as_str()));
    table(out, path, own, env);
}

fn table<'a>(out: &mut String, path: &str, args: impl Iterator<Item = &'a Arg>, env: &mut Env) {
    let args: Vec<&Arg> = args
        .filter(|a| !a.is_hide_set() && !["help", "version"].contains(&a.get_id().as_str()))
        .collect();
    if args.is_empty() {
        return;
    }
    out.push_str("| argument | environment | default | what |\n|---|---|---|---|\n");
    for a in args {
        let name = flag(a);
        let var = a.get_env().map(|v| v.to_string_lossy().to_string());
        if let Some(v) = &var {
            let flag = name.split(' ').next().unwrap_or_default().to_string();
            env.entry((v.clone(), flag))
                .or_default()
                .push(path.to_string());
        }
        let default: Vec<String> = a
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().to_string())
            .collect();
        let mut what = a
            .get_long_help()
            .or(a.get_help())
            .map(|h| one_paragraph(&h.to_string()))
            .unwrap_or_default();
        let values: Vec<String> = a
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !values.is_empty() && a.get_action().takes_values() {
            if !what.is_empty() && !what.ends_with('.') {
                what.push('.');
            }
            let _ = write!(what, " One of {}.", values.join(", "));
        }
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            name,
            var.map(|v| format!("`{v}`")).unwrap_or_default(),
            if default.is_empty() {
                String::new()
            } else {
                format!("`{}`", default.join(","))
            },
            cell(&what),
        );
    }
    out.push('\n');
}

/// `--flag <VALUE>`, `-s, --flag`, or `<NAME>` for a positional argument.
fn flag(a: &Arg) -> String {
    let value = a
        .get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| a.get_id().as_str().to_uppercase());
    let takes = a.get_action().takes_values();
    match (a.get_long(), a.get_short()) {
        (Some(long), Some(short)) if takes => format!("-{short}, --{long} <{value}>"),
        (Some(long), Some(short)) => format!("-{short}, --{long}"),
        (Some(long), None) if takes => format!("--{long} <{value}>"),
        (Some(long), None) => format!("--{long}"),
        (None, Some(short)) => format!("-{short}"),
        (None, None) => format!("<{value}>"),
    }
}

/// Help text on one line (clap keeps the doc comment's line breaks).
fn one_paragraph(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Safe inside a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}
