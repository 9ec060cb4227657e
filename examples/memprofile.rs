//! Memory behaviour of every kernel, measured on the emulator: coalescing (32-byte sectors
//! per warp request), redundancy (bytes requested / unique bytes), shared-memory bank
//! conflicts, atomics and stack traffic, next to each workload's declared byte floor.
//!
//!     MOE_EMU_PROFILE=1 cargo run --release --example memprofile [-- --json]
//!
//! Needs the profiling build (clang-19: `apt-get install clang-19`). What the numbers mean
//! and what they do not model: `moe_kernels::device::profile`. Every kernel of the crate
//! runs here except the planted-bug kernels, which are broken on purpose.
use half::bf16;
use moe_kernels::device::emulator::profiling_build;
use moe_kernels::device::profile::{Access, MemoryProfile, Space, Traffic};
use moe_kernels::device::{Device, EmulatorDevice};
use moe_kernels::ops::gemm::{self, DgradConfig, DgradEpilogue, ForwardConfig, GemmPath, GemmShape, Groups};
use moe_kernels::selftest::{self, probes::Probe};
use std::collections::BTreeMap;
use std::process::ExitCode;

type Runner = Box<dyn Fn(&Device) -> moe_kernels::Result<()>>;

/// One workload: what it runs, and the fewest global bytes it could move (if declared).
struct Workload {
    name: &'static str,
    floor_bytes: Option<u64>,
    run: Runner,
}

fn workloads() -> Vec<Workload> {
    let mut list: Vec<Workload> = vec![Workload {
        name: "selftest (every check)",
        floor_bytes: None,
        run: Box::new(|d| selftest::run_all(d).map(drop)),
    }];
    for dgrad in [false, true] {
        list.push(Workload {
            name: if dgrad {
                "decode dgrad (T = 1)"
            } else {
                "decode forward (T = 1)"
            },
            floor_bytes: Some(decode_floor()),
            run: Box::new(move |d| decode_gemm(d, dgrad)),
        });
    }
    for probe in Probe::ALL {
        list.push(Workload {
            name: probe.kernel(),
            floor_bytes: None,
            run: Box::new(move |d| probe.run(d, 8)),
        });
    }
    list
}

/// The decode shape: 8 experts of [N = 256, K = 512] bf16, two of them with one row each (T = 1,
/// top-2): the floor is their weights plus the rows in and out.
const DECODE_SHAPE: GemmShape = GemmShape {
    experts: 8,
    n: 256,
    k: 512,
};
const DECODE_OFFSETS: [i32; 9] = [0, 0, 1, 1, 1, 2, 2, 2, 2];

fn decode_floor() -> u64 {
    let GemmShape { n, k, .. } = DECODE_SHAPE;
    (2 * (n * k + k + n) * 2) as u64
}

/// The decode forward (`dgrad`: the decode dgrad) on [`DECODE_SHAPE`], random-free inputs.
fn decode_gemm(device: &Device, dgrad: bool) -> moe_kernels::Result<()> {
    let GemmShape { experts, n, k } = DECODE_SHAPE;
    let ramp = |len: usize| {
        (0..len)
            .map(|i| bf16::from_f32((i % 17) as f32 / 17.0))
            .collect::<Vec<_>>()
    };
    let b = device.upload(&ramp(experts * n * k))?;
    let offsets = device.upload(&DECODE_OFFSETS)?;
    let groups = Groups {
        offsets: &offsets,
        sorted_rows: None,
        rows: 2,
        max_group_rows: 1,
    };
    let no_weights = None::<&moe_kernels::DeviceBuffer<f32>>;
    if dgrad {
        let (dc, mut da) = (device.upload(&ramp(2 * n))?, device.alloc_zeros::<bf16>(2 * k)?);
        let config = DgradConfig {
            epilogue: DgradEpilogue::Store,
            path: GemmPath::Decode,
        };
        let no_gu = None::<&moe_kernels::DeviceBuffer<bf16>>;
        gemm::dgrad(
            device,
            &dc,
            &b,
            DECODE_SHAPE,
            &groups,
            config,
            no_weights,
            no_gu,
            &mut da,
        )
    } else {
        let (a, mut c) = (device.upload(&ramp(2 * k))?, device.alloc_zeros::<bf16>(2 * n)?);
        let config = ForwardConfig {
            path: GemmPath::Decode,
            ..ForwardConfig::default()
        };
        let no_gu = None::<&mut moe_kernels::DeviceBuffer<bf16>>;
        gemm::forward(
            device,
            &a,
            &b,
            DECODE_SHAPE,
            &groups,
            &config,
            no_weights,
            &mut c,
            no_gu,
        )
    }
}

/// Everything one kernel did over all its launches in a workload.
#[derive(Default)]
struct KernelSummary {
    launches: u64,
    totals: [[Traffic; 3]; 4], // [space][access]
    unique_bytes: u64,
    atomics: u64,
    local_bytes: u64,
}

const SPACES: [Space; 4] = [Space::Global, Space::Shared, Space::Local, Space::Other];
const ACCESSES: [Access; 3] = [Access::Load, Access::Store, Access::Atomic];

impl KernelSummary {
    fn add(&mut self, p: &MemoryProfile) {
        self.launches += 1;
        for space in SPACES {
            for access in ACCESSES {
                self.totals[space as usize][access as usize].add(&p.traffic(space, access));
            }
        }
        self.unique_bytes += p.unique_global_load_bytes + p.unique_global_store_bytes;
        self.atomics += p.atomics();
        self.local_bytes += p.local_bytes();
    }

    fn get(&self, space: Space, access: Access) -> Traffic {
        self.totals[space as usize][access as usize]
    }

    fn load_redundancy(&self, unique_loaded: u64) -> f64 {
        let requested = self.get(Space::Global, Access::Load).bytes;
        if unique_loaded == 0 {
            0.0
        } else {
            requested as f64 / unique_loaded as f64
        }
    }
}

struct Row {
    workload: &'static str,
    kernel: String,
    floor: Option<u64>,
    summary: KernelSummary,
    unique_loaded: u64,
}

fn measure(emulator: &EmulatorDevice) -> moe_kernels::Result<Vec<Row>> {
    let device = Device::Emulator(emulator.clone());
    let mut rows = vec![];
    for w in workloads() {
        (w.run)(&device)?;
        let mut by_kernel: BTreeMap<String, (KernelSummary, u64)> = BTreeMap::new();
        for p in emulator.take_profiles() {
            let entry = by_kernel.entry(p.kernel.clone()).or_default();
            entry.0.add(&p);
            entry.1 += p.unique_global_load_bytes;
        }
        for (kernel, (summary, unique_loaded)) in by_kernel {
            rows.push(Row {
                workload: w.name,
                kernel,
                floor: w.floor_bytes,
                summary,
                unique_loaded,
            });
        }
    }
    Ok(rows)
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<28} {:<30} {:>4} {:>9} {:>9} {:>7} {:>11} {:>9} {:>12} {:>12} {:>10}",
        "workload",
        "kernel",
        "runs",
        "ld sect/r",
        "st sect/r",
        "ld redun",
        "smem confl",
        "atomics",
        "local B",
        "unique B",
        "floor B"
    );
    for r in rows {
        let s = &r.summary;
        let mut shared = s.get(Space::Shared, Access::Load);
        shared.add(&s.get(Space::Shared, Access::Store));
        let conflicts = if shared.requests == 0 {
            "-".to_string()
        } else {
            format!("{:.2} ({})", shared.bank_conflict_degree(), shared.max_bank_degree)
        };
        println!(
            "{:<28} {:<30} {:>4} {:>9.2} {:>9.2} {:>7.2} {:>11} {:>9} {:>12} {:>12} {:>10}",
            r.workload,
            r.kernel,
            s.launches,
            s.get(Space::Global, Access::Load).sectors_per_request(),
            s.get(Space::Global, Access::Store).sectors_per_request(),
            s.load_redundancy(r.unique_loaded),
            conflicts,
            s.atomics,
            s.local_bytes,
            s.unique_bytes,
            r.floor.map_or("-".to_string(), |f| f.to_string())
        );
    }
    println!(
        "\nsect/r: distinct 32-byte sectors per warp request (4-byte coalesced: 4, 16-byte: 16, worst: 32).\n\
         ld redun: global bytes requested / unique bytes loaded (1 = each byte read once).\n\
         smem confl: mean (max) bank-conflict degree of shared requests (1 = conflict-free for 4-byte words).\n\
         local B: bytes moved to/from emulated thread stacks (registers on a GPU unless ptxas reports spills).\n\
         Not modelled: caches, timing, occupancy."
    );
}

fn print_json(rows: &[Row]) {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let s = &r.summary;
            let load = s.get(Space::Global, Access::Load);
            let store = s.get(Space::Global, Access::Store);
            let sl = s.get(Space::Shared, Access::Load);
            let ss = s.get(Space::Shared, Access::Store);
            serde_json::json!({
                "workload": r.workload,
                "kernel": r.kernel,
                "launches": s.launches,
                "global_load_requests": load.requests,
                "global_load_sectors_per_request": load.sectors_per_request(),
                "global_store_requests": store.requests,
                "global_store_sectors_per_request": store.sectors_per_request(),
                "global_load_redundancy": s.load_redundancy(r.unique_loaded),
                "shared_load_requests": sl.requests,
                "shared_load_conflict_degree": sl.bank_conflict_degree(),
                "shared_store_requests": ss.requests,
                "shared_store_conflict_degree": ss.bank_conflict_degree(),
                "max_conflict_degree": sl.max_bank_degree.max(ss.max_bank_degree),
                "atomics": s.atomics,
                "local_bytes": s.local_bytes,
                "unique_global_bytes": s.unique_bytes,
                "floor_bytes": r.floor,
            })
        })
        .collect();
    let json = serde_json::to_string_pretty(&items).expect("JSON values always serialize");
    println!("{json}");
}

/// Memory behaviour of every kernel on the profiling build of the emulator (see the module
/// docs); run with `MOE_EMU_PROFILE=1`.
#[derive(clap::Parser)]
struct Args {
    /// One JSON object per workload and kernel instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let json = <Args as clap::Parser>::parse().json;
    if !profiling_build() {
        eprintln!(
            "memprofile needs the profiling build of the emulator: install clang-19 \
             (apt-get install clang-19) and run MOE_EMU_PROFILE=1 cargo run --release --example memprofile"
        );
        return ExitCode::from(2);
    }
    let emulator = match EmulatorDevice::from_env().and_then(|e| e.profiling()) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match measure(&emulator) {
        Ok(rows) if json => print_json(&rows),
        Ok(rows) => print_table(&rows),
        Err(e) => {
            eprintln!("a workload failed: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
