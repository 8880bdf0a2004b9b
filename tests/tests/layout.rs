//! The layout's rules, checked on the code itself: what each crate may
//! build (ARCHITECTURE.md, bird's-eye view), and no import cycle between
//! the modules of one crate.
#![allow(clippy::unwrap_used)] // test code: a failure is the test failing

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The crates whose modules must not import each other in a circle.
const CRATES: &[&str] =
    &["sync-protocol", "service-kit", "edge-node", "cloud-store", "cloud-bridge", "projector", "auth-service"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The packages in `cargo tree -p package`, dev-dependencies included.
fn dependency_tree(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(workspace())
        .args(["tree", "--locked", "--offline", "--prefix", "none", "--format", "{p}", "-p", package])
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_crate_builds_only_what_its_process_needs() {
    let rules: [(&str, &[&str]); 3] = [
        ("auth-service", &["rdkafka", "automerge", "rayon"]),
        ("edge-node", &["mongodb", "redis", "rdkafka"]),
        ("cloud-store", &["axum"]),
    ];
    for (package, forbidden) in rules {
        let tree = dependency_tree(package);
        assert!(tree.contains(package), "cargo tree lists {package} itself: {tree:?}");
        for name in forbidden {
            assert!(!tree.contains(*name), "{package} depends on {name}");
        }
    }
}

/// The module a source file is, as a path from the crate root.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let mut parts: Vec<String> =
        file.strip_prefix(src).unwrap().with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("lib" | "main" | "mod")) {
        parts.pop();
    }
    parts
}

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.ends_with("bin") {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("main.rs") {
            found.push(path);
        }
    }
}

/// Which modules each module names, outside comments and its unit tests;
/// a module naming its own parent or child does not count (a parent
/// declares its children, and children use what it declares).
fn imports(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let text = std::fs::read_to_string(file).unwrap();
        let code: String = text
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap()
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let mut named = BTreeSet::new();
        for (prefix, base) in [("crate::", Vec::new()), ("super::", module[..module.len().saturating_sub(1)].to_vec())]
        {
            for (at, _) in code.match_indices(prefix) {
                let path: Vec<String> = code[at + prefix.len()..]
                    .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap()
                    .split("::")
                    .map(str::to_owned)
                    .collect();
                let full: Vec<String> = base.iter().cloned().chain(path).collect();
                let target = (1..=full.len()).rev().map(|k| full[..k].to_vec()).find(|p| modules.contains(p));
                if let Some(target) = target {
                    let related = target.starts_with(&module) || module.starts_with(&target);
                    if !related {
                        named.insert(target);
                    }
                }
            }
        }
        graph.insert(module, named);
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>, start: &Vec<String>) -> Option<Vec<String>> {
    let mut stack = vec![(start.clone(), vec![start.join("::")])];
    let mut seen = BTreeSet::new();
    while let Some((module, path)) = stack.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next == start {
                return Some(path.into_iter().chain([start.join("::")]).collect());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), path.iter().cloned().chain([next.join("::")]).collect()));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    for name in CRATES {
        let graph = imports(&workspace().join(name).join("src"));
        assert!(graph.len() > 1 || *name == "projector", "{name}: modules found: {graph:?}");
        for module in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, module) {
                panic!("{name}: an import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}
