//! Function lengths, checked: no function of this crate or of
//! loopguard-parse (outside test modules) runs over [`MAX_FN_LINES`] lines,
//! from its `fn` line to its closing brace. Functions are found the way rustfmt lays them out: a
//! line that starts an item with `fn`, ended by the first line that is
//! its indentation and `}`.

use std::path::{Path, PathBuf};

/// The longest a function may be: about a screen.
const MAX_FN_LINES: usize = 60;

/// The name of the function starting on `line`, with its indentation.
fn fn_start(line: &str) -> Option<(&str, &str)> {
    let code = line.trim_start();
    let indent = &line[..line.len() - code.len()];
    let mut rest = code;
    for prefix in [
        "pub(crate) ",
        "pub(super) ",
        "pub ",
        "const ",
        "async ",
        "unsafe ",
    ] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let name = rest.strip_prefix("fn ")?;
    let end = name
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(name.len());
    (end > 0).then(|| (indent, &name[..end]))
}

/// `(name, first line, lines)` of every function in `source` longer than
/// `max` lines, outside its test module.
fn long_fns(source: &str, max: usize) -> Vec<(String, usize, usize)> {
    let code = source
        .find("#[cfg(test)]\nmod tests")
        .map_or(source, |end| &source[..end]);
    let lines: Vec<&str> = code.lines().collect();
    let mut long = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let Some((indent, name)) = fn_start(line) else {
            continue;
        };
        let mut end = None;
        for (at, line) in lines.iter().enumerate().skip(start) {
            let line = line.trim_end();
            // A declaration without a body (a trait method).
            if at == start && line.ends_with(';') {
                break;
            }
            let one_line = at == start && line.ends_with('}') && line.contains('{');
            if one_line || line.strip_prefix(indent) == Some("}") {
                end = Some(at);
                break;
            }
        }
        if let Some(end) = end
            && end - start + 1 > max
        {
            long.push((name.to_owned(), start + 1, end - start + 1));
        }
    }
    long
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_function_runs_over_the_limit() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate is in the workspace");
    let mut long = Vec::new();
    for (crate_name, at_least) in [("loopguard-user", 20), ("loopguard-parse", 5)] {
        let mut files = Vec::new();
        sources(&workspace.join(crate_name).join("src"), &mut files);
        assert!(
            files.len() > at_least,
            "found only {} files in {crate_name}",
            files.len()
        );
        for path in files {
            let source = std::fs::read_to_string(&path).expect("read a source file");
            let relative = path.strip_prefix(workspace).unwrap_or(&path).display();
            for (name, line, lines) in long_fns(&source, MAX_FN_LINES) {
                long.push(format!("{relative}:{line}: `{name}` is {lines} lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them by meaning):\n{}",
        long.join("\n")
    );
}

#[test]
fn a_long_function_is_caught_and_the_others_are_not() {
    let body = "    x();\n".repeat(5);
    let source = format!(
        "pub fn short() {{}}\n\
         trait T {{\n    fn declared(&self);\n}}\n\
         impl S {{\n    pub(super) async fn long(&self) {{\n{body}    }}\n}}\n\
         fn three() {{\n    y();\n}}\n\
         #[cfg(test)]\nmod tests {{\n    fn long_test() {{\n{body}    }}\n}}\n"
    );
    assert_eq!(long_fns(&source, 3), [("long".to_owned(), 6, 7)]);
    assert!(long_fns(&source, 7).is_empty());
}
