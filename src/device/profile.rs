//! Memory profiles of emulated launches: what Nsight Compute's memory workload analysis
//! would show about coalescing, redundancy and bank conflicts, computed from the addresses
//! every emulated CUDA thread touched (`kernels/emu/profiler.cpp`).
//!
//! Needs the profiling build (`MOE_EMU_PROFILE=1`, clang-19): see
//! [`EmulatorDevice::profiling`](super::EmulatorDevice::profiling).
//!
//! How to read the numbers:
//! - **sectors per request** (global): distinct 32-byte sectors one warp-level access
//!   touches. 32 lanes reading consecutive 4-byte words: 4; 16-byte vectors: 16; a stride
//!   of 32 floats: 32 (each lane its own sector); a broadcast: 1.
//! - **redundancy** (global loads): bytes requested / unique bytes. 1 means every byte was
//!   fetched once; 2 means the kernel read its input twice (caches may absorb some of it on
//!   a GPU: not modelled).
//! - **bank-conflict degree** (shared): the largest number of distinct 4-byte words one
//!   request puts in one of the 32 banks. 1 is conflict-free for 4-byte accesses; 8- and
//!   16-byte accesses need 2 and 4 at least.
//! - **local bytes**: accesses to the emulated thread's stack. On a GPU most of these are
//!   registers; the ptxas report says whether anything really spills to local memory.
//!
//! Not modelled: L1/L2 hit rates, timing, occupancy.
use super::launch::LaunchConfig;

/// Where an access went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Inside a buffer the device allocated.
    Global,
    /// The running block's shared memory (static or dynamic).
    Shared,
    /// The CUDA thread's own stack (registers or local memory on a GPU).
    Local,
    /// Anything else (built-in variables, host constants).
    Other,
}

/// What an access did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Load,
    Store,
    Atomic,
}

/// Warp-level requests and what they cost. Layout shared with `cuemu_traffic` (C).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Warp-level requests (one per warp, access site and occurrence).
    pub requests: u64,
    /// Accesses by single lanes.
    pub lane_accesses: u64,
    /// Bytes requested by all lanes.
    pub bytes: u64,
    /// Distinct 32-byte sectors, summed over requests (global memory).
    pub sectors: u64,
    /// Bank-conflict degree, summed over requests (shared memory).
    pub bank_degree_sum: u64,
    /// The worst bank-conflict degree of any request (shared memory).
    pub max_bank_degree: u64,
}

impl Traffic {
    /// Mean distinct 32-byte sectors per request (0 without requests).
    pub fn sectors_per_request(&self) -> f64 {
        ratio(self.sectors, self.requests)
    }

    /// Mean bank-conflict degree per request (0 without requests).
    pub fn bank_conflict_degree(&self) -> f64 {
        ratio(self.bank_degree_sum, self.requests)
    }

    /// Adds another count to this one (the worst degree is kept).
    pub fn add(&mut self, o: &Traffic) {
        self.requests += o.requests;
        self.lane_accesses += o.lane_accesses;
        self.bytes += o.bytes;
        self.sectors += o.sectors;
        self.bank_degree_sum += o.bank_degree_sum;
        self.max_bank_degree = self.max_bank_degree.max(o.max_bank_degree);
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One access site (an instruction of the kernel) and its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSite {
    /// Sites are numbered in the order the launch first executed them.
    pub order: u32,
    /// The code address of the access in the emulated kernel (for debuggers).
    pub address: u64,
    pub space: Space,
    pub access: Access,
    pub traffic: Traffic,
}

/// The memory behaviour of one emulated launch.
#[derive(Debug, Clone)]
pub struct MemoryProfile {
    pub kernel: String,
    pub config: LaunchConfig,
    pub sites: Vec<AccessSite>,
    /// Unique bytes of global memory loaded (atomics included): the load traffic floor.
    pub unique_global_load_bytes: u64,
    /// Unique bytes of global memory stored (atomics included).
    pub unique_global_store_bytes: u64,
    totals: [[Traffic; 3]; 4],
}

impl MemoryProfile {
    /// Everything of one kind, over all sites.
    pub fn traffic(&self, space: Space, access: Access) -> Traffic {
        self.totals[space as usize][access as usize]
    }

    /// Global loads: bytes requested / unique bytes (1 = each byte read once).
    pub fn global_load_redundancy(&self) -> f64 {
        ratio(
            self.traffic(Space::Global, Access::Load).bytes,
            self.unique_global_load_bytes,
        )
    }

    /// Atomic operations by single lanes, in any space.
    pub fn atomics(&self) -> u64 {
        [Space::Global, Space::Shared, Space::Local, Space::Other]
            .iter()
            .map(|&s| self.traffic(s, Access::Atomic).lane_accesses)
            .sum()
    }

    /// Bytes the CUDA threads moved to and from their own stacks.
    pub fn local_bytes(&self) -> u64 {
        let mut t = self.traffic(Space::Local, Access::Load);
        t.add(&self.traffic(Space::Local, Access::Store));
        t.bytes
    }
}

/// FFI mirror of `cuemu_site` / `cuemu_totals` (kernels/emu/profiler.cpp).
#[cfg(moe_emu_profile)]
pub(super) mod ffi {
    use super::*;
    use std::ffi::c_void;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct SiteC {
        site: u64,
        order: u32,
        space: u8,
        access: u8,
        reserved: u16,
        traffic: Traffic,
    }

    #[repr(C)]
    #[derive(Default)]
    struct TotalsC {
        traffic: [[Traffic; 3]; 4],
        unique_load: u64,
        unique_store: u64,
        site_count: u64,
    }

    unsafe extern "C" {
        fn cuemu_profile_totals(p: *const c_void, out: *mut TotalsC);
        fn cuemu_profile_sites(p: *const c_void, out: *mut SiteC, capacity: u64);
        fn cuemu_profile_free(p: *mut c_void);
        pub(in crate::device) fn cuemu_register_buffer(p: *const c_void, bytes: usize);
        pub(in crate::device) fn cuemu_unregister_buffer(p: *const c_void);
    }

    const SPACES: [Space; 4] = [Space::Global, Space::Shared, Space::Local, Space::Other];
    const ACCESSES: [Access; 3] = [Access::Load, Access::Store, Access::Atomic];

    /// Reads and frees the profile the runtime made for one launch.
    ///
    /// # Safety
    /// `handle` comes from a profiled `cuemu_launch` and is used only once.
    pub(in crate::device) unsafe fn take(handle: *mut c_void, kernel: &str, config: LaunchConfig) -> MemoryProfile {
        let mut totals = TotalsC::default();
        let mut sites = vec![];
        // SAFETY: the handle is live until freed below; the buffers have the sizes given.
        unsafe {
            cuemu_profile_totals(handle, &mut totals);
            sites.resize(totals.site_count as usize, SiteC::default());
            cuemu_profile_sites(handle, sites.as_mut_ptr(), totals.site_count);
            cuemu_profile_free(handle);
        }
        MemoryProfile {
            kernel: kernel.into(),
            config,
            sites: sites
                .into_iter()
                .map(|s| AccessSite {
                    order: s.order,
                    address: s.site,
                    space: SPACES[s.space as usize],
                    access: ACCESSES[s.access as usize],
                    traffic: s.traffic,
                })
                .collect(),
            unique_global_load_bytes: totals.unique_load,
            unique_global_store_bytes: totals.unique_store,
            totals: totals.traffic,
        }
    }
}
