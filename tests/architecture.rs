//! The module graph has no cycles: every `crate::…` and `super::…` path in src/ is an edge
//! from the file that writes it to the module file it names, and the graph of those edges
//! must be acyclic. A file naming one of its own ancestors (a child using its parent
//! module's error type, say) is not an edge: that is how Rust modules are meant to be read,
//! and it cannot hide a cycle between siblings, which still needs a sibling edge each way.
//! Cycles are what make a concern impossible to change in one place.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `src/a/b.rs` -> ["a", "b"], `src/a/mod.rs` -> ["a"], `src/main.rs` -> [].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "main" | "lib")) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments, string and char literals (so that a path in a doc comment
/// or an error message is not read as a dependency).
fn code_only(s: &str) -> String {
    let b: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            '/' if b.get(i + 1) == Some(&'/') => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
            }
            '/' if b.get(i + 1) == Some(&'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == '*' && b[i + 1] == '/') {
                    i += 1;
                }
                i += 2;
            }
            'r' if b.get(i + 1) == Some(&'"') || (b.get(i + 1) == Some(&'#') && !b[i.saturating_sub(1)].is_alphanumeric()) => {
                // Raw string r"…" or r#"…"#.
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&'"') {
                    out.push(b[i]);
                    i += 1;
                    continue;
                }
                j += 1;
                loop {
                    if j >= b.len() {
                        break;
                    }
                    if b[j] == '"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&'#')) {
                        j += 1 + hashes;
                        break;
                    }
                    j += 1;
                }
                out.push_str("\"\"");
                i = j;
            }
            '"' => {
                i += 1;
                while i < b.len() && b[i] != '"' {
                    if b[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                out.push_str("\"\"");
            }
            '\'' if b.get(i + 2) == Some(&'\'') || (b.get(i + 1) == Some(&'\\')) => {
                // A char literal ('a', '\n', '\u{..}'); lifetimes ('a) have no closing quote.
                let mut j = i + 1;
                if b[j] == '\\' {
                    j += 2;
                }
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str("' '");
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

fn ident_at(b: &[char], mut i: usize) -> (String, usize) {
    let start = i;
    while i < b.len() && (b[i].is_alphanumeric() || b[i] == '_') {
        i += 1;
    }
    (b[start..i].iter().collect(), i)
}

fn skip_ws(b: &[char], mut i: usize) -> usize {
    while i < b.len() && b[i].is_whitespace() {
        i += 1;
    }
    i
}

/// Reads a path tail at `i` (after a `::`): `a::b::{c, d::e}` -> [a::b::c, a::b::d::e] appended
/// to `prefix`.
fn read_paths(b: &[char], i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut i = skip_ws(b, i);
    if b.get(i) == Some(&'{') {
        i += 1;
        loop {
            i = skip_ws(b, i);
            match b.get(i) {
                Some('}') => return i + 1,
                Some(',') => i += 1,
                None => return i,
                _ => {
                    let before = i;
                    i = read_paths(b, i, prefix.clone(), out);
                    if i == before {
                        i += 1;
                    }
                }
            }
        }
    }
    let (id, j) = ident_at(b, i);
    if id.is_empty() {
        out.push(prefix);
        return i;
    }
    let mut path = prefix;
    path.push(id);
    let k = skip_ws(b, j);
    if b.get(k) == Some(&':') && b.get(k + 1) == Some(&':') {
        read_paths(b, k + 2, path, out)
    } else {
        out.push(path);
        j
    }
}

/// Every `crate::…` and `super::…` path of a file, made absolute from its module.
fn paths_of(code: &str, module: &[String]) -> Vec<Vec<String>> {
    let b: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let boundary = i == 0 || !(b[i - 1].is_alphanumeric() || b[i - 1] == '_' || b[i - 1] == ':');
        if !boundary {
            i += 1;
            continue;
        }
        let (id, j) = ident_at(&b, i);
        if (id == "crate" || id == "super") && b.get(j) == Some(&':') && b.get(j + 1) == Some(&':') {
            let mut base: Vec<String> = if id == "crate" {
                vec![]
            } else {
                // The module path of a.rs and of a/mod.rs is the same (`a`), so `super` is
                // its parent in both cases.
                let mut m = module.to_vec();
                m.pop();
                m
            };
            let mut k = j + 2;
            if id == "super" {
                // super::super::…
                loop {
                    let (next, n) = ident_at(&b, k);
                    if next == "super" && b.get(n) == Some(&':') && b.get(n + 1) == Some(&':') {
                        base.pop();
                        k = n + 2;
                    } else {
                        break;
                    }
                }
            }
            i = read_paths(&b, k, base, &mut out);
        } else {
            i = if j > i { j } else { i + 1 };
        }
    }
    out
}

/// Finds a cycle in the graph, if any (depth-first, colouring).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(n, graph, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

/// The file-level module graph of src/ (module path joined with "::"; "crate" for the root).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let name = |m: &[String]| if m.is_empty() { "crate".to_string() } else { m.join("::") };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        // Binaries under src/bin are crates of their own.
        if f.strip_prefix(src).unwrap().starts_with("bin") {
            continue;
        }
        let module = module_of(src, f);
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        let from = name(&module);
        let entry = graph.entry(from.clone()).or_default();
        for p in paths_of(&code, &module) {
            // The deepest module file the path names.
            let mut target = p.clone();
            while !target.is_empty() && !modules.contains(&target) {
                target.pop();
            }
            let is_ancestor = module.starts_with(&target);
            if !is_ancestor {
                entry.insert(name(&target));
            }
        }
    }
    graph
}

/// Groups of modules that reach each other (strongly connected components of more than one
/// module), each sorted; Kosaraju's two passes.
fn tangles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn order(n: &str, g: &BTreeMap<String, BTreeSet<String>>, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
        if !seen.insert(n.to_string()) {
            return;
        }
        for m in g.get(n).into_iter().flatten() {
            order(m, g, seen, out);
        }
        out.push(n.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut finished = Vec::new();
    for n in graph.keys() {
        order(n, graph, &mut seen, &mut finished);
    }
    let mut reverse: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (n, ms) in graph {
        for m in ms {
            reverse.entry(m.clone()).or_default().insert(n.clone());
        }
    }
    let mut seen = BTreeSet::new();
    let mut groups = Vec::new();
    for n in finished.iter().rev() {
        let mut group = Vec::new();
        order(n, &reverse, &mut seen, &mut group);
        if group.len() > 1 {
            group.sort();
            groups.push(group);
        }
    }
    groups
}

#[test]
fn module_graph_has_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() > 20, "read only {} modules from src/", graph.len());
    assert_acyclic(&graph, "modules");
}

/// Panics with the cycle found and every group of nodes that reach each other.
fn assert_acyclic(graph: &BTreeMap<String, BTreeSet<String>>, what: &str) {
    if let Some(cycle) = find_cycle(graph) {
        let groups: Vec<String> = tangles(graph).iter().map(|g| g.join(", ")).collect();
        panic!(
            "import cycle between {what}: {}\nall {what} on cycles, by group:\n  {}",
            cycle.join(" -> "),
            groups.join("\n  ")
        );
    }
}

/// The checker itself: it must see a cycle that is there, through `super`, nested `use`
/// groups and `crate` paths, and ignore paths in comments and strings.
#[test]
fn cycle_checker_sees_cycles_and_ignores_comments() {
    let dir = std::env::temp_dir().join(format!("arch-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("a")).unwrap();
    std::fs::write(src.join("main.rs"), "mod a; mod b;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "pub mod x; pub mod y; pub struct E;\n").unwrap();
    std::fs::write(src.join("a/x.rs"), "use super::{E, y::{Y}};\n// crate::b::B\n").unwrap();
    std::fs::write(src.join("a/y.rs"), "pub struct Y; fn f() -> &'static str { \"crate::b\" }\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub struct B;\n").unwrap();
    let g = module_graph(&src);
    assert_eq!(g["a::x"], BTreeSet::from(["a::y".to_string()]));
    assert!(g["a::y"].is_empty(), "{:?}", g["a::y"]);
    assert!(find_cycle(&g).is_none());
    std::fs::write(src.join("a/y.rs"), "pub struct Y; use crate::b::B;\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub struct B; fn g(_: crate::a::x::Z) {}\n").unwrap();
    let g = module_graph(&src);
    let cycle = find_cycle(&g).expect("a::x -> a::y -> b -> a::x is a cycle");
    assert!(cycle.contains(&"b".to_string()), "{cycle:?}");
    assert_eq!(tangles(&g), vec![vec!["a::x".to_string(), "a::y".into(), "b".into()]]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same at the level of the top folders (api, server, pipelines, models, training, jobs,
/// ...): a layer may use the layers below it, never one above.
#[test]
fn top_level_modules_have_no_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in module_graph(&src) {
        let entry = graph.entry(top(&from)).or_default();
        for to in tos {
            if top(&to) != top(&from) && to != "crate" {
                entry.insert(top(&to));
            }
        }
    }
    assert_acyclic(&graph, "top-level modules");
}

/// The public API's schemas are defined in src/api only: a type elsewhere that derived them
/// would change the OpenAPI document whenever that layer changed.
#[test]
fn only_the_api_layer_defines_openapi_schemas() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let offenders: Vec<_> = files
        .iter()
        .filter(|f| !f.starts_with(src.join("api")))
        .filter(|f| code_only(&std::fs::read_to_string(f).unwrap()).contains("utoipa"))
        .collect();
    assert!(offenders.is_empty(), "utoipa used outside src/api: {offenders:?}");
}
