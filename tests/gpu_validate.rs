//! The parts of `scripts/gpu-validate.sh` that need no GPU: its arguments, its plan, its
//! refusal to run without a GPU, a whole run on a fake GPU with a fake bundle, and the page,
//! JSON and chart it writes, from a recorded log (a hand-written sample in the benches' format:
//! its numbers are test inputs, not measurements).
#[allow(dead_code)]
#[path = "../examples/benchmarks_md/chart.rs"]
mod chart;

use moe_kernels::benchmarks::{
    BANDWIDTH, Ceiling, Ceilings, Machine, OURS, Record, TENSOR, ceiling_line, ceilings, chart_series, datasheet, json,
    markdown, records, run_items, run_table, scoreboard,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-validate.sh");

/// A log as a GPU run prints it: cargo's and criterion's lines around the records, two
/// ceilings, our records and peers', and lines that must not parse.
const RECORDED_LOG: &str = "\
== test:gemm (at 0s, 535s left, estimated 20s)
test result: ok. 40 passed; 0 failed
== test:gemm: exit 0 after 12s (estimated 20s)
== test:layers: exit 101 after 3s (estimated 20s)
== ceilings (at 3s, 530s left, estimated 6s)
ceilings on NVIDIA H200 (sm_90): copy 4000 GB/s (read + write), bf16 GEMM 8192³ 800 TFLOP/s on random data
MOE_CEILING name=copy_bandwidth measured=4.0000e12 datasheet=4.8000e12
MOE_CEILING name=bf16_gemm measured=8.0000e14 datasheet=9.8900e14
     Running benches/dispatch.rs (target/release/deps/dispatch-0123456789abcdef)
MOE_BENCH op=dispatch/permute_bf16 shape=mixtral,T=4096 impl=ours us=40.000 p10=39.000 p90=42.000 bytes=80000000 flops=0
MOE_BENCH op=dispatch/permute_bf16 shape=mixtral,T=4096 impl=torch_index_select us=80.000 p10=79.000 p90=90.000 bytes=80000000 flops=0
permute/emulator        time:   [1.2 ms 1.3 ms 1.4 ms]
MOE_BENCH op=gemm/gemm1_swiglu_bf16 shape=mixtral,T=1 impl=ours us=100.000 p10=99.000 p90=101.000 bytes=200000000 flops=1000000
MOE_BENCH op=gemm/gemm1_swiglu_bf16 shape=mixtral,T=4096 impl=ours us=2000.000 p10=1990.000 p90=2100.000 bytes=400000000 flops=800000000000
MOE_BENCH op=gemm/gemm1_swiglu_bf16 shape=mixtral,T=4096 impl=cublas_loop us=1600.000 p10=1590.000 p90=1700.000 bytes=400000000 flops=800000000000
MOE_BENCH op=gemm/gemm1_swiglu_bf16 shape=mixtral,T=4096 impl=torch_grouped_mm us=1250.000 p10=1240.000 p90=1300.000 bytes=400000000 flops=800000000000
MOE_BENCH op=layers/moe_forward_bf16 shape=deepseek,T=16 impl=ours us=500.000 p10=490.000 p90=520.000 bytes=1000000000 flops=0
MOE_BENCH op=gate/LowRank_forward_bf16 shape=mixtral,T=16,r=4 impl=ours us=10.000 p10=9.000 p90=11.000 bytes=1000 flops=0
MOE_BENCH op=broken shape=x impl=ours us=notanumber p10=1 p90=1 bytes=1 flops=0
MOE_BENCH op=zero shape=x impl=ours us=0 p10=0 p90=0 bytes=1 flops=0
MOE_BENCH op=old shape=mixtral,T=1 us=5.31 bytes=1 flops=0 bw=0.1
MOE_CEILING name=copy_bandwidth measured=nan datasheet=none
== bench:gemm:deepseek: exit 124 after 40s (estimated 50s)
";

fn machine() -> Machine {
    Machine {
        device: "NVIDIA H200".into(),
        driver: "580.159.04".into(),
        date: "2026-12-04".into(),
    }
}

#[test]
fn records_and_ceilings_are_read_from_a_recorded_log_and_nothing_else() {
    let found = records(RECORDED_LOG);
    assert_eq!(found.len(), 8, "eight well-formed records: {found:?}");
    assert_eq!(found[0].op, "dispatch/permute_bf16");
    assert_eq!(found[0].implementation, OURS);
    assert_eq!(
        (found[0].median_us, found[0].p10_us, found[0].p90_us),
        (40.0, 39.0, 42.0)
    );
    assert_eq!(found[1].implementation, "torch_index_select");
    assert_eq!(found[3].floor_flops, 800_000_000_000);
    let c = ceilings(RECORDED_LOG);
    // The malformed ceiling line after the good one is ignored, not taken as the last word.
    assert_eq!(
        c.bandwidth.as_ref().map(|c| (c.measured, c.datasheet)),
        Some((4e12, Some(4.8e12)))
    );
    assert_eq!(c.tensor.as_ref().map(|c| c.measured), Some(8e14));
}

#[test]
fn a_record_and_a_ceiling_survive_their_own_lines() {
    let record = Record {
        op: "router/select".into(),
        shape: "deepseek, T=1".into(),
        implementation: "torch topk".into(),
        median_us: 3.5,
        p10_us: 3.25,
        p90_us: 4.0,
        floor_bytes: 8192,
        floor_flops: 0,
    };
    let parsed = Record::parse(&record.to_line()).expect("parses");
    assert_eq!(parsed.shape, "deepseek,_T=1", "spaces become underscores");
    assert_eq!(parsed.implementation, "torch_topk");
    assert_eq!((parsed.median_us, parsed.p10_us, parsed.p90_us), (3.5, 3.25, 4.0));
    let ceiling = Ceiling {
        measured: 4.25e12,
        datasheet: None,
    };
    let read = ceilings(&ceiling_line(BANDWIDTH, &ceiling));
    assert_eq!(read.bandwidth, Some(ceiling));
    assert_eq!(read.tensor, None);
    assert!(
        ceilings(&ceiling_line(
            TENSOR,
            &Ceiling {
                measured: 7e14,
                datasheet: Some(9.89e14)
            }
        ))
        .tensor
        .is_some()
    );
}

#[test]
fn percentages_are_of_the_measured_ceilings() {
    let c = ceilings(RECORDED_LOG);
    let r = records(RECORDED_LOG);
    // permute: 80 MB at 4 TB/s is 20 us; measured 40 us: 50%.
    assert!((r[0].fraction_of_floor(&c).unwrap() - 0.5).abs() < 1e-12);
    // GEMM at T=4096: math 0.8 TFLOP at 800 TFLOP/s is 1 ms (memory 0.1 ms); 2 ms: 50%.
    assert!((r[3].fraction_of_floor(&c).unwrap() - 0.5).abs() < 1e-12);
    // Without the tensor ceiling a record with flops has no percentage; one without does.
    let bandwidth_only = Ceilings {
        tensor: None,
        ..c.clone()
    };
    assert_eq!(r[3].fraction_of_floor(&bandwidth_only), None);
    assert!(r[0].fraction_of_floor(&bandwidth_only).is_some());
    assert_eq!(r[0].fraction_of_floor(&Ceilings::default()), None);
}

#[test]
fn the_scoreboard_keeps_ops_with_peers_and_layers_and_names_the_best_peer() {
    let r = records(RECORDED_LOG);
    let board = scoreboard(&r);
    let rows: Vec<(&str, &str)> = board
        .iter()
        .map(|s| (s.ours.op.as_str(), s.ours.shape.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("dispatch/permute_bf16", "mixtral,T=4096"),
            ("gemm/gemm1_swiglu_bf16", "mixtral,T=4096"),
            ("layers/moe_forward_bf16", "deepseek,T=16"),
        ]
    );
    assert_eq!(board[0].ratio_to_best_peer(), Some(0.5));
    let gemm = &board[1];
    assert_eq!(
        gemm.best_peer.map(|p| p.implementation.as_str()),
        Some("torch_grouped_mm")
    );
    assert_eq!(gemm.ratio_to_best_peer(), Some(1.6));
    assert_eq!(board[2].best_peer, None);
}

#[test]
fn the_page_has_the_ceilings_the_scoreboard_and_every_record() {
    let c = ceilings(RECORDED_LOG);
    let page = markdown(&machine(), &c, &records(RECORDED_LOG));
    assert!(
        page.contains("**NVIDIA H200** (driver 580.159.04), 2026-12-04"),
        "{page}"
    );
    assert!(
        page.contains("| device-to-device copy (read + write) | 4000 GB/s | 4800 GB/s | 83.3% |"),
        "{page}"
    );
    assert!(
        page.contains("| bf16 cuBLAS GEMM 8192³, random data | 800 TFLOP/s | 989 TFLOP/s | 80.9% |"),
        "{page}"
    );
    let scoreboard = &page[page.find("## Scoreboard").unwrap()..page.find("## Every record").unwrap()];
    assert!(
        scoreboard.contains(
            "| gemm/gemm1_swiglu_bf16 | mixtral,T=4096 | 2000.00 (1990.00–2100.00) | 50.0% | torch_grouped_mm | 1250.00 (1240.00–1300.00) | 1.60 |"
        ),
        "{scoreboard}"
    );
    assert_eq!(
        scoreboard
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| op"))
            .count(),
        3
    );
    let every = &page[page.find("## Every record").unwrap()..];
    assert_eq!(
        every
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| op"))
            .count(),
        8
    );
    assert!(every.contains("| dispatch/permute_bf16 | mixtral,T=4096 | torch_index_select | 80.00 (79.00–90.00) | 80.000 / 0.000 | 25.0% |"), "{every}");
    let empty = markdown(&machine(), &Ceilings::default(), &[]);
    assert!(empty.contains("No benchmark produced a record"), "{empty}");
    assert!(empty.contains("| not measured |"), "{empty}");
}

#[test]
fn the_json_holds_every_record_with_its_fraction() {
    let c = ceilings(RECORDED_LOG);
    let r = records(RECORDED_LOG);
    let mut weird = r[0].clone();
    weird.op = "quote\"back\\slash".into();
    let all: Vec<Record> = r.iter().cloned().chain([weird]).collect();
    let value: serde_json::Value = serde_json::from_str(&json(&machine(), &c, &all)).expect("valid JSON");
    assert_eq!(value["device"], "NVIDIA H200");
    assert_eq!(value["ceilings"]["copy_bandwidth_bytes_per_s"]["measured"], 4e12);
    let list = value["records"].as_array().unwrap();
    assert_eq!(list.len(), all.len());
    assert_eq!(list[3]["implementation"], "ours");
    assert_eq!(list[3]["median_us"], 2000.0);
    assert_eq!(list[3]["fraction_of_floor"], 0.5);
    assert_eq!(list[all.len() - 1]["op"], "quote\"back\\slash");
    let without: serde_json::Value = serde_json::from_str(&json(&machine(), &Ceilings::default(), &r)).unwrap();
    assert!(without["records"][0]["fraction_of_floor"].is_null());
    assert!(without["ceilings"]["bf16_gemm_flops_per_s"].is_null());
}

#[test]
fn the_chart_plots_our_records_by_model_and_tokens() {
    let c = ceilings(RECORDED_LOG);
    let series = chart_series(&records(RECORDED_LOG), &c);
    let lines: Vec<(&str, &str, usize)> = series
        .iter()
        .map(|s| (s.model.as_str(), s.op.as_str(), s.points.len()))
        .collect();
    // Peers and shapes beyond model and T (the gate's rank) are left out; T sorted.
    assert_eq!(
        lines,
        [
            ("deepseek", "layers/moe_forward_bf16", 1),
            ("mixtral", "dispatch/permute_bf16", 1),
            ("mixtral", "gemm/gemm1_swiglu_bf16", 2),
        ]
    );
    assert_eq!(series[2].points[0].0, 1);
    assert!((series[2].points[1].1 - 50.0).abs() < 1e-9);
    let png = std::env::temp_dir().join(format!("moe-chart-{}.png", std::process::id()));
    chart::draw(&series, "test chart", &png).expect("draws");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert!(bytes.len() > 5_000, "a drawn chart, not a blank: {} bytes", bytes.len());
    std::fs::remove_file(&png).unwrap();
}

#[test]
fn the_run_table_says_what_passed_failed_and_was_cut() {
    let items = run_items(RECORDED_LOG);
    let names: Vec<(&str, i32, u64)> = items.iter().map(|i| (i.name.as_str(), i.status, i.seconds)).collect();
    assert_eq!(
        names,
        [
            ("test:gemm", 0, 12),
            ("test:layers", 101, 3),
            ("bench:gemm:deepseek", 124, 40)
        ]
    );
    let table = run_table(&items);
    assert!(table.contains("| test:gemm | passed | 12 | 20 |"), "{table}");
    assert!(
        table.contains("| test:layers | failed (exit 101) | 3 | 20 |"),
        "{table}"
    );
    assert!(
        table.contains("| bench:gemm:deepseek | cut by the time limit | 40 | 50 |"),
        "{table}"
    );
    assert!(run_table(&[]).contains("No item"));
}

#[test]
fn datasheets_are_known_for_the_parts_we_run_on() {
    assert_eq!(datasheet("NVIDIA H200 (sm_90)"), Some((4.8e12, 989e12)));
    assert_eq!(datasheet("NVIDIA H100 80GB HBM3"), Some((3.35e12, 989e12)));
    assert_eq!(datasheet("NVIDIA H100 PCIe"), Some((2.0e12, 756e12)));
    assert_eq!(datasheet("NVIDIA A100-SXM4-80GB"), Some((2.039e12, 312e12)));
    assert_eq!(datasheet("NVIDIA GeForce RTX 4090"), None);
}

fn script(args: &[&str], smi: &str, cwd: Option<&Path>) -> Output {
    let mut command = Command::new("bash");
    command.arg(SCRIPT).args(args).env("NVIDIA_SMI", smi);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    command.output().expect("bash runs the script")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn executable(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    assert!(Command::new("chmod").arg("+x").arg(path).status().unwrap().success());
}

/// A fake `nvidia-smi` that reports one H200.
fn fake_smi(dir: &Path) -> PathBuf {
    let smi = dir.join("nvidia-smi");
    executable(&smi, "#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 9.0'\n");
    smi
}

#[test]
fn the_script_parses_its_arguments() {
    let help = script(&["--help"], "/nonexistent", None);
    assert_eq!(help.status.code(), Some(0), "{}", text(&help));
    assert!(text(&help).contains("usage: scripts/gpu-validate.sh"));
    for bad in [&["--bogus"][..], &["--out"][..], &["--budget", "ten"][..]] {
        let out = script(bad, "/nonexistent", None);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out));
    }
}

#[test]
fn without_a_gpu_the_script_stops_and_changes_nothing() {
    let dir = scratch("no-gpu");
    let results = dir.join("results");
    let out = script(&["--out", results.to_str().unwrap()], "/nonexistent/nvidia-smi", None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("no NVIDIA GPU here"), "{}", text(&out));
    assert!(!results.exists(), "nothing may be written without a GPU");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// (part, seconds, item) of each line of a printed plan, and each part's estimated total.
fn plan(said: &str) -> (Vec<(usize, u64, String)>, Vec<u64>) {
    let (mut items, mut totals, mut part) = (vec![], vec![], 0);
    for line in said.lines() {
        if let Some(rest) = line.strip_prefix("part ") {
            part = rest.split(' ').next().unwrap().parse().unwrap();
        } else if let Some(rest) = line.trim().strip_prefix("estimated total: ") {
            totals.push(rest.split('s').next().unwrap().parse().unwrap());
        } else if line.starts_with("  ") {
            let words: Vec<&str> = line.split_whitespace().collect();
            items.push((
                part,
                words[1].trim_end_matches('s').parse().unwrap(),
                words[0].to_string(),
            ));
        }
    }
    (items, totals)
}

#[test]
fn the_dry_run_plan_fits_the_budget_and_covers_every_family_and_shape() {
    let dir = scratch("plan");
    let smi = fake_smi(&dir);
    let out = script(&["--dry-run"], smi.to_str().unwrap(), None);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("NVIDIA H200, driver 580.159.04, sm_90"), "{said}");
    let (items, totals) = plan(&said);
    assert_eq!(totals.len(), 1, "one part at the default budget: {said}");
    assert!(totals[0] <= 540, "{said}");
    assert_eq!(
        items.iter().map(|i| i.1).sum::<u64>(),
        totals[0],
        "the total adds up: {said}"
    );
    assert!(items[0].2.starts_with("test:"), "correctness first: {said}");
    for family in [
        "router", "gate", "dispatch", "gemm", "codebook", "esft", "mix", "layers",
    ] {
        for model in ["mixtral", "deepseek"] {
            let item = format!("bench:{family}:{model}");
            assert!(items.iter().any(|i| i.2 == item), "{item} missing: {said}");
        }
    }
    for model in ["mixtral", "deepseek"] {
        assert!(items.iter().any(|i| i.2 == format!("torch:{model}")), "{said}");
    }
    // Every timed item covers the five token counts.
    let timed: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("bench:") || l.contains("torch:"))
        .collect();
    assert_eq!(timed.len(), 18, "{said}");
    assert!(timed.iter().all(|l| l.ends_with("T=1,16,64,4096,16384")), "{said}");
    // A smaller budget splits the same items into parts that each fit and each measure the
    // ceilings.
    let small = script(
        &["--dry-run", "--budget", "200", "--no-tests"],
        smi.to_str().unwrap(),
        None,
    );
    let (parts, totals) = plan(&text(&small));
    assert!(totals.len() > 1 && totals.iter().all(|&t| t <= 200), "{}", text(&small));
    let ceilings = parts.iter().filter(|i| i.2 == "ceilings").count();
    assert_eq!(ceilings, totals.len());
    assert!(!parts.iter().any(|i| i.2.starts_with("test:")));
    // Without a GPU the plan is still shown, and says so.
    let here = script(&["--dry-run"], "/nonexistent/nvidia-smi", None);
    assert_eq!(here.status.code(), Some(0), "{}", text(&here));
    assert!(text(&here).contains("no NVIDIA GPU here"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The page generator, built (or found up to date) by cargo beside this test's own profile.
fn benchmarks_md() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "--example", "benchmarks_md"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|name| name == "release") {
        cargo.arg("--release");
    }
    assert!(
        cargo.status().expect("cargo runs").success(),
        "building the page generator"
    );
    let built = profile_dir.join("examples/benchmarks_md");
    assert!(built.exists(), "{} after the build", built.display());
    built
}

/// A fake bundle in `dir/bundle.tar.xz`, packed as `--build` packs it: each executable
/// prints what the real one would and appends its name and arguments to `dir/runs`. Returns
/// the bundle folder and the runs file.
fn fake_bundle(dir: &Path) -> (PathBuf, PathBuf) {
    let bundle = dir.join("bundle");
    for sub in ["tests", "benches"] {
        std::fs::create_dir_all(bundle.join(sub)).unwrap();
    }
    std::fs::copy(benchmarks_md(), bundle.join("benchmarks_md")).unwrap();
    std::fs::write(bundle.join("ARCH"), "90\n").unwrap();
    let counter = dir.join("runs");
    let ceilings = RECORDED_LOG.lines().filter(|l| l.starts_with("MOE_CEILING")).take(2);
    let body = |lines: &str| {
        format!(
            "#!/bin/sh\necho \"$(basename \"$0\") $*\" >>{}\n{lines}",
            counter.display()
        )
    };
    let ceiling_lines: String = ceilings.map(|l| format!("echo '{l}'\n")).collect();
    executable(&bundle.join("benches/ceilings"), &body(&ceiling_lines));
    let record = "echo 'MOE_BENCH op=gemm/gemm1_swiglu_bf16 shape=mixtral,T=4096 impl=ours us=2000 p10=1990 p90=2100 bytes=400000000 flops=800000000000'\n";
    for bench in [
        "router", "gate", "dispatch", "gemm", "codebook", "esft", "mix", "layers",
    ] {
        executable(&bundle.join("benches").join(bench), &body(record));
    }
    for suite in ["devices", "gemm", "dispatch", "router", "layers"] {
        executable(&bundle.join("tests").join(suite), &body("echo 'test result: ok'\n"));
    }
    let packed = Command::new("sh")
        .arg("-c")
        .arg("tar -C \"$1\" -cf - bundle | xz -1 >\"$1/bundle.tar.xz\" && rm -r \"$1/bundle\"")
        .arg("sh")
        .arg(dir)
        .status()
        .unwrap();
    assert!(packed.success());
    (bundle, counter)
}

#[test]
fn a_run_on_a_fake_gpu_writes_the_page_and_resumes() {
    let dir = scratch("fake-run");
    let smi = fake_smi(&dir);
    let (bundle, counter) = fake_bundle(&dir);
    let results = dir.join("results");
    let args = ["--bundle", bundle.to_str().unwrap(), "--out", results.to_str().unwrap()];
    let out = script(&args, smi.to_str().unwrap(), None);
    let said = text(&out);
    assert!(said.contains("unpacking"), "{said}");
    // The torch items fail here (no PyTorch with a GPU): the run says so and exits non-zero,
    // with every other item done and the page written.
    assert_ne!(out.status.code(), Some(0), "{said}");
    for file in [
        "BENCHMARKS.md",
        "benchmarks.json",
        "benchmarks.png",
        "run.log",
        "done",
        "plan.txt",
    ] {
        assert!(results.join(file).exists(), "{file} missing: {said}");
    }
    assert!(
        std::fs::read_dir(&results).unwrap().count() <= 8,
        "at most 8 files come back"
    );
    let page = std::fs::read_to_string(results.join("BENCHMARKS.md")).unwrap();
    assert!(
        page.contains("| gemm/gemm1_swiglu_bf16 | mixtral,T=4096 | ours | 2000.00 (1990.00–2100.00) |"),
        "{page}"
    );
    assert!(page.contains("| 4000 GB/s |"), "{page}");
    assert!(page.contains("| test:devices | passed |"), "{page}");
    assert!(page.contains("| torch:mixtral | failed (exit "), "{page}");
    let done = std::fs::read_to_string(results.join("done")).unwrap();
    assert_eq!(
        done.lines().count(),
        5 + 16,
        "tests and benches done, torch not: {done}"
    );
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(
        runs.lines().filter(|l| l.starts_with("gemm --bench")).count(),
        2,
        "{runs}"
    );
    // The tests ran first, the ceilings before the first bench.
    let order: Vec<&str> = runs.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        &order[..6],
        ["devices", "gemm", "dispatch", "router", "layers", "ceilings"]
    );
    // A second run into the same folder skips what is done: only the ceilings and the torch
    // items run again.
    std::fs::remove_file(&counter).unwrap();
    let again = script(&args, smi.to_str().unwrap(), None);
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(runs.lines().collect::<Vec<_>>(), ["ceilings "], "{}", text(&again));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_part_runs_its_own_items_only() {
    let dir = scratch("fake-part");
    let smi = fake_smi(&dir);
    let (bundle, counter) = fake_bundle(&dir);
    let budget = ["--budget", "60", "--no-tests"];
    let (items, _) = plan(&text(&script(
        &[&budget[..], &["--dry-run"]].concat(),
        smi.to_str().unwrap(),
        None,
    )));
    let part2: Vec<String> = items
        .iter()
        .filter(|i| i.0 == 2 && i.2.starts_with("bench:"))
        .map(|i| i.2.split(':').nth(1).unwrap().to_string() + " --bench")
        .collect();
    assert!(!part2.is_empty());
    let results = dir.join("results");
    let run = [
        &budget[..],
        &[
            "--part",
            "2",
            "--bundle",
            bundle.to_str().unwrap(),
            "--out",
            results.to_str().unwrap(),
        ],
    ]
    .concat();
    let out = script(&run, smi.to_str().unwrap(), None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("next: scripts/gpu-validate.sh --part 3"),
        "{}",
        text(&out)
    );
    let runs = std::fs::read_to_string(&counter).unwrap();
    let benches: Vec<&str> = runs
        .lines()
        .filter(|l| l.contains("--bench"))
        .map(|l| l.split(" __").next().unwrap())
        .collect();
    assert_eq!(benches, part2, "{runs}");
    assert!(runs.starts_with("ceilings"), "{runs}");
    let log = std::fs::read_to_string(results.join("run.log")).unwrap();
    assert!(log.starts_with("gpu-validate: part 2 of "), "{log}");
    let past_end = [&budget[..], &["--part", "99", "--bundle", bundle.to_str().unwrap()]].concat();
    let out = script(&past_end, smi.to_str().unwrap(), None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_run_without_a_bundle_says_how_to_make_one() {
    let dir = scratch("no-bundle");
    let smi = fake_smi(&dir);
    let missing = dir.join("missing");
    let out = script(
        &["--bundle", missing.to_str().unwrap()],
        smi.to_str().unwrap(),
        Some(&dir),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--build"), "{}", text(&out));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[ignore = "needs shellcheck, which CI installs and runs on scripts/*.sh as a step of its own"]
fn the_script_is_shellcheck_clean() {
    let out = Command::new("shellcheck")
        .arg(SCRIPT)
        .output()
        .expect("shellcheck is installed");
    assert!(out.status.success(), "{}", text(&out));
}
