//! Parsers of what a target process hands loopguard, and nothing else: no
//! aya, no system calls, no kernel. Every input is untrusted bytes or text
//! from the target's executable; every parser returns a value or an error,
//! never panics (the `fuzz/` targets check that), and is unit-tested with
//! synthetic inputs on any toolchain.
//!
//! - [`btf`]: the kernel's raw BTF → byte offsets of struct members (the
//!   run queue's steal clock, read by the context-switch program).
//! - [`elf`]: an executable's bytes → [`elf::BinaryInfo`]: Tokio's task
//!   poll copies with their verified task layout, blocking-pool code, the
//!   middleware's USDT sites and in-flight tables, every function symbol.
//! - [`usdt`]: `.note.stapsdt` bytes → [`usdt::UsdtNote`]s; argument
//!   strings (`-8@%rdi`) → [`usdt::ArgSpec`]s in `pt_regs` offsets.
//! - [`vtable`]: the words around a task vtable → [`vtable::TaskLayout`].
//! - [`symbols`]: symbol names → [`symbols::SymbolRole`] (legacy and v0
//!   demangling).
//! - [`version`]: the Tokio version a binary was built with, and whether
//!   it is a Rust or Tokio program at all, from its bytes.
//! - [`interpreter`]: whether an ELF file is a Node runtime whatever its
//!   name (its addon exports), or a mapped file is Node's shared library.
//! - [`waits`]: the functions an event-loop thread waits in (epoll
//!   wrappers, Tokio's parks) among an ELF file's symbols.
//! - [`placement`]: where on a function an entry probe costs least (an
//!   instruction the kernel emulates rather than single-steps).
//! - [`linetable`]: the source line of an instruction, from a `CPython`
//!   3.11+ code object's location table (read from a Python target).
//!
//! `loopguard`'s `discover` stage reads the files from `/proc` and hands
//! their bytes here.

pub mod btf;
pub mod elf;
pub mod interpreter;
pub mod linetable;
pub mod park_calls;
pub mod placement;
pub mod symbols;
pub mod usdt;
pub mod version;
pub mod vtable;
pub mod waits;
