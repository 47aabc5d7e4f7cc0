//! Whether an ELF file is a Node.js runtime whatever its name: the
//! functions every build of Node exports for native addons
//! (`napi_module_register`, `node_module_register`) and its entry point
//! `node::Start`, among its defined dynamic symbols; or a mapped library
//! named `libnode.so*` (a Node built as a shared library). An executable
//! called `api` that is Node (a single-executable application, a
//! renamed copy, Electron's main process) is then watched as Node.

use object::{Object, ObjectSymbol};

/// Exports of a Node runtime; two of them must be there (an addon imports
/// them, and imports are not counted).
const NODE_EXPORTS: [&str; 3] = [
    "napi_module_register",
    "node_module_register",
    "_ZN4node5StartEiPPc",
];

/// Whether the names exported by a file make it a Node runtime.
pub fn exports_node<'a>(exported: impl IntoIterator<Item = &'a str>) -> bool {
    let mut found = [false; NODE_EXPORTS.len()];
    for name in exported {
        let bare = name.split('@').next().unwrap_or(name);
        if let Some(at) = NODE_EXPORTS.iter().position(|n| *n == bare) {
            found[at] = true;
        }
    }
    found.iter().filter(|f| **f).count() >= 2
}

/// Whether the ELF `data` exports a Node runtime (defined dynamic symbols).
pub fn is_node(data: &[u8]) -> bool {
    let Ok(file) = object::File::parse(data) else {
        return false;
    };
    let names: Vec<&str> = file
        .dynamic_symbols()
        .filter(|s| !s.is_undefined() && s.address() != 0)
        .filter_map(|s| s.name().ok())
        .collect();
    exports_node(names)
}

/// Whether a mapped file's name is Node's shared library (`libnode.so.108`).
pub fn is_node_library(file_name: &str) -> bool {
    file_name
        .strip_prefix("libnode.so")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_node_exports_make_node_and_one_does_not() {
        assert!(exports_node([
            "uv_run",
            "napi_module_register",
            "_ZN4node5StartEiPPc"
        ]));
        assert!(exports_node([
            "napi_module_register@@NODE",
            "node_module_register"
        ]));
        assert!(!exports_node(["napi_module_register", "uv_run"]));
        assert!(!exports_node(["main", "Py_Initialize"]));
    }

    #[test]
    fn node_s_library_is_told_by_name() {
        assert!(is_node_library("libnode.so.108"));
        assert!(is_node_library("libnode.so"));
        assert!(!is_node_library("libnodejs-helper.so"));
        assert!(!is_node_library("libnode.sox"));
    }

    #[test]
    fn an_elf_without_node_exports_is_not_node() {
        let own = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_node(&own));
        assert!(!is_node(b"not an ELF"));
        // Debian's node, where it is installed (the e2e machines have it).
        if let Ok(node) = std::fs::read("/usr/bin/node") {
            assert!(is_node(&node));
        }
    }
}
