//! The emulator device: kernels compiled as host C++ (`kernels/emu`), run on the CPU.
//! Device memory is host memory ([`HostBuffer`](super::HostBuffer)); a launch runs to
//! completion before it returns, so there is nothing to synchronize.
use super::Counters;
use super::launch::{KernelArgs, LaunchConfig};
use super::profile::MemoryProfile;
use super::registry::{self, EmuKernelEntry};
use crate::{Error, Result};
use std::ffi::{CStr, c_char, c_void};
use std::sync::{Arc, Mutex};

/// The emulated device's ceiling on shared memory per block: that of the oldest target arch
/// (sm_80: 163 KiB, sm_90: 227 KiB), so a kernel the emulator accepts launches on every target.
pub const MAX_DYNAMIC_SHARED_BYTES: u32 = if registry::TARGET_ARCHS[0] >= 90 {
    227 * 1024
} else {
    163 * 1024
};

/// The ceiling for kernels that run only on sm_90 (named `*_sm90_*`): an H100's 227 KiB.
pub const SM90_MAX_DYNAMIC_SHARED_BYTES: u32 = 227 * 1024;

/// The streaming multiprocessors the emulator reports ([`Device::multiprocessors`](super::Device::multiprocessors)):
/// few and odd, so persistent kernels walk several tiles per CTA, unevenly.
pub const MULTIPROCESSORS: u32 = 3;

/// The order in which the emulator runs the CUDA threads released together (at block
/// start, at each barrier, at each warp collective). Kernels must be correct under all of
/// them; the shuffled ones expose missing barriers that in-order execution hides, and
/// run-ahead the missing barriers that keep warps from overtaking each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    InOrder,
    Reverse,
    /// Shuffled; the seed (varied per launch) makes a run repeatable.
    Random {
        seed: u64,
    },
    /// One warp at a time, chosen with the seed, runs as far as it can (to a block barrier or
    /// its exit) before another moves: a warp overwrites a shared tile others still read
    /// unless a barrier stops it, so such a race shows as wrong values.
    RunAhead {
        seed: u64,
    },
}

/// The CPU emulator, with its schedule and worker count.
#[derive(Debug, Clone)]
pub struct EmulatorDevice {
    schedule: Schedule,
    workers: u32,
    stack_kib: u32,
    racecheck: bool,
    pub(super) counters: Arc<Counters>,
    /// Where profiled launches leave their memory profiles (None: not profiling).
    profiles: Option<Arc<Mutex<Vec<MemoryProfile>>>>,
}

#[repr(C)]
struct LaunchConfigC {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    schedule: u32,
    seed: u64,
    workers: u32,
    stack_kib: u32,
    profile: u32,
    racecheck: u32,
}

unsafe extern "C" {
    fn cuemu_launch(
        kernel: *const EmuKernelEntry,
        config: *const LaunchConfigC,
        params: *mut *mut c_void,
        profile_out: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    fn cuemu_address_sanitizer() -> i32;
    fn cuemu_profiling_build() -> i32;
}

fn env_var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_env<T: std::str::FromStr>(name: &'static str, expected: &'static str) -> Result<Option<T>> {
    env_var(name)
        .map(|v| {
            v.parse().map_err(|_| Error::Environment {
                name,
                value: v,
                expected,
            })
        })
        .transpose()
}

impl EmulatorDevice {
    /// In-order schedule, one worker per core, 256 KiB of stack per CUDA thread.
    pub fn new() -> Self {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Self {
            schedule: Schedule::InOrder,
            workers,
            stack_kib: 256,
            racecheck: false,
            counters: Arc::default(),
            profiles: None,
        }
    }

    /// [`new`](Self::new), adjusted by the environment:
    /// `MOE_EMU_SCHEDULE` = `inorder` | `reverse` | `random` | `runahead`, `MOE_EMU_SEED` (for
    /// random and runahead), `MOE_EMU_WORKERS` (OS threads running blocks),
    /// `MOE_EMU_STACK_KIB` (per CUDA thread), `MOE_EMU_RACECHECK=1` (the race detector, see
    /// [`with_racecheck`](Self::with_racecheck)).
    pub fn from_env() -> Result<Self> {
        let mut d = Self::new();
        let seed = parse_env("MOE_EMU_SEED", "an unsigned integer")?.unwrap_or(1);
        d.schedule = match env_var("MOE_EMU_SCHEDULE").as_deref() {
            None | Some("inorder") => Schedule::InOrder,
            Some("reverse") => Schedule::Reverse,
            Some("random") => Schedule::Random { seed },
            Some("runahead") => Schedule::RunAhead { seed },
            Some(other) => {
                return Err(Error::Environment {
                    name: "MOE_EMU_SCHEDULE",
                    value: other.into(),
                    expected: "inorder, reverse, random or runahead",
                });
            }
        };
        match env_var("MOE_EMU_RACECHECK").as_deref() {
            None | Some("0") => {}
            Some("1") => d = d.with_racecheck(true)?,
            Some(other) => {
                return Err(Error::Environment {
                    name: "MOE_EMU_RACECHECK",
                    value: other.into(),
                    expected: "0 or 1 (1 needs the profiling build, MOE_EMU_PROFILE=1)",
                });
            }
        }
        if let Some(w) = parse_env::<u32>("MOE_EMU_WORKERS", "a positive integer")? {
            if w == 0 {
                return Err(Error::Environment {
                    name: "MOE_EMU_WORKERS",
                    value: w.to_string(),
                    expected: "a positive integer",
                });
            }
            d.workers = w;
        }
        if let Some(s) = parse_env::<u32>("MOE_EMU_STACK_KIB", "a size in KiB (>= 16)")? {
            d.stack_kib = s.max(16);
        }
        Ok(d)
    }

    /// The same device with another schedule (shares the launch counters).
    pub fn with_schedule(&self, schedule: Schedule) -> Self {
        Self {
            schedule,
            ..self.clone()
        }
    }

    /// The same device, recording a [`MemoryProfile`] of every launch (read them with
    /// [`take_profiles`](Self::take_profiles)). Needs the profiling build (`MOE_EMU_PROFILE=1`).
    pub fn profiling(&self) -> Result<Self> {
        if !profiling_build() {
            return Err(Error::ProfilingUnavailable);
        }
        Ok(Self {
            profiles: Some(Arc::default()),
            ..self.clone()
        })
    }

    /// The same device with the shared-memory race detector on or off. On, a launch fails with
    /// [`Error::LaunchFailed`] naming the kernel, the shared-memory offset, both threads and
    /// both accesses (kind, width, source line) when two threads touch a shared word, one of
    /// them writing, and no barrier, `__syncwarp` or mbarrier arrive and wait orders them
    /// (TMA loads, wgmma operands and TMA stores count, when they happen). Needs the
    /// profiling build (`MOE_EMU_PROFILE=1`), whose load/store tracing it rides on.
    pub fn with_racecheck(&self, on: bool) -> Result<Self> {
        if on && !profiling_build() {
            return Err(Error::Environment {
                name: "MOE_EMU_RACECHECK",
                value: "1".into(),
                expected: "unset or 0 in this build: the race detector needs the profiling build (MOE_EMU_PROFILE=1)",
            });
        }
        Ok(Self {
            racecheck: on,
            ..self.clone()
        })
    }

    /// Whether launches run under the race detector.
    pub fn racecheck(&self) -> bool {
        self.racecheck
    }

    /// The profiles of the launches made since the last call (empty when not profiling).
    pub fn take_profiles(&self) -> Vec<MemoryProfile> {
        self.profiles
            .as_ref()
            .map(|p| std::mem::take(&mut *p.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }

    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    pub fn description(&self) -> String {
        let schedule = match self.schedule {
            Schedule::InOrder => "in-order".to_string(),
            Schedule::Reverse => "reverse".to_string(),
            Schedule::Random { seed } => format!("random, seed {seed}"),
            Schedule::RunAhead { seed } => format!("run-ahead, seed {seed}"),
        };
        let asan = if address_sanitizer() { ", AddressSanitizer" } else { "" };
        let racecheck = if self.racecheck { ", race detector" } else { "" };
        format!(
            "CPU emulator ({} workers, {schedule} schedule{asan}{racecheck})",
            self.workers
        )
    }

    pub(super) fn launch(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &mut KernelArgs<'_>,
        launch_index: u64,
    ) -> Result<()> {
        let entry = registry::emulator_entry(name).ok_or_else(|| Error::KernelNotFound(name.into()))?;
        check_signature(name, entry, &args.sizes)?;
        let (schedule, seed) = match self.schedule {
            Schedule::InOrder => (0, 0),
            Schedule::Reverse => (1, 0),
            // Vary the shuffle between launches, repeatably.
            Schedule::Random { seed } => (2, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ launch_index),
            Schedule::RunAhead { seed } => (3, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ launch_index),
        };
        let c = LaunchConfigC {
            grid: [config.grid.0, config.grid.1, config.grid.2],
            block: [config.block.0, config.block.1, config.block.2],
            shared_bytes: config.shared_bytes,
            schedule,
            seed,
            workers: self.workers,
            stack_kib: self.stack_kib,
            profile: self.profiles.is_some() as u32,
            racecheck: self.racecheck as u32,
        };
        let mut params = args.param_pointers();
        let mut error = vec![0 as c_char; 4096];
        let mut profile: *mut c_void = std::ptr::null_mut();
        // SAFETY: `entry` is the kernel's own descriptor and `params` matches its parameter
        // sizes (checked above); pointer arguments are live host buffers borrowed by `args`
        // for the duration of this synchronous call.
        let rc = unsafe {
            cuemu_launch(
                entry,
                &c,
                params.as_mut_ptr(),
                &mut profile,
                error.as_mut_ptr(),
                error.len(),
            )
        };
        self.keep_profile(profile, name, config);
        if rc != 0 {
            // SAFETY: cuemu_launch wrote a NUL-terminated message into `error`.
            let msg = unsafe { CStr::from_ptr(error.as_ptr()) };
            return Err(Error::LaunchFailed(msg.to_string_lossy().into_owned()));
        }
        Ok(())
    }
}

impl EmulatorDevice {
    #[cfg(moe_emu_profile)]
    fn keep_profile(&self, handle: *mut c_void, kernel: &str, config: LaunchConfig) {
        if let (false, Some(profiles)) = (handle.is_null(), &self.profiles) {
            // SAFETY: the handle was just produced by this launch and is consumed once.
            let profile = unsafe { super::profile::ffi::take(handle, kernel, config) };
            profiles.lock().unwrap_or_else(|e| e.into_inner()).push(profile);
        }
    }

    #[cfg(not(moe_emu_profile))]
    fn keep_profile(&self, _handle: *mut c_void, _kernel: &str, _config: LaunchConfig) {}
}

impl Default for EmulatorDevice {
    fn default() -> Self {
        Self::new()
    }
}

/// The argument list must match the kernel's parameters in number and size: this catches
/// a wrapper that drifted from its kernel on every emulator test.
fn check_signature(name: &str, entry: &EmuKernelEntry, sizes: &[u16]) -> Result<()> {
    let expected = &entry.param_sizes[..entry.param_count as usize];
    if expected != sizes {
        return Err(Error::KernelSignature {
            kernel: name.into(),
            detail: format!("the kernel takes parameters of sizes {expected:?} bytes, the launch passed {sizes:?}"),
        });
    }
    Ok(())
}

/// Whether the emulated kernels were built for memory profiling (`MOE_EMU_PROFILE=1`).
pub fn profiling_build() -> bool {
    // SAFETY: a constant query.
    unsafe { cuemu_profiling_build() != 0 }
}

/// Whether the emulated kernels were built with AddressSanitizer (`MOE_EMU_SANITIZE=address`).
pub fn address_sanitizer() -> bool {
    // SAFETY: a constant query.
    unsafe { cuemu_address_sanitizer() != 0 }
}
