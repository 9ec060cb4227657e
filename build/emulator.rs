//! The emulator side of the build: `kernels/*.cu` as host C++ plus the runtime
//! (`kernels/emu/runtime.cpp`), into one static library.
use crate::KernelFile;
use std::path::Path;

pub fn build(root: &Path, files: &[KernelFile]) {
    println!("cargo:rerun-if-env-changed=MOE_EMU_SANITIZE");
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .include(root.join("kernels/emu"))
        .include(root.join("kernels/emu/include")) // <cuda_bf16.h> and friends -> cuemu.h
        .include(root.join("kernels/include"))
        .flag("-x")
        .flag("c++")
        .flag("-Wno-unused-parameter")
        .flag("-Wno-unknown-pragmas")
        // Emulated kernels at -O0 would be unbearably slow in debug test builds.
        .opt_level(2);
    match std::env::var("MOE_EMU_SANITIZE").unwrap_or_default().as_str() {
        "" => {}
        "address" => {
            b.flag("-fsanitize=address")
                .flag("-fno-omit-frame-pointer")
                .opt_level(1);
            // rustc links with -nodefaultlibs, so the runtime must be named, and ASan wants
            // it first among the shared libraries: before the lines cc prints.
            println!("cargo:rustc-link-lib=dylib=asan");
        }
        other => panic!("MOE_EMU_SANITIZE={other}: the supported value is `address`"),
    }
    for f in files {
        b.file(&f.path);
    }
    b.file(root.join("kernels/emu/runtime.cpp"));
    b.compile("moe_emulated_kernels");
}
