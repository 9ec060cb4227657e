//! What the build must guarantee about the GPU code, checked without a GPU: every kernel
//! is compiled for every target arch with zero register spills, the fatbins really hold
//! SASS for each arch, and both devices carry the same kernels.
use moe_kernels::device::registry::{self, KERNEL_RESOURCES, KERNELS, MODULES, TARGET_ARCHS};
use std::path::PathBuf;
use std::process::Command;

// Without nvcc the build has no GPU code, so the tests of it are ignored (with the reason, and
// counted as ignored rather than passed). `MOE_REQUIRE_KERNELS=1` (CI) makes a build without
// them fail instead.

#[test]
#[cfg_attr(not(moe_gpu_kernels), ignore = "no GPU kernels in this build: nvcc was not found")]
fn every_kernel_is_compiled_for_every_target_arch_without_spills() {
    assert!(registry::gpu_kernels_built(), "{}", registry::GPU_BUILD_NOTE);
    assert!(TARGET_ARCHS.contains(&80) || std::env::var_os("MOE_CUDA_ARCHS").is_some());
    let mut checked = 0;
    for kernel in KERNELS {
        for &arch in TARGET_ARCHS {
            let r = KERNEL_RESOURCES
                .iter()
                .find(|r| r.kernel == kernel.name && r.arch == arch)
                .unwrap_or_else(|| panic!("ptxas reported nothing for `{}` on sm_{arch}", kernel.name));
            assert_eq!(
                (r.spill_store_bytes, r.spill_load_bytes),
                (0, 0),
                "`{}` spills registers on sm_{arch}: {r:?}",
                kernel.name
            );
            assert!(
                r.registers > 0 && r.registers <= 255,
                "implausible register count: {r:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, KERNELS.len() * TARGET_ARCHS.len());
}

/// cuobjdump next to nvcc (pip `nvidia-cuda-cuobjdump` puts it there).
fn cuobjdump() -> Option<PathBuf> {
    let path = PathBuf::from(registry::NVCC?).with_file_name("cuobjdump");
    path.is_file().then_some(path)
}

#[test]
#[cfg_attr(
    not(moe_sass_tools),
    ignore = "needs GPU kernels and cuobjdump + nvdisasm beside nvcc (pip nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)"
)]
fn fatbins_hold_sass_for_every_target_arch_and_ptx() {
    let cuobjdump = cuobjdump().expect("the build found cuobjdump beside nvcc");
    let dir = std::env::temp_dir().join(format!("moe-kernels-fatbin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for module in MODULES {
        let file = dir.join(format!("{}.fatbin", module.name));
        std::fs::write(&file, module.fatbin).unwrap();
        let listing = |flag: &str| {
            let out = Command::new(&cuobjdump)
                .arg(flag)
                .arg(&file)
                .output()
                .expect("cuobjdump runs");
            assert!(
                out.status.success(),
                "cuobjdump {flag} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let elves = listing("--list-elf");
        for arch in TARGET_ARCHS {
            assert!(
                elves.contains(&format!("sm_{arch}")),
                "{}: no sm_{arch} SASS in\n{elves}",
                module.name
            );
        }
        let ptx = listing("--list-ptx");
        assert!(
            ptx.contains(&format!("sm_{}", TARGET_ARCHS[0])),
            "{}: no PTX in\n{ptx}",
            module.name
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn both_devices_carry_every_kernel() {
    assert!(!KERNELS.is_empty());
    for kernel in KERNELS {
        if cfg!(feature = "emulator") {
            let entry = registry::emulator_entry(kernel.name)
                .unwrap_or_else(|| panic!("`{}` has no emulator entry", kernel.name));
            // SAFETY: the entry's name is a NUL-terminated string literal.
            let name = unsafe { std::ffi::CStr::from_ptr(entry.name) };
            assert_eq!(name.to_str().unwrap(), kernel.name);
        }
        if registry::gpu_kernels_built() {
            assert!(
                MODULES.iter().any(|m| m.name == kernel.module),
                "no fatbin for module {}",
                kernel.module
            );
            assert!(
                KERNEL_RESOURCES.iter().any(|r| r.kernel == kernel.name),
                "`{}` not in the fatbin",
                kernel.name
            );
        }
    }
}
