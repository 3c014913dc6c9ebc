//! Lists which of the host crate's top-level modules use which, and fails
//! (exit 1) when the layering the design asks for breaks:
//!
//! - `model` is a leaf: it uses no other module of the crate;
//! - there is no cycle among `model`, `storage`, `queue`, `http`,
//!   `webhooks` and `runtime`.
//!
//! Usage: `cargo run -p module-graph [-- path/to/host/src]`.
//! A reference is any `crate::name` or `super::…::name` path in code
//! (comments and string literals are skipped), including each path of a
//! `use crate::{a::X, b::Y}` group.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The modules whose dependencies must form no cycle.
const CORE: [&str; 6] = ["model", "storage", "queue", "http", "webhooks", "runtime"];

fn main() {
    let src = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../host/src"));
    let graph = module_graph(&src);
    for (module, uses) in &graph {
        let uses: Vec<_> = uses.iter().map(String::as_str).collect();
        println!("{module} -> {}", uses.join(", "));
    }
    let mut broken = Vec::new();
    if let Some(uses) = graph.get("model").filter(|uses| !uses.is_empty()) {
        broken.push(format!("`model` must be a leaf, but it uses {uses:?}"));
    }
    if let Some(cycle) = find_cycle(&graph, &CORE) {
        broken.push(format!(
            "a cycle among the core modules: {}",
            cycle.join(" -> ")
        ));
    }
    if broken.is_empty() {
        println!("ok: `model` is a leaf, and {CORE:?} form no cycle");
    } else {
        for problem in broken {
            eprintln!("error: {problem}");
        }
        std::process::exit(1);
    }
}

/// Top-level module -> the other top-level modules it refers to.
/// The binary's own modules (`mod x;` in `main.rs`) are left out: they use
/// the library from outside, as `jobhost::…`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let main = std::fs::read_to_string(src.join("main.rs")).unwrap_or_default();
    let binary_only: Vec<String> = tokenize(&strip_comments_and_strings(&main))
        .windows(3)
        .filter(|w| w[0] == "mod" && w[2] == ";")
        .map(|w| w[1].clone())
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).expect("under src");
        let mut path: Vec<String> = relative
            .with_extension("")
            .iter()
            .map(|part| part.to_string_lossy().into_owned())
            .collect();
        if path.last().is_some_and(|last| last == "mod") {
            path.pop();
        }
        if matches!(path.as_slice(), [only] if only == "lib" || only == "main") {
            continue; // the crate roots declare the modules
        }
        if binary_only.contains(&path[0]) {
            continue; // not part of the library
        }
        let module = path[0].clone();
        let code = strip_comments_and_strings(&std::fs::read_to_string(&file).expect("readable"));
        let uses = graph.entry(module.clone()).or_default();
        for target in references(&code, &path) {
            if target != module {
                uses.insert(target);
            }
        }
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("a readable source folder") {
        let path = entry.expect("a readable entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The code without comments, and with string and char literals emptied.
fn strip_comments_and_strings(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let rest = &chars[i..];
        if rest.starts_with(&['/', '/']) {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            i += 2;
            while i < chars.len() && !chars[i..].starts_with(&['*', '/']) {
                i += 1;
            }
            i += 2;
        } else if rest.starts_with(&['r', '#']) || rest.starts_with(&['r', '"']) {
            // A raw string: r"…" or r#"…"#.
            let hashes = rest[1..].iter().take_while(|&&c| c == '#').count();
            if rest.get(1 + hashes) != Some(&'"') {
                out.push(chars[i]);
                i += 1;
                continue;
            }
            i += 2 + hashes;
            let end: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            while i < chars.len() && !chars[i..].starts_with(&end) {
                i += 1;
            }
            i += end.len();
            out.push_str("\"\"");
        } else if chars[i] == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if chars[i] == '\'' && rest.len() > 2 && (rest[2] == '\'' || rest[1] == '\\') {
            // A char literal (a lifetime has no closing quote).
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// The top-level modules that `code`, in the module at `path`, refers to.
/// Inline modules (`mod tests { … }`) count in how far `super` climbs.
fn references(code: &str, path: &[String]) -> BTreeSet<String> {
    let tokens = tokenize(code);
    let mut found = BTreeSet::new();
    // Brace depths at which the inline modules around a token opened.
    let (mut braces, mut inline): (usize, Vec<usize>) = (0, Vec::new());
    for start in 0..tokens.len() {
        match tokens[start].as_str() {
            "{" => {
                braces += 1;
                if start >= 2 && tokens[start - 2] == "mod" {
                    inline.push(braces);
                }
            }
            "}" => {
                if inline.last() == Some(&braces) {
                    inline.pop();
                }
                braces = braces.saturating_sub(1);
            }
            _ => {}
        }
        // Only where a path begins: not `foo::crate`.
        if start > 0 && tokens[start - 1] == "::" {
            continue;
        }
        let mut at = start;
        match tokens[at].as_str() {
            "crate" => {}
            "super" => {
                let mut depth = path.len() + inline.len();
                while tokens.get(at).is_some_and(|t| t == "super")
                    && tokens.get(at + 1).is_some_and(|t| t == "::")
                {
                    depth = depth.saturating_sub(1);
                    at += 2;
                }
                if depth > 0 {
                    continue; // stays inside this top-level module
                }
                at -= 2;
            }
            _ => continue,
        }
        if tokens.get(at + 1).is_none_or(|t| t != "::") {
            continue;
        }
        collect_heads(&tokens, at + 2, &mut found);
    }
    found
}

/// The first segment of the path at `at`, or of every path in the group
/// `{…}` there.
fn collect_heads(tokens: &[String], at: usize, found: &mut BTreeSet<String>) {
    match tokens.get(at).map(String::as_str) {
        Some("{") => {
            let mut depth = 0;
            let mut expect_head = true;
            for token in &tokens[at..] {
                match token.as_str() {
                    "{" => {
                        depth += 1;
                        if depth == 1 {
                            expect_head = true;
                        }
                    }
                    "}" => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    "," if depth == 1 => expect_head = true,
                    name if depth == 1 && expect_head => {
                        if is_ident(name) && name != "self" {
                            found.insert(name.to_owned());
                        }
                        expect_head = false;
                    }
                    _ => {}
                }
            }
        }
        Some(name) if is_ident(name) => {
            found.insert(name.to_owned());
        }
        _ => {}
    }
}

fn is_ident(token: &str) -> bool {
    token
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Identifiers, `::`, and single punctuation characters.
fn tokenize(code: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            let mut ident = String::from(c);
            while let Some(&next) = chars.peek().filter(|n| n.is_alphanumeric() || **n == '_') {
                ident.push(next);
                chars.next();
            }
            tokens.push(ident);
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            tokens.push("::".into());
        } else if !c.is_whitespace() {
            tokens.push(c.to_string());
        }
    }
    tokens
}

/// A cycle among `among` (restricted to edges between them), if any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>, among: &[&str]) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        among: &[&str],
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(position) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[position..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if among.contains(&next.as_str())
                && let Some(cycle) = visit(next, graph, among, stack, done)
            {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    among
        .iter()
        .find_map(|start| visit(start, graph, among, &mut Vec::new(), &mut done))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(code: &str, path: &[&str]) -> Vec<String> {
        let path: Vec<String> = path.iter().map(|p| p.to_string()).collect();
        references(&strip_comments_and_strings(code), &path)
            .into_iter()
            .collect()
    }

    #[test]
    fn finds_paths_groups_and_supers_but_not_comments_or_strings() {
        let code = r#"
            use crate::{queue::{Job, Phase}, storage::Storage as S, self};
            use super::super::http::Router;
            // crate::commented::Out
            let s = "crate::quoted::Out";
            let t = crate::model::time::now_ms();
            use super::sibling::Thing;
        "#;
        assert_eq!(
            refs(code, &["events", "inner"]),
            ["http", "model", "queue", "storage"]
        );
        assert_eq!(refs("use super::other::X;", &["top"]), ["other"]);
        // `super::super` from `mod tests` inside `top/inner.rs` is `top`.
        let nested = "mod tests { use super::super::Thing; fn f() {} } use super::x::Y;";
        assert_eq!(refs(nested, &["top", "inner"]), Vec::<String>::new());
    }

    #[test]
    fn finds_a_cycle_only_among_the_given_modules() {
        let graph: BTreeMap<String, BTreeSet<String>> =
            [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"])]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
                .collect();
        assert_eq!(
            find_cycle(&graph, &["a", "b", "c"]).unwrap(),
            ["a", "b", "c", "a"]
        );
        assert_eq!(find_cycle(&graph, &["a", "b"]), None);
    }
}
