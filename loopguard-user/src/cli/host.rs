//! `loopguard watch --all`: from its arguments to an exit code.

use std::sync::Arc;
use std::time::Duration;

use super::commands::{bind_metrics, runtime, start_watch, stop_on_signal_or};
use crate::config::Settings;
use crate::config::args::HostArgs;
use crate::discover::identity::service::ServiceMap;
use crate::discover::preflight;
use crate::error::Error;
use crate::export::fleet::FleetMetrics;
use crate::export::server;
use crate::host::budget::Budget;
use crate::host::inspect::Inspector;
use crate::host::select::Selectors;

/// Gone targets whose series are kept at once, per target watched at most.
const GONE_KEPT_PER_TARGET: usize = 4;

/// `loopguard watch --all`.
pub fn watch_all(args: &HostArgs) -> Result<i32, Error> {
    let mut settings = Settings::resolve(&args.watch, None, None)?;
    settings.host.apply_flags(args)?;
    let host = &settings.host;
    preflight::check()?;
    let listener = bind_metrics(&settings)?;
    let options = start_watch(&settings, &args.output)?;
    let selectors = Selectors {
        exe: host.exe.clone(),
        cgroup: host.cgroup.clone(),
        container: host.container.clone(),
        runtimes: host.runtime.clone(),
    };
    let inspector = Inspector::new(selectors, ServiceMap::new(host.service_map.clone()));
    let budget = Budget::new(host.max_targets, host.max_probes, host.max_memory_mib);
    let fleet = Arc::new(FleetMetrics::new(
        Duration::from_secs(host.series_grace_s),
        host.max_targets.saturating_mul(GONE_KEPT_PER_TARGET),
        settings
            .metrics_max_routes
            .unwrap_or(crate::export::labels::DEFAULT_MAX_ROUTES),
    ));
    crate::privilege::drop_to(crate::privilege::WATCH);
    let runtime = runtime()?;
    let local = tokio::task::LocalSet::new();
    runtime.block_on(local.run_until(async {
        if let Some(listener) = listener {
            if let Ok(addr) = listener.local_addr() {
                crate::diag!("loopguard: serving Prometheus metrics for the host at http://{addr}/metrics");
            }
            server::serve(listener, Arc::clone(&fleet))?;
        }
        let stop = stop_on_signal_or(settings.duration_s.map(i64::unsigned_abs))?;
        crate::diag!(
            "loopguard: watching every matching event loop on the host (at most {} targets, {} probes); Ctrl+C to stop",
            host.max_targets,
            host.max_probes
        );
        let summary = crate::host::watch_host(inspector, budget, fleet, &options, stop).await?;
        crate::diag!(
            "loopguard: host watch ended: {} target(s) watched, {} not watchable, {} over the budget",
            summary.watched,
            summary.refused,
            summary.over_budget
        );
        Ok(0)
    }))
}
