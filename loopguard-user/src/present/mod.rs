//! Present: what a person reads. The report's text ([`text`]) and JSON,
//! sent by [`emit`] to stdout ([`output`]) and the recording ([`record`]);
//! the threshold alerts ([`alerts`]), the attached banner ([`attached`])
//! and the stall stacks ([`stacks`]) as text; and a recording read back ([`replay`]) and drawn as a page
//! ([`html`]).

pub mod alerts;
pub mod attached;
pub mod emit;
pub mod html;
pub mod outfile;
pub mod output;
pub mod record;
pub mod replay;
pub mod stacks;
pub mod text;
