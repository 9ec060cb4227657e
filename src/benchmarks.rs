//! Benchmark records: the one line a bench prints per measured GPU run, and the page
//! `scripts/gpu-validate.sh` builds from them (`BENCHMARKS.md`).
//!
//! A record is a line `MOE_BENCH key=value ...` so it survives criterion's and cargo's
//! own output around it; values never contain spaces. Only a run on a GPU produces
//! records: nothing here invents a figure.
use std::fmt::Write as _;

const TAG: &str = "MOE_BENCH";

/// One measured run of one op on one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Op family and op, e.g. `dispatch/permute`.
    pub op: String,
    /// The shape, e.g. `mixtral,T=4096`.
    pub shape: String,
    /// Mean time of one call.
    pub micros: f64,
    /// The op's floor: bytes moved and flops (see each bench).
    pub floor_bytes: u64,
    pub floor_flops: u64,
    /// Floor time over measured time, against peak DRAM bandwidth.
    pub bandwidth_fraction: f64,
    /// The same against the tensor-core peak, where the op has flops and the arch a known peak.
    pub tensor_fraction: Option<f64>,
    /// A comparison timed in the same run: its name and this op's time over its time.
    pub versus: Option<(String, f64)>,
}

fn no_spaces(s: &str) -> String {
    s.replace(char::is_whitespace, "_")
}

impl Record {
    /// The line a bench prints.
    pub fn to_line(&self) -> String {
        let mut line = format!(
            "{TAG} op={} shape={} us={:.3} bytes={} flops={} bw={:.4}",
            no_spaces(&self.op),
            no_spaces(&self.shape),
            self.micros,
            self.floor_bytes,
            self.floor_flops,
            self.bandwidth_fraction
        );
        if let Some(tc) = self.tensor_fraction {
            let _ = write!(line, " tc={tc:.4}");
        }
        if let Some((name, ratio)) = &self.versus {
            let _ = write!(line, " vs={}:{ratio:.4}", no_spaces(name));
        }
        line
    }

    /// Parses a line written by [`Record::to_line`]; `None` for any other line.
    pub fn parse(line: &str) -> Option<Record> {
        let rest = line.trim().strip_prefix(TAG)?.strip_prefix(' ')?;
        let mut record = Record {
            op: String::new(),
            shape: String::new(),
            micros: f64::NAN,
            floor_bytes: 0,
            floor_flops: 0,
            bandwidth_fraction: f64::NAN,
            tensor_fraction: None,
            versus: None,
        };
        for field in rest.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            match key {
                "op" => record.op = value.into(),
                "shape" => record.shape = value.into(),
                "us" => record.micros = value.parse().ok()?,
                "bytes" => record.floor_bytes = value.parse().ok()?,
                "flops" => record.floor_flops = value.parse().ok()?,
                "bw" => record.bandwidth_fraction = value.parse().ok()?,
                "tc" => record.tensor_fraction = Some(value.parse().ok()?),
                "vs" => {
                    let (name, ratio) = value.rsplit_once(':')?;
                    record.versus = Some((name.into(), ratio.parse().ok()?));
                }
                _ => return None,
            }
        }
        let complete = !record.op.is_empty() && record.micros.is_finite() && record.bandwidth_fraction.is_finite();
        complete.then_some(record)
    }
}

/// Where the records were measured, for the page's header.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub device: String,
    pub driver: String,
    pub date: String,
}

fn percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "-".into(), |f| format!("{:.0}%", 100.0 * f))
}

/// `BENCHMARKS.md`: the machine, then one table row per record in the order measured.
pub fn markdown(machine: &Machine, records: &[Record]) -> String {
    let mut page = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        page,
        "Measured by `scripts/gpu-validate.sh` on **{}** (driver {}), {}.\n",
        machine.device, machine.driver, machine.date
    );
    page += "Floor: the least traffic (every input read once, every output written once) and math of the op; \
             a percentage is floor time over measured time, against the GPU's peak DRAM bandwidth or dense \
             tensor-core rate.\n\n";
    if records.is_empty() {
        page += "No benchmark produced a record in this run.\n";
        return page;
    }
    page += "| op | shape | time (us) | floor (MB / GFLOP) | % of bandwidth | % of tensor-core peak | compared |\n";
    page += "|---|---|---:|---:|---:|---:|---|\n";
    for r in records {
        let versus = r
            .versus
            .as_ref()
            .map_or_else(|| "-".into(), |(name, ratio)| format!("{ratio:.2}x the time of {name}"));
        let _ = writeln!(
            page,
            "| {} | {} | {:.2} | {:.3} / {:.3} | {} | {} | {} |",
            r.op,
            r.shape,
            r.micros,
            r.floor_bytes as f64 / 1e6,
            r.floor_flops as f64 / 1e9,
            percent(Some(r.bandwidth_fraction)),
            percent(r.tensor_fraction),
            versus
        );
    }
    page
}

/// Every record in `text` (a bench log), in order.
pub fn records(text: &str) -> Vec<Record> {
    text.lines().filter_map(Record::parse).collect()
}
