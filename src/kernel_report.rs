//! Static evidence of each kernel's quality, without a GPU: the ptxas resource report (in
//! [`registry`]), theoretical occupancy for a launch
//! configuration, and the instruction mix of the SASS in the embedded fatbins
//! (`cuobjdump -sass`, which needs `nvdisasm` beside it: pip `nvidia-cuda-cuobjdump` and
//! `nvidia-cuda-nvdisasm`). Used by `examples/kernel_report.rs` and `tests/kernel_report.rs`.
use crate::device::registry;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Per-SM limits of one architecture (CUDA C++ Programming Guide, "Technical
/// Specifications per Compute Capability", for compute capabilities 8.0 and 9.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchLimits {
    pub arch: u32,
    pub max_warps_per_sm: u32,
    pub max_blocks_per_sm: u32,
    pub registers_per_sm: u32,
    /// Registers are allocated per warp in units of this many.
    pub register_unit: u32,
    pub shared_bytes_per_sm: u32,
    /// Shared memory the system reserves for every resident block.
    pub shared_reserved_per_block: u32,
    /// Shared memory is allocated in units of this many bytes.
    pub shared_unit: u32,
}

impl ArchLimits {
    /// The limits of sm_80 (A100) and sm_90 (H100); `None` for other archs.
    pub fn of(arch: u32) -> Option<Self> {
        let shared_bytes_per_sm = match arch {
            80 => 164 * 1024,
            90 => 228 * 1024,
            _ => return None,
        };
        Some(Self {
            arch,
            max_warps_per_sm: 64,
            max_blocks_per_sm: 32,
            registers_per_sm: 64 * 1024,
            register_unit: 256,
            shared_bytes_per_sm,
            shared_reserved_per_block: 1024,
            shared_unit: 128,
        })
    }
}

/// How many blocks of a launch fit on one SM at once, and what limits it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Occupancy {
    pub blocks_per_sm: u32,
    /// Resident warps / the SM's maximum.
    pub fraction: f64,
    /// `"warps"`, `"blocks"`, `"registers"` or `"shared memory"`.
    pub limiter: &'static str,
}

/// Theoretical occupancy of blocks of `threads` threads using `registers` per thread and
/// `shared_bytes` of shared memory (static + dynamic) per block.
pub fn occupancy(limits: &ArchLimits, threads: u32, registers: u32, shared_bytes: u32) -> Occupancy {
    let warps = threads.div_ceil(32).max(1);
    let round_up = |v: u32, unit: u32| v.div_ceil(unit) * unit;
    let registers_per_warp = round_up(registers.max(1) * 32, limits.register_unit);
    let shared = round_up(shared_bytes + limits.shared_reserved_per_block, limits.shared_unit);
    let candidates = [
        (limits.max_warps_per_sm / warps, "warps"),
        (limits.max_blocks_per_sm, "blocks"),
        ((limits.registers_per_sm / registers_per_warp) / warps, "registers"),
        (limits.shared_bytes_per_sm / shared, "shared memory"),
    ];
    let (blocks, limiter) = candidates.into_iter().min_by_key(|&(b, _)| b).expect("four candidates");
    Occupancy {
        blocks_per_sm: blocks,
        fraction: (blocks * warps) as f64 / limits.max_warps_per_sm as f64,
        limiter,
    }
}

/// What one kernel's SASS does, counted by instruction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstructionMix {
    pub instructions: u32,
    /// Tensor-core matrix multiply-accumulates (HMMA).
    pub mma: u32,
    /// Hopper's warpgroup MMAs (HGMMA, from wgmma.mma_async).
    pub wgmma: u32,
    /// TMA tensor loads and stores (UTMALDG, UTMASTG, from cp.async.bulk.tensor).
    pub tma_loads: u32,
    pub tma_stores: u32,
    /// Transaction-barrier operations (SYNCS.*, from mbarrier).
    pub syncs: u32,
    pub global_loads: u32,
    pub global_loads_128: u32,
    pub global_stores: u32,
    pub global_stores_128: u32,
    /// Asynchronous global-to-shared copies (LDGSTS, from cp.async).
    pub async_copies: u32,
    /// Of which 16 bytes wide (LDGSTS.128).
    pub async_copies_128: u32,
    /// Shared-memory loads, ldmatrix (LDSM) included.
    pub shared_loads: u32,
    pub shared_stores: u32,
    pub barriers: u32,
    /// Local-memory traffic: must stay zero in hot kernels.
    pub local_loads: u32,
    pub local_stores: u32,
}

impl InstructionMix {
    fn count(&mut self, opcode: &str) {
        let wide = opcode.contains(".128");
        let class = opcode.split('.').next().unwrap_or(opcode);
        self.instructions += 1;
        match class {
            "HMMA" => self.mma += 1,
            "HGMMA" => self.wgmma += 1,
            "UTMALDG" => self.tma_loads += 1,
            "UTMASTG" => self.tma_stores += 1,
            "SYNCS" => self.syncs += 1,
            "LDG" => {
                self.global_loads += 1;
                self.global_loads_128 += wide as u32;
            }
            "STG" => {
                self.global_stores += 1;
                self.global_stores_128 += wide as u32;
            }
            "LDGSTS" => {
                self.async_copies += 1;
                self.async_copies_128 += wide as u32;
            }
            "LDS" | "LDSM" => self.shared_loads += 1,
            "STS" => self.shared_stores += 1,
            "BAR" => self.barriers += 1,
            "LDL" => self.local_loads += 1,
            "STL" => self.local_stores += 1,
            _ => {}
        }
    }
}

/// The instruction mix of one kernel on one arch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSass {
    pub kernel: String,
    pub arch: u32,
    /// Arch-specific code (`sm_90a`: wgmma, setmaxnreg), which runs on that arch only.
    pub arch_specific: bool,
    pub mix: InstructionMix,
}

/// Parses `cuobjdump -sass` output:
/// ```text
///   arch = sm_80
///     Function : probe_vector
///         /*0040*/  @!P0 LDG.E.128 R4, [R2.64] ;  /* 0x... */
/// ```
pub fn parse_sass(text: &str) -> Vec<KernelSass> {
    let mut kernels: Vec<KernelSass> = vec![];
    let (mut arch, mut arch_specific) = (0, false);
    for line in text.lines() {
        let line = line.trim();
        if let Some(a) = line.strip_prefix("arch = sm_") {
            let a = a.trim();
            arch_specific = a.ends_with('a');
            arch = a.trim_end_matches('a').parse().unwrap_or(0);
        } else if let Some(name) = line.strip_prefix("Function : ") {
            kernels.push(KernelSass {
                kernel: name.trim().to_string(),
                arch,
                arch_specific,
                mix: InstructionMix::default(),
            });
        } else if let (Some(k), Some(rest)) = (kernels.last_mut(), line.strip_prefix("/*")) {
            // "/*0040*/  @!P0 LDG.E.128 R4, [R2.64] ;  /* 0x... */": skip the address and a predicate.
            let mut tokens = rest.split_once("*/").map_or("", |(_, t)| t).split_whitespace();
            let opcode = match tokens.next() {
                Some(t) if t.starts_with('@') => tokens.next(),
                t => t,
            };
            if let Some(op) = opcode.filter(|op| op.chars().next().is_some_and(|c| c.is_ascii_uppercase())) {
                k.mix.count(op);
            }
        }
    }
    kernels
}

/// cuobjdump beside the nvcc the build used, if both it and nvdisasm are there.
pub fn cuobjdump() -> Option<PathBuf> {
    let bin = PathBuf::from(registry::NVCC?).parent()?.to_path_buf();
    (bin.join("cuobjdump").is_file() && bin.join("nvdisasm").is_file()).then(|| bin.join("cuobjdump"))
}

/// The SASS of every embedded module, through `cuobjdump -sass`, in module order.
///
/// The modules are disassembled side by side, one cuobjdump per core: the three largest print
/// over 100 MB of SASS each, so one after another takes tens of seconds.
pub fn embedded_sass(cuobjdump: &Path) -> Result<Vec<KernelSass>, String> {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("moe-kernels-sass-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let bin = cuobjdump.parent().unwrap_or(Path::new("."));
    let path = std::env::join_paths(
        std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .map_err(|e| e.to_string())?;
    let disassemble = |module: &registry::EmbeddedModule| -> Result<Vec<KernelSass>, String> {
        let file = dir.join(format!("{}.fatbin", module.name));
        std::fs::write(&file, module.fatbin).map_err(|e| format!("{}: {e}", file.display()))?;
        let out = Command::new(cuobjdump)
            .arg("-sass")
            .arg(&file)
            .env("PATH", &path)
            .output()
            .map_err(|e| format!("{}: {e}", cuobjdump.display()))?;
        if !out.status.success() {
            return Err(format!(
                "cuobjdump -sass {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(parse_sass(&String::from_utf8_lossy(&out.stdout)))
    };
    let modules = registry::MODULES;
    let next = AtomicUsize::new(0);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(modules.len().max(1));
    let mut done: Vec<(usize, Result<Vec<KernelSass>, String>)> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = vec![];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(module) = modules.get(i) else { break mine };
                        mine.push((i, disassemble(module)));
                    }
                })
            })
            .collect();
        jobs.into_iter()
            .flat_map(|j| j.join().expect("cuobjdump worker"))
            .collect()
    });
    std::fs::remove_dir_all(&dir).ok();
    done.sort_by_key(|(i, _)| *i);
    let mut all = vec![];
    for (_, sass) in done {
        all.extend(sass?);
    }
    Ok(all)
}
