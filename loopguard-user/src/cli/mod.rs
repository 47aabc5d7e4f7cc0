//! The command layer: one function per subcommand ([`commands`]), each
//! wiring the stages below for `attach`, `run`, `watch --all` ([`host`]), `config` and `report`.

pub mod commands;
pub mod host;
pub mod report;
