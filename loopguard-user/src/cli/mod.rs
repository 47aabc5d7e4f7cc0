//! The command layer: one function per subcommand ([`commands`]), each
//! wiring the stages below for `attach`, `run`, `config` and `report`.

pub mod commands;
pub mod report;
