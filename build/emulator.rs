//! The emulator side of the build: `kernels/*.cu` as host C++ plus the runtime
//! (`kernels/emu/runtime.cpp`), as static libraries.
//!
//! `MOE_EMU_SANITIZE=address`: everything under AddressSanitizer.
//! `MOE_EMU_PROFILE=1`: the kernel files are compiled by clang (`MOE_EMU_CLANG`, default
//! `clang++-19`) with load/store tracing for the memory profiler (`kernels/emu/profiler.cpp`)
//! and the shared-memory race detector (`kernels/emu/racecheck.cpp`, on at run time with
//! `MOE_EMU_RACECHECK=1`); the emulator's own code is not instrumented.
use crate::KernelFile;
use std::path::Path;

pub fn build(root: &Path, files: &[KernelFile]) {
    for var in ["MOE_EMU_SANITIZE", "MOE_EMU_PROFILE", "MOE_EMU_CLANG"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let profile = std::env::var("MOE_EMU_PROFILE").is_ok_and(|v| v == "1");
    let sanitize = std::env::var("MOE_EMU_SANITIZE").unwrap_or_default();
    let clang = std::env::var("MOE_EMU_CLANG").unwrap_or_else(|_| "clang++-19".into());
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++20")
            .include(root.join("kernels/emu"))
            .include(root.join("kernels/emu/include")) // <cuda_bf16.h> and friends -> cuemu.h
            .include(root.join("kernels/include"))
            .flag("-Wno-unused-parameter")
            // A TensorMap parameter is 64-byte aligned; GCC notes an ABI change from 2011.
            .flag("-Wno-psabi")
            .flag("-Wno-unknown-pragmas")
            // Emulated kernels at -O0 would be unbearably slow in debug test builds.
            .opt_level(2);
        if profile {
            b.compiler(&clang).define("CUEMU_PROFILE", None);
        }
        match sanitize.as_str() {
            "" => {}
            "address" => {
                b.flag("-fsanitize=address")
                    .flag("-fno-omit-frame-pointer")
                    .opt_level(1);
            }
            other => panic!("MOE_EMU_SANITIZE={other}: the supported value is `address`"),
        }
        b
    };
    assert!(
        !profile || sanitize.is_empty(),
        "MOE_EMU_PROFILE and MOE_EMU_SANITIZE cannot be combined"
    );
    if sanitize == "address" {
        // rustc links with -nodefaultlibs, so the runtime must be named, and ASan wants it
        // first among the shared libraries: before the lines cc prints.
        println!("cargo:rustc-link-lib=dylib=asan");
        println!("cargo:rustc-cfg=moe_emu_asan");
    }

    let mut kernels = base();
    // Every typed access in kernel code is checked for alignment, as the GPU checks it, and
    // every index into an array of known size for its bounds (undefined behaviour on the GPU,
    // where a local array indexed past its end silently reads or writes something else); the
    // handlers are the emulator's own (kernels/emu/runtime.cpp), which fail the launch.
    kernels.flag("-x").flag("c++").flag("-fsanitize=alignment,bounds");
    if profile {
        // Keep each access at the width the CUDA thread used: no vectorizing.
        kernels
            .flag("-fsanitize-coverage=trace-pc-guard,trace-loads,trace-stores")
            .flag("-fno-vectorize")
            .flag("-fno-slp-vectorize");
    }
    for f in files {
        kernels.file(&f.path);
    }
    kernels.compile("moe_emulated_kernels");

    let mut runtime = base();
    runtime
        .file(root.join("kernels/emu/runtime.cpp"))
        .file(root.join("kernels/emu/hopper_async.cpp"))
        .file(root.join("kernels/emu/wgmma.cpp"));
    if profile {
        runtime
            .file(root.join("kernels/emu/profiler.cpp"))
            .file(root.join("kernels/emu/racecheck.cpp"));
        println!("cargo:rustc-cfg=moe_emu_profile");
    }
    runtime.compile("moe_emulator_runtime");
}
