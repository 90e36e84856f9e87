//! What was measured. Every timed figure is kept as seconds per run; the
//! report turns it into the median, min and max, a rate or a per-operation
//! latency, and a ratio to local disk.

use crate::config::Kind;
use std::collections::BTreeMap;

/// How a row's seconds are shown.
#[derive(Copy, Clone, Debug)]
pub enum Show {
    /// Seconds (or ms).
    Time,
    /// MiB/s for a transfer of this many MiB.
    Rate { mib: f64 },
    /// Microseconds per operation, for this many operations.
    PerOp { n: f64 },
}

#[derive(Clone, Debug)]
pub struct Row {
    /// (workload, position within the workload): the table's order.
    pub order: (u32, u32),
    pub label: String,
    pub show: Show,
    /// Short label in the plot (rows without one are not plotted).
    pub plot: Option<String>,
    pub values: BTreeMap<Kind, Vec<f64>>,
}

#[derive(Clone, Debug, Default)]
pub struct Memory {
    pub venus_kib: u64,
    pub afsd_kib: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Results {
    pub rows: Vec<Row>,
    /// RPCs per open+stat+close of a cached small file, kernel caches warm.
    pub rpcs_per_open: Option<f64>,
    /// The same after the kernel dropped its dentry and inode caches, so that
    /// venus itself answers every lookup.
    pub rpcs_per_open_after_drop: Option<f64>,
    /// Peak memory during workloads 2, 3 and 4.
    pub memory: BTreeMap<u32, Memory>,
    /// Workload 7: (clients, operations per second for each run).
    pub scale: Vec<(usize, Vec<f64>)>,
    /// Workload 7: seconds until a break reached every holder, per run.
    pub break_all: Vec<f64>,
    /// Workload 7: seconds the breaking store took, per run.
    pub break_store: Vec<f64>,
    pub break_holders: usize,
    /// Workload 1: the share of CPU time the host took during each
    /// Andrew pass, per system (see `util::cpu_ticks`).
    pub andrew_steal: BTreeMap<Kind, Vec<f64>>,
    /// The same over each whole workload, by (workload, system).
    pub workload_steal: BTreeMap<(u32, Kind), f64>,
    /// Things that went wrong (a system that could not start, a workload
    /// that failed): reported, not fatal.
    pub failures: Vec<String>,
}

impl Results {
    pub fn add(&mut self, order: (u32, u32), label: &str, show: Show, plot: Option<&str>, kind: Kind, secs: f64) {
        let row = match self.rows.iter().position(|r| r.order == order) {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    order,
                    label: label.to_string(),
                    show,
                    plot: plot.map(str::to_string),
                    values: BTreeMap::new(),
                });
                self.rows.last_mut().unwrap()
            }
        };
        row.values.entry(kind).or_default().push(secs);
    }

    pub fn memory(&mut self, workload: u32, venus_kib: u64, afsd_kib: u64) {
        let m = self.memory.entry(workload).or_default();
        m.venus_kib = m.venus_kib.max(venus_kib);
        m.afsd_kib = m.afsd_kib.max(afsd_kib);
    }

    pub fn sorted_rows(&self) -> Vec<&Row> {
        let mut v: Vec<&Row> = self.rows.iter().collect();
        v.sort_by_key(|r| r.order);
        v
    }

    pub fn find(&self, order: (u32, u32)) -> Option<&Row> {
        self.rows.iter().find(|r| r.order == order)
    }
}

/// Median, min and max of a non-empty list.
pub fn summary(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let med = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    (med, s[0], s[n - 1])
}

pub fn median(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| summary(v).0)
}
