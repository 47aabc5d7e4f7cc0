//! Where this kernel keeps the run queue's steal clock
//! (`loopguard_common::steal::RqSteal`), from its BTF: the context-switch
//! program then counts the steal a thread of the target suffered from two
//! readings of it, and the runtime-update program (a run on every
//! scheduler clock update of every thread) is left out.

use std::sync::OnceLock;

use loopguard_common::steal::RqSteal;
use loopguard_parse::btf::{Btf, BtfError};

/// The kernel's own BTF.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The offsets, read once per agent; [`RqSteal::UNKNOWN`] (with the reason
/// logged once) where they cannot be found.
pub fn rq_steal() -> RqSteal {
    static FOUND: OnceLock<RqSteal> = OnceLock::new();
    *FOUND.get_or_init(|| match std::fs::read(VMLINUX_BTF) {
        Ok(bytes) => match offsets(&bytes) {
            Ok(found) => {
                tracing::debug!(?found, "steal time read from the run queue");
                found
            }
            Err(error) => {
                tracing::info!(
                    %error,
                    "steal time is found from the scheduler's runtime updates (one more program run per update)"
                );
                RqSteal::UNKNOWN
            }
        },
        Err(error) => {
            tracing::info!(
                %error,
                path = VMLINUX_BTF,
                "no kernel BTF: steal time is found from the scheduler's runtime updates"
            );
            RqSteal::UNKNOWN
        }
    })
}

/// The offsets in the raw BTF `bytes`. A kernel built without
/// paravirtual steal time accounting has no `rq.prev_steal_time_rq`.
pub fn offsets(bytes: &[u8]) -> Result<RqSteal, BtfError> {
    let btf = Btf::parse(bytes)?;
    Ok(RqSteal {
        task_cfs_rq: btf.offset_of("task_struct", "se.cfs_rq")?,
        cfs_rq_rq: btf.offset_of("cfs_rq", "rq")?,
        rq_steal: btf.offset_of("rq", "prev_steal_time_rq")?,
        rq_cpu: btf.offset_of("rq", "cpu")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernels_offsets_are_found_or_the_reason_named() {
        // Whatever the host: either every offset, or a named error.
        if let Ok(bytes) = std::fs::read(VMLINUX_BTF) {
            match offsets(&bytes) {
                Ok(found) => assert!(found.known(), "{found:?}"),
                Err(error) => assert!(!error.to_string().is_empty()),
            }
        }
    }
}
