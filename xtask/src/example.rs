//! The bundled example service, started for the demo and the benchmark.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// `stall-server` on an ephemeral loopback port; killed on drop.
pub struct Example {
    pub child: Child,
    pub addr: String,
}

impl Example {
    pub fn start(binary: &Path) -> anyhow::Result<Self> {
        Self::spawn(Command::new(binary))
    }

    /// Starts `command`, the example binary with its options (or a wrapper
    /// such as `taskset` that execs it, so the pid stays the server's).
    pub fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .args(["--addr", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .context("failed to start the example stall-server")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .context("stall-server did not print its address")?
            .to_owned();
        Ok(Self { child, addr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
