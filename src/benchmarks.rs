//! Benchmark records and the page `scripts/gpu-validate.sh` builds from them: `BENCHMARKS.md`
//! (a scoreboard, the ceilings, every record), a JSON file of every record, and the series of
//! the chart of % of floor by op and T.
//!
//! A bench prints one line per measured run, `MOE_BENCH key=value ...`, so it survives
//! criterion's and cargo's output around it; values never contain spaces. The ceilings bench
//! prints `MOE_CEILING` lines: the copy bandwidth and the bf16 GEMM rate measured in the same
//! run, beside the datasheet's. Every percentage on the page is of those measured ceilings.
//! PyTorch peers (`scripts/torch_peers.py`) print the same lines. Only a run on a GPU produces
//! records: nothing here invents a figure.
use std::collections::BTreeMap;
use std::fmt::Write as _;

const TAG: &str = "MOE_BENCH";
const CEILING_TAG: &str = "MOE_CEILING";

/// The implementation name of this crate's own kernels; every other name is a peer.
pub const OURS: &str = "ours";

/// One measured op on one shape, by one implementation.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Op family and op, e.g. `dispatch/permute_bf16`.
    pub op: String,
    /// The shape, `model,T=tokens[,...]`, e.g. `mixtral,T=4096`.
    pub shape: String,
    /// [`OURS`], or the peer that ran the same op on the same inputs (`cublas_dense`,
    /// `cublas_loop`, `torch_grouped_mm`, ...).
    pub implementation: String,
    /// Median, 10th and 90th percentile of one call's time (CUDA events, cold L2).
    pub median_us: f64,
    pub p10_us: f64,
    pub p90_us: f64,
    /// The op's floor: the least bytes any implementation moves through DRAM, and its
    /// tensor-core flops (0 where the op is not matrix work).
    pub floor_bytes: u64,
    pub floor_flops: u64,
}

fn no_spaces(s: &str) -> String {
    s.replace(char::is_whitespace, "_")
}

/// `key=value` fields after `tag`, or `None` when `line` is not such a line.
fn fields<'a>(line: &'a str, tag: &str) -> Option<BTreeMap<&'a str, &'a str>> {
    let rest = line.trim().strip_prefix(tag)?.strip_prefix(' ')?;
    rest.split_whitespace().map(|field| field.split_once('=')).collect()
}

impl Record {
    /// The line a bench prints.
    pub fn to_line(&self) -> String {
        format!(
            "{TAG} op={} shape={} impl={} us={:.3} p10={:.3} p90={:.3} bytes={} flops={}",
            no_spaces(&self.op),
            no_spaces(&self.shape),
            no_spaces(&self.implementation),
            self.median_us,
            self.p10_us,
            self.p90_us,
            self.floor_bytes,
            self.floor_flops
        )
    }

    /// Parses a line written by [`Record::to_line`]; `None` for any other line, a missing or
    /// unknown key, or a time that is not a positive number.
    pub fn parse(line: &str) -> Option<Record> {
        let f = fields(line, TAG)?;
        let known = ["op", "shape", "impl", "us", "p10", "p90", "bytes", "flops"];
        if f.len() != known.len() || !known.iter().all(|k| f.contains_key(k)) {
            return None;
        }
        let time = |key: &str| f[key].parse::<f64>().ok().filter(|t| t.is_finite() && *t > 0.0);
        Some(Record {
            op: f["op"].into(),
            shape: f["shape"].into(),
            implementation: f["impl"].into(),
            median_us: time("us")?,
            p10_us: time("p10")?,
            p90_us: time("p90")?,
            floor_bytes: f["bytes"].parse().ok()?,
            floor_flops: f["flops"].parse().ok()?,
        })
    }

    pub fn is_ours(&self) -> bool {
        self.implementation == OURS
    }

    /// The model (`mixtral`) and token count of a `model,T=tokens,...` shape.
    pub fn model_and_tokens(&self) -> Option<(&str, u64)> {
        let mut parts = self.shape.split(',');
        let model = parts.next()?;
        let tokens = parts.find_map(|p| p.strip_prefix("T="))?.parse().ok()?;
        Some((model, tokens))
    }

    /// Floor time over the median time, against the measured ceilings: the floor time is the
    /// larger of bytes over the copy bandwidth and flops over the bf16 GEMM rate. `None`
    /// without the ceilings the record needs.
    pub fn fraction_of_floor(&self, ceilings: &Ceilings) -> Option<f64> {
        let memory = self.floor_bytes as f64 / ceilings.bandwidth.as_ref()?.measured;
        let math = match self.floor_flops {
            0 => 0.0,
            flops => flops as f64 / ceilings.tensor.as_ref()?.measured,
        };
        Some(memory.max(math) / (self.median_us * 1e-6))
    }
}

/// One ceiling measured in the run, beside the datasheet's value for the part.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceiling {
    /// Bytes/s (read + written) or flop/s.
    pub measured: f64,
    pub datasheet: Option<f64>,
}

/// The two ceilings every percentage is of.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ceilings {
    /// A large device-to-device copy, counting bytes read plus written.
    pub bandwidth: Option<Ceiling>,
    /// A bf16 cuBLAS GEMM 8192³ on random data.
    pub tensor: Option<Ceiling>,
}

/// The names of the two ceilings in `MOE_CEILING` lines.
pub const BANDWIDTH: &str = "copy_bandwidth";
pub const TENSOR: &str = "bf16_gemm";

/// The `MOE_CEILING` line of one ceiling.
pub fn ceiling_line(name: &str, ceiling: &Ceiling) -> String {
    let datasheet = ceiling.datasheet.map_or_else(|| "none".into(), |v| format!("{v:.4e}"));
    format!(
        "{CEILING_TAG} name={name} measured={:.4e} datasheet={datasheet}",
        ceiling.measured
    )
}

/// The ceilings in a log (the last of each wins).
pub fn ceilings(text: &str) -> Ceilings {
    let mut found = Ceilings::default();
    for f in text.lines().filter_map(|l| fields(l, CEILING_TAG)) {
        let Some(measured) = f.get("measured").and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        if !(measured.is_finite() && measured > 0.0) {
            continue;
        }
        let datasheet = f.get("datasheet").and_then(|v| v.parse().ok());
        let ceiling = Some(Ceiling { measured, datasheet });
        match f.get("name") {
            Some(&BANDWIDTH) => found.bandwidth = ceiling,
            Some(&TENSOR) => found.tensor = ceiling,
            _ => {}
        }
    }
    found
}

/// The datasheet's DRAM bandwidth (bytes/s) and dense bf16 tensor rate (flop/s) of the parts
/// we know, by the name the driver gives: NVIDIA's H200, H100 and A100 datasheets (SXM parts
/// unless the name says PCIe). Leads only: the page's percentages use the measured ceilings.
pub fn datasheet(device_name: &str) -> Option<(f64, f64)> {
    let name = device_name.to_ascii_uppercase();
    let pcie = name.contains("PCIE");
    if name.contains("H200") {
        Some((4.8e12, 989e12))
    } else if name.contains("H100") {
        Some(if pcie { (2.0e12, 756e12) } else { (3.35e12, 989e12) })
    } else if name.contains("A100") {
        let bandwidth = match (name.contains("80GB"), pcie) {
            (true, false) => 2.039e12,
            (true, true) => 1.935e12,
            _ => 1.555e12,
        };
        Some((bandwidth, 312e12))
    } else {
        None
    }
}

/// Where the records were measured, for the page's header.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub device: String,
    pub driver: String,
    pub date: String,
}

/// Every record in `text` (a bench log), in order.
pub fn records(text: &str) -> Vec<Record> {
    text.lines().filter_map(Record::parse).collect()
}

/// One scoreboard row: our record of an op and shape, and the fastest peer of the same.
#[derive(Debug, Clone, PartialEq)]
pub struct Score<'a> {
    pub ours: &'a Record,
    pub best_peer: Option<&'a Record>,
}

impl Score<'_> {
    /// Our median time over the best peer's: under 1 means we are faster.
    pub fn ratio_to_best_peer(&self) -> Option<f64> {
        self.best_peer.map(|p| self.ours.median_us / p.median_us)
    }
}

/// The headline rows: each of our records that a peer also ran, and every whole-layer record,
/// by op, then model, then token count.
pub fn scoreboard(records: &[Record]) -> Vec<Score<'_>> {
    let mut rows: Vec<Score<'_>> = records
        .iter()
        .filter(|r| r.is_ours())
        .filter_map(|ours| {
            let best_peer = records
                .iter()
                .filter(|p| !p.is_ours() && p.op == ours.op && p.shape == ours.shape)
                .min_by(|a, b| a.median_us.total_cmp(&b.median_us));
            (best_peer.is_some() || ours.op.starts_with("layers/")).then_some(Score { ours, best_peer })
        })
        .collect();
    rows.sort_by_key(|s| {
        let (model, tokens) = s.ours.model_and_tokens().unwrap_or((&s.ours.shape, 0));
        (&s.ours.op, model, tokens)
    });
    rows
}

/// One line of the chart: our % of floor for one op of one model, by token count.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub model: String,
    pub op: String,
    pub points: Vec<(u64, f64)>,
}

/// The chart's series: for each model and op of ours with a `T=` shape, % of floor by T
/// (sorted by T). Records whose shape adds more than the model and T (e.g. a rank) are left
/// out, as are records without the ceilings they need.
pub fn chart_series(records: &[Record], ceilings: &Ceilings) -> Vec<Series> {
    let mut by_line: BTreeMap<(String, String), Vec<(u64, f64)>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.is_ours() && r.shape.split(',').count() == 2)
    {
        let (Some((model, tokens)), Some(fraction)) = (r.model_and_tokens(), r.fraction_of_floor(ceilings)) else {
            continue;
        };
        by_line
            .entry((model.to_string(), r.op.clone()))
            .or_default()
            .push((tokens, 100.0 * fraction));
    }
    by_line
        .into_iter()
        .map(|((model, op), mut points)| {
            points.sort_by_key(|p| p.0);
            Series { model, op, points }
        })
        .collect()
}

fn percent(fraction: Option<f64>) -> String {
    fraction.map_or_else(|| "-".into(), |f| format!("{:.1}%", 100.0 * f))
}

fn time(r: &Record) -> String {
    format!("{:.2} ({:.2}–{:.2})", r.median_us, r.p10_us, r.p90_us)
}

/// `value` (bytes/s or flop/s) in GB/s or TFLOP/s.
fn rate(value: f64, unit: &str) -> String {
    let scale = if unit == "GB/s" { 1e9 } else { 1e12 };
    format!("{:.0} {unit}", value / scale)
}

fn ceiling_row(page: &mut String, what: &str, ceiling: &Option<Ceiling>, unit: &str) {
    let (measured, datasheet, fraction) = match ceiling {
        Some(c) => (
            rate(c.measured, unit),
            c.datasheet.map_or_else(|| "-".into(), |d| rate(d, unit)),
            c.datasheet
                .map_or_else(|| "-".into(), |d| percent(Some(c.measured / d))),
        ),
        None => ("not measured".into(), "-".into(), "-".into()),
    };
    let _ = writeln!(page, "| {what} | {measured} | {datasheet} | {fraction} |");
}

/// `BENCHMARKS.md`: the machine and method, the ceilings, the scoreboard, then every record.
pub fn markdown(machine: &Machine, ceilings: &Ceilings, records: &[Record]) -> String {
    let mut page = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        page,
        "Measured by `scripts/gpu-validate.sh` on **{}** (driver {}), {}.\n",
        machine.device, machine.driver, machine.date
    );
    page += METHOD;
    page += "\n## Ceilings, measured in this run\n\n| ceiling | measured | datasheet | measured / datasheet |\n|---|---:|---:|---:|\n";
    ceiling_row(
        &mut page,
        "device-to-device copy (read + write)",
        &ceilings.bandwidth,
        "GB/s",
    );
    ceiling_row(
        &mut page,
        "bf16 cuBLAS GEMM 8192³, random data",
        &ceilings.tensor,
        "TFLOP/s",
    );
    if records.is_empty() {
        page += "\nNo benchmark produced a record in this run.\n";
        return page;
    }
    page += "\n## Scoreboard\n\nTime in µs: median (p10–p90). Ratio: our time over the best peer's (under 1: we are faster).\n\n\
             | op | shape | time | % of floor | best peer | its time | ratio |\n|---|---|---:|---:|---|---:|---:|\n";
    for score in scoreboard(records) {
        let ours = score.ours;
        let (peer, peer_time) = score
            .best_peer
            .map_or_else(|| ("-".into(), "-".into()), |p| (p.implementation.clone(), time(p)));
        let ratio = score
            .ratio_to_best_peer()
            .map_or_else(|| "-".into(), |r| format!("{r:.2}"));
        let _ = writeln!(
            page,
            "| {} | {} | {} | {} | {peer} | {peer_time} | {ratio} |",
            ours.op,
            ours.shape,
            time(ours),
            percent(ours.fraction_of_floor(ceilings)),
        );
    }
    page += "\n## Every record\n\n| op | shape | implementation | time | floor (MB / GFLOP) | % of floor |\n|---|---|---|---:|---:|---:|\n";
    for r in records {
        let _ = writeln!(
            page,
            "| {} | {} | {} | {} | {:.3} / {:.3} | {} |",
            r.op,
            r.shape,
            r.implementation,
            time(r),
            r.floor_bytes as f64 / 1e6,
            r.floor_flops as f64 / 1e9,
            percent(r.fraction_of_floor(ceilings)),
        );
    }
    page
}

/// How the numbers were taken: printed on every page the script writes.
pub const METHOD: &str = "\
How: each time is the median (with p10 and p90) of CUDA-event timings of one call, after \
warm-up calls, each call from a cold L2 (a buffer twice the L2's size is read before it: \
a read, not a memset, so no dirty lines are left for the timed call to write back), on \
random inputs. The floor of an op is the least DRAM traffic (each input read once, each \
output written once; the weights and weight gradients of the experts that get rows only) and \
its tensor-core flops; floor time is the larger of bytes over the measured copy bandwidth and \
flops over the measured bf16 GEMM rate, and % of floor is floor time over the median time. \
Peers run the same op on the same shapes in the same run: a dense cuBLAS GEMM of equal flops \
(prefill only), a per-expert cuBLAS loop, and PyTorch (`torch._grouped_mm`, topk + softmax, \
index_select / index_add, an HF-style MoE block).\n";

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out + "\""
}

fn json_number(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite())
        .map_or_else(|| "null".into(), |v| format!("{v}"))
}

fn json_ceiling(c: &Option<Ceiling>) -> String {
    c.as_ref().map_or_else(
        || "null".into(),
        |c| {
            format!(
                "{{\"measured\": {}, \"datasheet\": {}}}",
                json_number(Some(c.measured)),
                json_number(c.datasheet)
            )
        },
    )
}

/// Every record as JSON: the machine, the ceilings, and per record its fields and its
/// fraction of floor (null without the ceilings).
pub fn json(machine: &Machine, ceilings: &Ceilings, records: &[Record]) -> String {
    let mut out = format!(
        "{{\n  \"device\": {},\n  \"driver\": {},\n  \"date\": {},\n  \"ceilings\": {{\"copy_bandwidth_bytes_per_s\": {}, \"bf16_gemm_flops_per_s\": {}}},\n  \"records\": [",
        json_string(&machine.device),
        json_string(&machine.driver),
        json_string(&machine.date),
        json_ceiling(&ceilings.bandwidth),
        json_ceiling(&ceilings.tensor)
    );
    for (i, r) in records.iter().enumerate() {
        let _ = write!(
            out,
            "{}\n    {{\"op\": {}, \"shape\": {}, \"implementation\": {}, \"median_us\": {}, \"p10_us\": {}, \"p90_us\": {}, \"floor_bytes\": {}, \"floor_flops\": {}, \"fraction_of_floor\": {}}}",
            if i == 0 { "" } else { "," },
            json_string(&r.op),
            json_string(&r.shape),
            json_string(&r.implementation),
            json_number(Some(r.median_us)),
            json_number(Some(r.p10_us)),
            json_number(Some(r.p90_us)),
            r.floor_bytes,
            r.floor_flops,
            json_number(r.fraction_of_floor(ceilings))
        );
    }
    out + "\n  ]\n}\n"
}

/// One item of a `scripts/gpu-validate.sh` run (a test suite, the ceilings, a bench, the
/// PyTorch peers), from its log line `== ITEM: exit STATUS after Ns (estimated Es)`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunItem {
    pub name: String,
    /// The exit status: 0 passed; 124 or 137 cut by the time left in the part.
    pub status: i32,
    pub seconds: u64,
    pub estimated: u64,
}

/// Every run item in a log, in order.
pub fn run_items(text: &str) -> Vec<RunItem> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("== ")?;
            let (name, rest) = rest.split_once(": exit ")?;
            let (status, rest) = rest.split_once(" after ")?;
            let (seconds, rest) = rest.split_once("s (estimated ")?;
            let estimated = rest.strip_suffix("s)")?;
            Some(RunItem {
                name: name.into(),
                status: status.parse().ok()?,
                seconds: seconds.parse().ok()?,
                estimated: estimated.parse().ok()?,
            })
        })
        .collect()
}

/// The page's account of the run: each item's result and its seconds beside the plan's
/// estimate (what the script's estimates are corrected from).
pub fn run_table(items: &[RunItem]) -> String {
    let mut out = String::from("\n## The run\n\n");
    if items.is_empty() {
        return out + "No item of `scripts/gpu-validate.sh` is in the logs.\n";
    }
    out += "| item | result | seconds | estimated |\n|---|---|---:|---:|\n";
    for item in items {
        let result = match item.status {
            0 => "passed".to_string(),
            124 | 137 => "cut by the time limit".to_string(),
            status => format!("failed (exit {status})"),
        };
        let _ = writeln!(
            out,
            "| {} | {result} | {} | {} |",
            item.name, item.seconds, item.estimated
        );
    }
    out
}
