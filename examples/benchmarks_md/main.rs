//! Turns bench logs into the benchmark page, its JSON and its chart: what
//! `scripts/gpu-validate.sh` runs after the benches on a GPU, and what rebuilds the page from
//! the logs of several parts of a run.
//!
//!     benchmarks_md --device NAME --driver VERSION --date DATE --out DIR [LOG...]
//!
//! Reads every `MOE_BENCH` and `MOE_CEILING` line of the LOG files (stdin when none) and
//! writes DIR/BENCHMARKS.md, DIR/benchmarks.json and DIR/benchmarks.png.
mod chart;

use moe_kernels::benchmarks::{
    Machine, ceilings, chart_series, json, markdown, records, run_items, run_table, scoreboard,
};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

fn run() -> Result<(), String> {
    let mut machine = Machine::default();
    let mut out: Option<PathBuf> = None;
    let mut logs = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let field = match arg.as_str() {
            "--device" => &mut machine.device,
            "--driver" => &mut machine.driver,
            "--date" => &mut machine.date,
            "--out" => {
                out = Some(args.next().ok_or("--out needs a folder")?.into());
                continue;
            }
            flag if flag.starts_with("--") => return Err(format!("unknown argument '{flag}'")),
            log => {
                logs.push(PathBuf::from(log));
                continue;
            }
        };
        *field = args.next().ok_or(format!("{arg} needs a value"))?;
    }
    let out = out.ok_or("--out DIR is required")?;
    let mut text = String::new();
    if logs.is_empty() {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("reading the bench log: {e}"))?;
    }
    for log in &logs {
        text += &std::fs::read_to_string(log).map_err(|e| format!("reading {}: {e}", log.display()))?;
        text.push('\n');
    }
    let (records, ceilings) = (records(&text), ceilings(&text));
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let write = |name: &str, body: String| {
        let path = out.join(name);
        std::fs::write(&path, body).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    write(
        "BENCHMARKS.md",
        markdown(&machine, &ceilings, &records) + &run_table(&run_items(&text)),
    )?;
    write("benchmarks.json", json(&machine, &ceilings, &records))?;
    let headline: Vec<&str> = scoreboard(&records).iter().map(|s| s.ours.op.as_str()).collect();
    let series: Vec<_> = chart_series(&records, &ceilings)
        .into_iter()
        .filter(|s| headline.contains(&s.op.as_str()))
        .collect();
    let title = format!("% of floor by op and T, {} ({})", machine.device, machine.date);
    chart::draw(&series, &title, &out.join("benchmarks.png"))?;
    println!(
        "benchmarks_md: {} records, {} ceilings, into {}",
        records.len(),
        usize::from(ceilings.bandwidth.is_some()) + usize::from(ceilings.tensor.is_some()),
        out.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("benchmarks_md: {e}");
            ExitCode::from(2)
        }
    }
}
