//! Static evidence of every embedded kernel's quality, per target arch, with no GPU:
//! registers, shared memory and spills (ptxas), theoretical occupancy for the launch
//! configuration the crate uses (learnt by running every kernel once on the emulator: the
//! self-tests, the probes and `workloads`, a small run of every op), and
//! the SASS instruction mix (tensor-core MMAs, Hopper's HGMMA, TMA and SYNCS, 128-bit global
//! accesses, shared loads, barriers, local-memory traffic).
//!
//!     NVCC=... cargo run --release --example kernel_report [-- --json]
//!
//! Needs a build with nvcc; the SASS columns also need cuobjdump and nvdisasm beside it
//! (pip `nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`). Without them it says so.
use moe_kernels::device::registry::{self, KERNEL_RESOURCES, KERNELS};
use moe_kernels::device::{Device, LaunchConfig};
use moe_kernels::kernel_report::{self, ArchLimits, InstructionMix, KernelSass, occupancy};
use moe_kernels::selftest;
use std::collections::BTreeMap;
use std::process::ExitCode;

mod workloads;

struct Row {
    kernel: &'static str,
    arch: u32,
    registers: u32,
    static_shared: u32,
    spills: u32,
    launch: Option<LaunchConfig>,
    occupancy: Option<(f64, &'static str)>,
    mix: Option<InstructionMix>,
}

/// The launch configuration of every kernel, from one emulated run of each.
fn launch_configs() -> moe_kernels::Result<BTreeMap<String, LaunchConfig>> {
    let device = Device::emulator()?;
    selftest::run_all(&device)?;
    selftest::wgmma(&device)?;
    selftest::probes::run_all(&device, 4)?;
    workloads::run_all(&device)?;
    Ok(device.launch_configs())
}

fn rows(configs: &BTreeMap<String, LaunchConfig>, sass: &[KernelSass]) -> Vec<Row> {
    let mut rows = vec![];
    for k in KERNELS {
        for r in KERNEL_RESOURCES.iter().filter(|r| r.kernel == k.name) {
            let launch = configs.get(k.name).copied();
            let occupancy = launch.zip(ArchLimits::of(r.arch)).map(|(c, limits)| {
                let threads = c.block.0 * c.block.1 * c.block.2;
                let o = occupancy(&limits, threads, r.registers, r.shared_bytes + c.shared_bytes);
                (o.fraction, o.limiter)
            });
            rows.push(Row {
                kernel: k.name,
                arch: r.arch,
                registers: r.registers,
                static_shared: r.shared_bytes,
                spills: r.spill_store_bytes + r.spill_load_bytes,
                launch,
                occupancy,
                mix: sass
                    .iter()
                    .find(|s| s.kernel == k.name && s.arch == r.arch)
                    .map(|s| s.mix),
            });
        }
    }
    rows
}

fn dash<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<30} {:>5} {:>4} {:>6} {:>6} {:>14} {:>16} {:>5} {:>5} {:>5} {:>5} {:>7} {:>7} {:>7} {:>7} {:>4} {:>5}",
        "kernel",
        "arch",
        "regs",
        "smem",
        "spill",
        "launch",
        "occupancy",
        "mma",
        "hgmma",
        "utma",
        "syncs",
        "ldg128",
        "stg128",
        "ldgsts",
        "lds",
        "bar",
        "local"
    );
    for r in rows {
        let launch = r.launch.map(|c| {
            format!(
                "{}x{} +{}B",
                c.grid.0 * c.grid.1 * c.grid.2,
                c.block.0 * c.block.1 * c.block.2,
                c.shared_bytes
            )
        });
        let occ = r.occupancy.map(|(f, limiter)| format!("{:.0}% ({limiter})", f * 100.0));
        let m = r.mix;
        println!(
            "{:<30} {:>5} {:>4} {:>6} {:>6} {:>14} {:>16} {:>5} {:>5} {:>5} {:>5} {:>7} {:>7} {:>7} {:>7} {:>4} {:>5}",
            r.kernel,
            format!("sm_{}", r.arch),
            r.registers,
            r.static_shared,
            r.spills,
            dash(launch),
            dash(occ),
            dash(m.map(|m| m.mma)),
            dash(m.map(|m| m.wgmma)),
            dash(m.map(|m| format!("{}/{}", m.tma_loads, m.tma_stores))),
            dash(m.map(|m| m.syncs)),
            dash(m.map(|m| m.global_loads_128)),
            dash(m.map(|m| m.global_stores_128)),
            dash(m.map(|m| m.async_copies)),
            dash(m.map(|m| m.shared_loads)),
            dash(m.map(|m| m.barriers)),
            dash(m.map(|m| m.local_loads + m.local_stores)),
        );
    }
    println!(
        "\nsmem: static shared bytes; launch: blocks x threads + dynamic shared bytes, as the crate last launched it;\n\
         occupancy: resident warps / 64 per SM and what limits it; mma: HMMA; hgmma: HGMMA (wgmma);\n\
         utma: TMA loads/stores (UTMALDG/UTMASTG); syncs: SYNCS (mbarrier); ldg128/stg128: 128-bit global\n\
         loads/stores; ldgsts: cp.async; lds: shared loads incl. ldmatrix; bar: barriers; local: LDL+STL."
    );
}

fn print_json(rows: &[Row]) {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let m = r.mix.unwrap_or_default();
            serde_json::json!({
                "kernel": r.kernel,
                "arch": r.arch,
                "registers": r.registers,
                "static_shared_bytes": r.static_shared,
                "spill_bytes": r.spills,
                "block_threads": r.launch.map(|c| c.block.0 * c.block.1 * c.block.2),
                "dynamic_shared_bytes": r.launch.map(|c| c.shared_bytes),
                "occupancy": r.occupancy.map(|(f, _)| f),
                "occupancy_limiter": r.occupancy.map(|(_, l)| l),
                "sass": r.mix.is_some(),
                "mma": m.mma,
                "wgmma": m.wgmma,
                "tma_loads": m.tma_loads,
                "tma_stores": m.tma_stores,
                "syncs": m.syncs,
                "global_loads": m.global_loads,
                "global_loads_128": m.global_loads_128,
                "global_stores": m.global_stores,
                "global_stores_128": m.global_stores_128,
                "async_copies": m.async_copies,
                "shared_loads": m.shared_loads,
                "shared_stores": m.shared_stores,
                "barriers": m.barriers,
                "local_loads": m.local_loads,
                "local_stores": m.local_stores,
                "instructions": m.instructions,
            })
        })
        .collect();
    let json = serde_json::to_string_pretty(&items).expect("JSON values always serialize");
    println!("{json}");
}

/// Static evidence of every embedded kernel's quality (see the module docs).
#[derive(clap::Parser)]
struct Args {
    /// One JSON object per kernel and arch instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let json = <Args as clap::Parser>::parse().json;
    if !registry::gpu_kernels_built() {
        eprintln!(
            "kernel_report: this build has no GPU kernels ({})",
            registry::GPU_BUILD_NOTE
        );
        return ExitCode::SUCCESS;
    }
    let sass = match kernel_report::cuobjdump() {
        Some(cuobjdump) => kernel_report::embedded_sass(&cuobjdump).unwrap_or_else(|e| {
            eprintln!("kernel_report: no SASS columns: {e}");
            vec![]
        }),
        None => {
            eprintln!(
                "kernel_report: no SASS columns: cuobjdump and nvdisasm are not beside nvcc \
                 (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
            );
            vec![]
        }
    };
    let configs = launch_configs().unwrap_or_else(|e| {
        eprintln!("kernel_report: no occupancy column: the emulated run failed: {e}");
        BTreeMap::new()
    });
    let rows = rows(&configs, &sass);
    if json {
        print_json(&rows)
    } else {
        print_table(&rows)
    }
    ExitCode::SUCCESS
}
