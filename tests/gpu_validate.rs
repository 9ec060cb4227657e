//! The non-GPU parts of `scripts/gpu-validate.sh`: its argument handling, its refusal to
//! do anything without a GPU, and the benchmark page it writes, from a recorded sample.
use moe_kernels::benchmarks::{Machine, Record, markdown, records};
use std::path::PathBuf;
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-validate.sh");

/// A bench log as `cargo bench` prints it on a GPU: criterion's lines around the records.
const RECORDED_LOG: &str = "\
     Running benches/dispatch.rs (target/release/deps/dispatch-0123456789abcdef)
dispatch/permute mixtral,T=4096 on NVIDIA H100 80GB HBM3: 41.25 us, 22% of the bandwidth floor
MOE_BENCH op=dispatch/permute shape=mixtral,T=4096 us=41.250 bytes=301989888 flops=0 bw=0.2180
permute/emulator        time:   [1.2 ms 1.3 ms 1.4 ms]
MOE_BENCH op=grouped_gemm/forward shape=deepseek,T=16384 us=1523.500 bytes=1073741824 flops=1231453023109 bw=0.2100 tc=0.8170 vs=cublas_dense:1.1040
MOE_BENCH op=broken shape=x us=notanumber bytes=1 flops=0 bw=0.1
";

#[test]
fn records_are_read_from_a_recorded_log_and_nothing_else() {
    let found = records(RECORDED_LOG);
    assert_eq!(found.len(), 2, "two well-formed records: {found:?}");
    assert_eq!(found[0].op, "dispatch/permute");
    assert_eq!(found[0].shape, "mixtral,T=4096");
    assert_eq!(found[0].floor_bytes, 301_989_888);
    assert_eq!(found[0].tensor_fraction, None);
    assert_eq!(found[1].versus, Some(("cublas_dense".to_string(), 1.104)));
    assert_eq!(found[1].tensor_fraction, Some(0.817));
}

#[test]
fn a_record_survives_its_own_line() {
    let record = Record {
        op: "router/select".into(),
        shape: "deepseek, T=1".into(),
        micros: 3.5,
        floor_bytes: 8192,
        floor_flops: 0,
        bandwidth_fraction: 0.125,
        tensor_fraction: None,
        versus: Some(("dense gemm".into(), 0.5)),
    };
    let parsed = Record::parse(&record.to_line()).expect("parses");
    assert_eq!(parsed.shape, "deepseek,_T=1", "spaces become underscores");
    assert_eq!(parsed.versus, Some(("dense_gemm".into(), 0.5)));
    assert_eq!(
        (parsed.micros, parsed.floor_bytes, parsed.bandwidth_fraction),
        (3.5, 8192, 0.125)
    );
}

#[test]
fn the_page_has_the_machine_and_one_row_per_record() {
    let machine = Machine {
        device: "NVIDIA H100 80GB HBM3".into(),
        driver: "550.54.15".into(),
        date: "2026-11-23".into(),
    };
    let page = markdown(&machine, &records(RECORDED_LOG));
    assert!(
        page.contains("**NVIDIA H100 80GB HBM3** (driver 550.54.15), 2026-11-23"),
        "{page}"
    );
    // Hand-formatted from the recorded sample: 301989888 B = 301.990 MB, bw 0.2180 = 22%.
    assert!(
        page.contains("| dispatch/permute | mixtral,T=4096 | 41.25 | 301.990 / 0.000 | 22% | - | - |"),
        "{page}"
    );
    assert!(
        page.contains("| grouped_gemm/forward | deepseek,T=16384 | 1523.50 | 1073.742 / 1231.453 | 21% | 82% | 1.10x the time of cublas_dense |"),
        "{page}"
    );
    assert_eq!(
        page.lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| op"))
            .count(),
        2
    );
    let empty = markdown(&machine, &[]);
    assert!(empty.contains("No benchmark produced a record"), "{empty}");
}

fn script(args: &[&str], smi: &str) -> Output {
    Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .env("NVIDIA_SMI", smi)
        .output()
        .expect("bash runs the script")
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[test]
fn the_script_parses_its_arguments() {
    let help = script(&["--help"], "/nonexistent");
    assert_eq!(help.status.code(), Some(0), "{}", text(&help));
    assert!(text(&help).contains("usage: scripts/gpu-validate.sh"));
    for bad in [&["--bogus"][..], &["--out"][..]] {
        let out = script(bad, "/nonexistent");
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out));
    }
}

#[test]
fn without_a_gpu_the_script_stops_and_changes_nothing() {
    let page = std::env::temp_dir().join(format!("moe-gpu-validate-{}.md", std::process::id()));
    let out = script(&["--out", page.to_str().unwrap()], "/nonexistent/nvidia-smi");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("no NVIDIA GPU here"), "{}", text(&out));
    assert!(!page.exists(), "the page must not be written without a GPU");
}

#[test]
fn the_script_reads_the_local_architecture() {
    let dir = std::env::temp_dir().join(format!("moe-fake-smi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let smi: PathBuf = dir.join("nvidia-smi");
    std::fs::write(&smi, "#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 550.54.15, 9.0'\n").unwrap();
    let out = Command::new("chmod").arg("+x").arg(&smi).output().unwrap();
    assert!(out.status.success());
    let out = script(&["--dry-run", "--no-tests"], smi.to_str().unwrap());
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("NVIDIA H100 80GB HBM3, driver 550.54.15, sm_90"),
        "{said}"
    );
    assert!(said.contains("plan: tests=0 benches=1"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_script_is_shellcheck_clean() {
    let Ok(out) = Command::new("shellcheck").arg(SCRIPT).output() else {
        eprintln!("shellcheck not installed: skipped (CI installs it)");
        return;
    };
    assert!(out.status.success(), "{}", text(&out));
}
