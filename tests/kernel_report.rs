//! Invariants of the compiled kernels that must never regress, read from the SASS, plus the
//! report's own arithmetic (occupancy, SASS parsing) on hand-computed cases.
use moe_kernels::device::registry::{KERNEL_RESOURCES, KERNELS, PTXAS_DIAGNOSTICS, TARGET_ARCHS};
use moe_kernels::kernel_report::{self, ArchLimits, KernelSass, occupancy, parse_sass};
use std::sync::OnceLock;

#[test]
fn occupancy_matches_hand_computed_cases() {
    let sm80 = ArchLimits::of(80).unwrap();
    let sm90 = ArchLimits::of(90).unwrap();
    // 256 threads = 8 warps, 32 registers: 8 blocks fill the 64 warps.
    let o = occupancy(&sm80, 256, 32, 0);
    assert_eq!((o.blocks_per_sm, o.fraction, o.limiter), (8, 1.0, "warps"));
    // 128 registers: 4096 per warp, 16 warps per SM -> 2 blocks of 8 warps.
    let o = occupancy(&sm80, 256, 128, 0);
    assert_eq!((o.blocks_per_sm, o.fraction, o.limiter), (2, 0.25, "registers"));
    // 100 KiB of shared memory (+1 KiB reserved) per block: one block on 164 KiB, two on 228.
    assert_eq!(occupancy(&sm80, 128, 32, 100 * 1024).blocks_per_sm, 1);
    assert_eq!(occupancy(&sm90, 128, 32, 100 * 1024).blocks_per_sm, 2);
    // 32-thread blocks: the 32-block limit caps occupancy at half.
    let o = occupancy(&sm90, 32, 16, 0);
    assert_eq!((o.blocks_per_sm, o.fraction, o.limiter), (32, 0.5, "blocks"));
    assert!(ArchLimits::of(75).is_none());
}

#[test]
fn sass_parser_counts_a_recorded_sample() {
    let sample = "
        arch = sm_90
                Function : probe_vector
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0040*/              @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;          /* 0x000000040204a981 */
        /*0050*/                   STG.E.128 desc[UR4][R6.64], R4 ;           /* 0x0000000406007986 */
        /*0060*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;    /* 0x000000100c08723c */
        /*0070*/                   LDSM.16.M88.4 R12, [R3] ;                  /* 0x000000000303783b */
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;              /* 0x0000000000007b1d */
        /*0090*/                   STL [R1], R4 ;                             /* 0x0000000401007387 */
        /*00a0*/                   EXIT ;                                     /* 0x000000000000794d */
                Function : other
        /*0000*/                   LDG.E R2, desc[UR4][R2.64] ;               /* 0x0000000402027981 */
    ";
    let kernels = parse_sass(sample);
    assert_eq!(kernels.len(), 2);
    let v = &kernels[0];
    assert_eq!((v.kernel.as_str(), v.arch), ("probe_vector", 90));
    let m = v.mix;
    assert_eq!(
        (m.instructions, m.global_loads, m.global_loads_128, m.global_stores_128),
        (8, 1, 1, 1)
    );
    assert_eq!(
        (m.mma, m.shared_loads, m.barriers, m.local_stores, m.local_loads),
        (1, 1, 1, 1, 0)
    );
    assert_eq!((kernels[1].mix.global_loads, kernels[1].mix.global_loads_128), (1, 0));
    assert!(!v.arch_specific);
}

#[test]
fn sass_parser_counts_hopper_instructions() {
    let sample = "
        arch = sm_90a
                Function : hopper
        /*0000*/                   SYNCS.EXCH.64 URZ, [UR4], UR6 ;                          /* 0x... */
        /*0010*/                   UTMALDG.2D [UR8], [UR10] ;                               /* 0x... */
        /*0020*/              @!P0 SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3 ;           /* 0x... */
        /*0030*/                   WARPGROUP.ARRIVE ;                                       /* 0x... */
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24, UP0, gsb0 ; /* 0x... */
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR16], R24, gsb0 ; /* 0x... */
        /*0060*/                   UTMASTG.2D [UR4], [UR6] ;                                /* 0x... */
        /*0070*/                   EXIT ;                                                   /* 0x... */
    ";
    let kernels = parse_sass(sample);
    assert_eq!(kernels.len(), 1);
    let (k, m) = (&kernels[0], kernels[0].mix);
    assert_eq!((k.arch, k.arch_specific), (90, true));
    assert_eq!((m.instructions, m.wgmma, m.mma), (8, 2, 0));
    assert_eq!((m.tma_loads, m.tma_stores, m.syncs), (1, 1, 2));
}

/// ptxas's notes that would make a Hopper kernel slow in silence: `setmaxnreg` ignored (C7508),
/// wgmma serialised (C7510, C7515, and the other reasons ptxas gives for it, e.g. C7514) and a
/// wgmma.wait_group the compiler injected where the code reads accumulators on a path without
/// its own wait (C7517); and register spills on any arch.
const HOPPER_PERFORMANCE_LOSS: [&str; 5] = [
    "(C7508)",
    "(C7510)",
    "(C7515)",
    "(C7517)",
    "wgmma.mma_async instructions are serialized",
];

#[test]
#[cfg_attr(not(moe_gpu_kernels), ignore = "needs GPU kernels: nvcc's ptxas report")]
fn ptxas_reports_no_spill_and_no_hopper_performance_loss() {
    // The planted bugs may serialise wgmma on purpose (an accumulator read before its wait).
    for d in PTXAS_DIAGNOSTICS.iter().filter(|d| !d.module.starts_with("planted")) {
        for note in HOPPER_PERFORMANCE_LOSS {
            assert!(!d.message.contains(note), "kernels/{}.cu: {}", d.module, d.message);
        }
    }
    assert!(!KERNEL_RESOURCES.is_empty(), "the GPU build reported no kernel");
    for r in KERNEL_RESOURCES {
        assert_eq!(
            (r.spill_store_bytes, r.spill_load_bytes),
            (0, 0),
            "{} spills on sm_{}",
            r.kernel,
            r.arch
        );
    }
}

#[test]
#[cfg_attr(
    any(not(moe_sass_tools), moe_emu_asan, moe_emu_profile),
    ignore = "needs GPU kernels and cuobjdump + nvdisasm beside nvcc (pip nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm), \
              in the plain emulator build: the SASS is the same in every build, so the ASan and profiling builds skip it"
)]
fn wgmma_kernels_contain_hgmma_in_their_sm_90a_code() {
    let all = sass();
    for kernel in [
        "selftest_wgmma_bf16_n64",
        "selftest_wgmma_bf16_n256",
        "selftest_wgmma_f16_n128",
    ] {
        let hopper: Vec<&KernelSass> = all.iter().filter(|s| s.kernel == kernel && s.arch_specific).collect();
        assert!(!hopper.is_empty(), "{kernel} has no sm_90a code");
        for s in hopper {
            assert!(s.mix.wgmma > 0, "{kernel} on sm_{}a has no HGMMA: {:?}", s.arch, s.mix);
        }
    }
}

/// The end-to-end Hopper demonstration (`kernels/hopper_demo.cu`) and the sm_90a grouped-GEMM
/// kernels (`kernels/include/gemm_sm90.cuh`, `gemm_sm90_wgrad.cuh`) really run on Hopper's
/// machinery in their sm_90a code: wgmma (HGMMA), TMA loads (UTMALDG; wgrad: 16-byte cp.async)
/// and mbarriers (SYNCS); their ptxas reports (no spill, no C7508/C7510/C7515/C7517) are
/// checked with every kernel's by `ptxas_reports_no_spill_and_no_hopper_performance_loss`.
#[test]
#[cfg_attr(
    any(not(moe_sass_tools), moe_emu_asan, moe_emu_profile),
    ignore = "needs GPU kernels and cuobjdump + nvdisasm beside nvcc (pip nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm), \
              in the plain emulator build: the SASS is the same in every build, so the ASan and profiling builds skip it"
)]
fn hopper_kernels_run_on_hgmma_utmaldg_and_syncs_in_their_sm_90a_code() {
    let all = sass();
    for kernel in [
        "hopper_demo_gemm_bf16",
        "grouped_gemm_fwd_sm90_bf16",
        "grouped_gemm_fwd_sm90_f16",
        "grouped_gemm_dgrad_sm90_bf16",
        "grouped_gemm_dgrad_sm90_f16",
    ] {
        let hopper: Vec<&KernelSass> = mix_of(all, kernel).filter(|s| s.arch_specific).collect();
        assert!(!hopper.is_empty(), "{kernel} has no sm_90a code");
        for s in hopper {
            let m = s.mix;
            assert!(
                m.wgmma > 0 && m.tma_loads > 0 && m.syncs > 0,
                "{kernel} on sm_{}a: {m:?}",
                s.arch
            );
        }
    }
    // wgrad copies both row operands itself: 16-byte cp.async (LDGSTS.128) instead of TMA.
    for kernel in ["grouped_gemm_wgrad_sm90_bf16", "grouped_gemm_wgrad_sm90_f16"] {
        let hopper: Vec<&KernelSass> = mix_of(all, kernel).filter(|s| s.arch_specific).collect();
        assert!(!hopper.is_empty(), "{kernel} has no sm_90a code");
        for s in hopper {
            let m = s.mix;
            assert!(
                m.wgmma > 0 && m.async_copies_128 > 0 && m.syncs > 0 && m.tma_loads == 0,
                "{kernel} on sm_{}a: {m:?}",
                s.arch
            );
        }
    }
}

/// The SASS of every embedded kernel, disassembled once for all the tests of this file (it
/// takes cuobjdump and nvdisasm tens of seconds). The tests that call it are ignored (with the
/// reason) where the build found no nvcc, cuobjdump or nvdisasm (cfg `moe_sass_tools`, set by
/// build.rs).
fn sass() -> &'static [KernelSass] {
    static SASS: OnceLock<Vec<KernelSass>> = OnceLock::new();
    SASS.get_or_init(|| {
        let cuobjdump = kernel_report::cuobjdump().expect("the build found cuobjdump and nvdisasm beside nvcc");
        kernel_report::embedded_sass(&cuobjdump).expect("cuobjdump -sass")
    })
}

/// The kernels on the gate's tensor-core pair tiles (gate_mma.cuh): the forward of every form
/// (the linear one in f16/bf16; f32 has its own tile), the backward's coefficient pass for every
/// form that has one, and the routing step's fused kernels.
fn gate_tensor_core_tiles() -> Vec<String> {
    let mut kernels = Vec::new();
    for dtype in ["f32", "f16", "bf16"] {
        for form in ["lowrank", "symmetric", "attention", "full"] {
            kernels.push(format!("gate_scores_{form}_{dtype}"));
            kernels.push(format!("gate_coef_{form}_{dtype}"));
            kernels.push(format!("gate_route_{form}_{dtype}_e32"));
        }
        if dtype != "f32" {
            kernels.push(format!("gate_scores_linear_{dtype}"));
            for row in [32, 64, 128, 256] {
                kernels.push(format!("gate_route_linear_{dtype}_e{row}"));
            }
        }
    }
    kernels
}

fn mix_of<'a>(all: &'a [KernelSass], kernel: &str) -> impl Iterator<Item = &'a KernelSass> {
    let found: Vec<&KernelSass> = all.iter().filter(|k| k.kernel == kernel).collect();
    assert_eq!(
        found.len(),
        TARGET_ARCHS.len(),
        "`{kernel}` should appear once per target arch"
    );
    found.into_iter()
}

#[test]
#[cfg_attr(
    any(not(moe_sass_tools), moe_emu_asan, moe_emu_profile),
    ignore = "needs GPU kernels and cuobjdump + nvdisasm beside nvcc (pip nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm), \
              in the plain emulator build: the SASS is the same in every build, so the ASan and profiling builds skip it"
)]
fn no_kernel_touches_local_memory() {
    let all = sass();
    for k in KERNELS.iter().filter(|k| k.module != "planted_bugs") {
        for s in mix_of(all, k.name) {
            assert_eq!(
                (s.mix.local_loads, s.mix.local_stores),
                (0, 0),
                "{} on sm_{} uses local memory",
                s.kernel,
                s.arch
            );
        }
    }
}

#[test]
#[cfg_attr(
    any(not(moe_sass_tools), moe_emu_asan, moe_emu_profile),
    ignore = "needs GPU kernels and cuobjdump + nvdisasm beside nvcc (pip nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm), \
              in the plain emulator build: the SASS is the same in every build, so the ASan and profiling builds skip it"
)]
fn tensor_core_kernels_contain_hmma() {
    let all = sass();
    let mut kernels: Vec<String> = [
        "selftest_mma_direct_bf16",
        "selftest_mma_direct_f16",
        "selftest_mma_ldmatrix_bf16",
    ]
    .map(String::from)
    .to_vec();
    kernels.extend(gate_tensor_core_tiles());
    // The gate's split-tf32 tile: the backward's GEMMs (dX, dW) at every dtype, and the f32 linear
    // forward with its routing step.
    for op in ["dx", "dw"] {
        for dtype in ["f32", "f16", "bf16"] {
            kernels.push(format!("gate_{op}_{dtype}"));
        }
    }
    kernels.push("gate_scores_linear_f32".into());
    for row in [32, 64, 128] {
        kernels.push(format!("gate_route_linear_f32_e{row}"));
    }
    // The codebook's 16-bit nearest-code search runs its score tiles on tensor cores.
    for list in ["top1", "top8"] {
        for dtype in ["f16", "bf16"] {
            kernels.push(format!("codebook_nearest_{list}_{dtype}"));
        }
    }
    // The grouped expert GEMM's 16-bit tile kernels: forward, dA, dB.
    for op in ["fwd", "dgrad", "wgrad"] {
        for dtype in ["f16", "bf16"] {
            kernels.push(format!("grouped_gemm_{op}_{dtype}"));
        }
    }
    for kernel in &kernels {
        for s in mix_of(all, kernel) {
            assert!(s.mix.mma > 0, "{kernel} on sm_{} has no HMMA: {:?}", s.arch, s.mix);
        }
    }
}

#[test]
#[cfg_attr(
    any(not(moe_sass_tools), moe_emu_asan, moe_emu_profile),
    ignore = "needs GPU kernels and cuobjdump + nvdisasm beside nvcc (pip nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm), \
              in the plain emulator build: the SASS is the same in every build, so the ASan and profiling builds skip it"
)]
fn vector_kernels_move_128_bits_per_access() {
    let all = sass();
    for s in mix_of(all, "probe_vector") {
        assert!(
            s.mix.global_loads_128 > 0 && s.mix.global_stores_128 > 0,
            "sm_{}: {:?}",
            s.arch,
            s.mix
        );
        assert_eq!(
            s.mix.global_loads, s.mix.global_loads_128,
            "sm_{}: a narrower load crept in",
            s.arch
        );
    }
    // The dispatch row movers and the VQ-MoE mixing gate: 16-byte accesses on their vector path
    // (narrower ones remain for the index arrays, the logits and the scalar fallback).
    for op in [
        "dispatch_permute",
        "dispatch_combine",
        "dispatch_combine_bwd",
        "mix_forward",
        "mix_backward",
    ] {
        for dtype in ["f32", "f16", "bf16"] {
            let kernel = format!("{op}_{dtype}");
            for s in mix_of(all, &kernel) {
                assert!(
                    s.mix.global_loads_128 > 0 && s.mix.global_stores_128 > 0,
                    "{kernel} on sm_{}: {:?}",
                    s.arch,
                    s.mix
                );
            }
        }
    }
    // The grouped GEMM's decode kernels (forward and dgrad) stream the weights with 16-byte
    // cp.async (LDGSTS.128) into their rings.
    for op in ["grouped_gemm_decode", "grouped_gemm_decode_dgrad"] {
        for dtype in ["f32", "f16", "bf16"] {
            let kernel = format!("{op}_{dtype}");
            for s in mix_of(all, &kernel) {
                assert!(s.mix.async_copies_128 > 0, "{kernel} on sm_{}: {:?}", s.arch, s.mix);
            }
        }
    }
    // The gate's pair tiles fill their rings with 16-byte cp.async (gate_mma.cuh).
    for kernel in &gate_tensor_core_tiles() {
        for s in mix_of(all, kernel) {
            assert!(s.mix.async_copies_128 > 0, "{kernel} on sm_{}: {:?}", s.arch, s.mix);
        }
    }
    for s in mix_of(all, "selftest_mma_ldmatrix_bf16") {
        assert!(
            s.mix.async_copies > 0,
            "cp.async should compile to LDGSTS on sm_{}: {:?}",
            s.arch,
            s.mix
        );
    }
}
