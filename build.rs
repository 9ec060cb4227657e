//! Build script: compiles every `kernels/*.cu` twice from the same source.
//!
//! - GPU: nvcc builds one fatbin per file (SASS for each arch in `MOE_CUDA_ARCHS`, default
//!   `80,90`, arch 90 as sm_90a, plus PTX for the lowest) and its ptxas report becomes a
//!   resource table (registers, shared memory, spills per kernel and arch); both are cached
//!   in `<target>/moe-nvcc-cache` by content (`build/nvcc.rs`), since this script reruns for
//!   every emulator variant and profile. Without nvcc the crate builds without GPU kernels,
//!   with a warning; `MOE_REQUIRE_KERNELS=1` makes that an error.
//! - Emulator (feature `emulator`): the same files as host C++ with `kernels/emu`
//!   (`MOE_EMU_SANITIZE=address` for an AddressSanitizer build).
//!
//! Both feed `$OUT_DIR/kernels.rs`, included by `src/device/registry.rs`.
//!
//! The test-only kernel files ([`TEST_ONLY`]) are built only with the feature `dev-tools` (this
//! crate's tests, examples and benches), so a crate depending on this one compiles none of them.
//! The build also tells the tests what it produced, as cfgs: `moe_gpu_kernels` (nvcc compiled
//! every kernel), `moe_sass_tools` (cuobjdump and nvdisasm are beside that nvcc), and the
//! emulator builds `moe_emu_asan` (`MOE_EMU_SANITIZE=address`) and `moe_emu_profile`
//! (`MOE_EMU_PROFILE=1`, with the race detector), so a test
//! that needs them is `#[ignore]`d, with the reason, where they are missing.
#[path = "build/codegen.rs"]
mod codegen;
#[path = "build/emulator.rs"]
mod emulator;
#[path = "build/nvcc.rs"]
mod nvcc;

use std::path::{Path, PathBuf};

/// One `kernels/<module>.cu` file and the entry points it exports (`EMU_EXPORT(name)` lines).
pub struct KernelFile {
    pub module: String,
    pub path: PathBuf,
    pub kernels: Vec<String>,
}

/// Kernel files that only the development tooling launches (feature `dev-tools`).
const TEST_ONLY: [&str; 9] = [
    "hopper_demo",
    "planted_async",
    "planted_bugs",
    "planted_wgmma",
    "profiler_probes",
    "router_warp_rows",
    "selftest",
    "selftest_async",
    "wgmma_selftest",
];

fn kernel_files(dir: &Path, dev_tools: bool) -> Vec<KernelFile> {
    let mut files: Vec<KernelFile> = std::fs::read_dir(dir)
        .expect("kernels/ directory")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|path| {
            let source = std::fs::read_to_string(&path).expect("readable kernel file");
            let kernels = source
                .lines()
                .filter_map(|l| l.trim().strip_prefix("EMU_EXPORT("))
                .filter_map(|l| l.split(')').next())
                .map(|name| name.trim().to_string())
                .collect();
            let module = path.file_stem().unwrap().to_string_lossy().into_owned();
            KernelFile { module, path, kernels }
        })
        .filter(|f: &KernelFile| dev_tools || !TEST_ONLY.contains(&f.module.as_str()))
        .collect();
    files.sort_by(|a, b| a.module.cmp(&b.module));
    files
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build");
    let dev_tools = std::env::var_os("CARGO_FEATURE_DEV_TOOLS").is_some();
    let files = kernel_files(&root.join("kernels"), dev_tools);
    let gpu = nvcc::build(&root, &out, &files);
    println!("cargo::rustc-check-cfg=cfg(moe_emu_profile)"); // set by emulator::build
    println!("cargo::rustc-check-cfg=cfg(moe_emu_asan)"); // set by emulator::build
    println!("cargo::rustc-check-cfg=cfg(moe_gpu_kernels)");
    println!("cargo::rustc-check-cfg=cfg(moe_sass_tools)");
    if !gpu.fatbins.is_empty() {
        println!("cargo:rustc-cfg=moe_gpu_kernels");
        let bin = gpu.nvcc.as_deref().and_then(Path::parent);
        if bin.is_some_and(|b| b.join("cuobjdump").is_file() && b.join("nvdisasm").is_file()) {
            println!("cargo:rustc-cfg=moe_sass_tools");
        }
    }
    let emulator = std::env::var_os("CARGO_FEATURE_EMULATOR").is_some();
    if emulator {
        emulator::build(&root, &files);
    }
    let generated = codegen::generate(&files, &gpu, emulator);
    std::fs::write(out.join("kernels.rs"), generated).expect("write kernels.rs");
}
