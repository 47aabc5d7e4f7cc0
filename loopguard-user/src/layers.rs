//! The import graph of this crate, checked: every stage (a top-level
//! module of `src/`) imports only the stages before it in [`LAYERS`], so
//! there is no cycle and no import up the layers. Test modules
//! (`#[cfg(test)] mod tests`, the end of a file) may drive a higher stage
//! and are left out.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The stages, lowest first: the pipeline's order, then the layers that
/// drive it. A new top-level module must be placed here.
const LAYERS: &[&str] = &[
    "term",
    "privilege",
    "discover",
    "attach",
    "collect",
    "detect",
    "attribute",
    "stacks",
    "events",
    "export",
    "present",
    "config",
    "error",
    "watch",
    "follow",
    "host",
    "cli",
];

/// Files that are not a stage: the crate root, the binary and the
/// crate's own tests.
const ROOTS: &[&str] = &["lib", "main", "layers", "lengths"];

/// The stage a file under `src/` belongs to: its first path component.
fn stage_of(relative: &Path) -> String {
    let first = relative.components().next().map_or_else(String::new, |c| {
        c.as_os_str().to_string_lossy().into_owned()
    });
    first.strip_suffix(".rs").unwrap_or(&first).to_owned()
}

/// The stages `source` names as `crate::STAGE`, outside comments and its
/// test module. `diag!` (defined at the root) writes through `term`.
fn imports(source: &str) -> BTreeSet<String> {
    let code = source
        .find("#[cfg(test)]\nmod tests")
        .map_or(source, |end| &source[..end]);
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let name = if name == "diag" {
                "term".to_owned()
            } else {
                name
            };
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Every edge `(from, to, file)` that goes up (or to an unlisted stage).
fn violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let rank = |stage: &str| LAYERS.iter().position(|layer| *layer == stage);
    let mut bad = Vec::new();
    for (path, source) in files {
        let from = stage_of(path);
        if ROOTS.contains(&from.as_str()) {
            continue;
        }
        let Some(from_rank) = rank(&from) else {
            bad.push(format!(
                "{}: stage `{from}` is not in LAYERS",
                path.display()
            ));
            continue;
        };
        for to in imports(source) {
            if to == from {
                continue;
            }
            match rank(&to) {
                Some(to_rank) if to_rank < from_rank => {}
                Some(_) => bad.push(format!(
                    "{}: `{from}` imports `{to}`, a later stage",
                    path.display()
                )),
                None => bad.push(format!(
                    "{}: `{from}` imports `{to}`, which is not in LAYERS",
                    path.display()
                )),
            }
        }
    }
    bad
}

fn sources(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/").path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            let source = std::fs::read_to_string(&path).expect("read a source file");
            let relative = path.strip_prefix(root).expect("under src/").to_path_buf();
            out.push((relative, source));
        }
    }
}

#[test]
fn stages_import_only_the_stages_before_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let bad = violations(&files);
    assert!(bad.is_empty(), "imports up the layers:\n{}", bad.join("\n"));
}

#[test]
fn an_upward_import_is_caught() {
    let files = vec![
        (
            PathBuf::from("discover/mod.rs"),
            "use crate::present::text::printable; // crate::cli in a comment\n".to_owned(),
        ),
        (
            PathBuf::from("present/text.rs"),
            "use crate::events::Event;\n#[cfg(test)]\nmod tests {\n use crate::cli::x;\n}\n"
                .to_owned(),
        ),
        (PathBuf::from("newstage.rs"), String::new()),
    ];
    assert_eq!(
        violations(&files),
        [
            "discover/mod.rs: `discover` imports `present`, a later stage",
            "newstage.rs: stage `newstage` is not in LAYERS",
        ]
    );
}
