//! Tensor maps: the descriptors of Hopper's TMA copies (`tma_load` / `tma_store` in
//! `kernels/include/ptx.cuh`), passed to a kernel as a `const __grid_constant__ TensorMap`
//! parameter through [`KernelArgs::tensor_map`](super::KernelArgs::tensor_map).
//!
//! [`encode`] is the one place that checks a map and builds it, for both devices. It refuses
//! what `cuTensorMapEncodeTiled` refuses (a global address or a stride that is not a multiple
//! of 16 bytes, a box dimension past 256, an inner box row wider than the swizzle span, ...)
//! with an [`Error::InvalidArgument`] naming the kernel argument and the offending field, and
//! also a tensor that reaches past its buffer. Then, on CUDA, the driver encodes the map; on
//! the emulator it is the plain struct `cuemu::EmuTensorMap` (`kernels/emu/hopper_async.h`)
//! that the emulated TMA reads.
use super::{Device, DeviceKind};
use crate::{Error, Result};
use cudarc::driver::sys::CUtensorMapDataType;

/// The shared-memory layout a copy writes (or reads): `kernels/include/swizzle.cuh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swizzle {
    None = 0,
    B32 = 1,
    B64 = 2,
    B128 = 3,
}

impl Swizzle {
    /// Bytes in one swizzled row: the widest inner box row the mode takes (none: no limit).
    pub fn span_bytes(self) -> Option<u64> {
        match self {
            Swizzle::None => None,
            s => Some(16 << s as u32),
        }
    }
}

/// A tiled view of a tensor in global memory. Dimension 0 is the contiguous one.
#[derive(Debug, Clone, Copy)]
pub struct TensorMapSpec<'a> {
    /// Elements per dimension, dimension 0 first: 2 to 5 of them.
    pub dims: &'a [u64],
    /// Bytes between consecutive indices of dimensions 1, 2, ...: one fewer than `dims`.
    pub strides: &'a [u64],
    /// Elements per dimension of the box one copy moves, as many as `dims`.
    pub box_dims: &'a [u32],
    pub swizzle: Swizzle,
}

/// An encoded tensor map: the 128 bytes, 64-byte aligned, of a `CUtensorMap`.
#[repr(C, align(64))]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TensorMap(pub(crate) [u64; 16]);

impl std::fmt::Debug for TensorMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorMap({:016x?})", &self.0[..4])
    }
}

/// `cuemu::kTensorMapMagic`: marks a map the emulator may read.
const EMU_MAGIC: u64 = 0x5041_4d54;

/// The driver's data type of an element type (by [`Element::NAME`](super::Element::NAME))
/// and its size in bytes.
fn element_type(name: &str) -> Option<(CUtensorMapDataType, u64)> {
    use CUtensorMapDataType::*;
    Some(match name {
        "u8" => (CU_TENSOR_MAP_DATA_TYPE_UINT8, 1),
        "u16" => (CU_TENSOR_MAP_DATA_TYPE_UINT16, 2),
        "u32" => (CU_TENSOR_MAP_DATA_TYPE_UINT32, 4),
        "i32" => (CU_TENSOR_MAP_DATA_TYPE_INT32, 4),
        "u64" => (CU_TENSOR_MAP_DATA_TYPE_UINT64, 8),
        "i64" => (CU_TENSOR_MAP_DATA_TYPE_INT64, 8),
        "f16" => (CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2),
        "f32" => (CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4),
        "f64" => (CU_TENSOR_MAP_DATA_TYPE_FLOAT64, 8),
        "bf16" => (CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2),
        _ => return None,
    })
}

/// Checks `spec` for a tensor of `element` (an element type's name) at `address`, in a buffer
/// of `buffer_bytes`, and encodes it for `device`. `argument` names the kernel argument in
/// errors.
pub fn encode(
    device: &Device,
    argument: &'static str,
    element: &str,
    address: u64,
    buffer_bytes: u64,
    spec: &TensorMapSpec<'_>,
) -> Result<TensorMap> {
    let refuse = |value: String, expected: &str| Error::InvalidArgument {
        argument,
        value: format!("tensor map {value}"),
        expected: expected.to_string(),
    };
    let (data_type, esize) =
        element_type(element).ok_or_else(|| refuse(format!("element {element}"), "an element type TMA copies"))?;
    let rank = spec.dims.len();
    if !(2..=5).contains(&rank) {
        return Err(refuse(format!("of rank {rank}"), "2 to 5 dimensions"));
    }
    if spec.strides.len() != rank - 1 || spec.box_dims.len() != rank {
        return Err(refuse(
            format!(
                "with {} strides and {} box dims",
                spec.strides.len(),
                spec.box_dims.len()
            ),
            &format!("{} strides and {rank} box dims for {rank} dimensions", rank - 1),
        ));
    }
    if address % 16 != 0 {
        return Err(refuse(format!("global address {address:#x}"), "a multiple of 16 bytes"));
    }
    for (d, &n) in spec.dims.iter().enumerate() {
        if n == 0 || n > 1 << 32 {
            return Err(refuse(format!("dims[{d}] = {n}"), "1 to 2^32 elements"));
        }
    }
    for (d, &s) in spec.strides.iter().enumerate() {
        if s % 16 != 0 || s == 0 || s >= 1 << 40 {
            return Err(refuse(
                format!("strides[{d}] = {s}"),
                "a positive multiple of 16 bytes below 2^40",
            ));
        }
    }
    for (d, &b) in spec.box_dims.iter().enumerate() {
        if b == 0 || b > 256 {
            return Err(refuse(format!("box_dims[{d}] = {b}"), "1 to 256 elements"));
        }
    }
    let inner = u64::from(spec.box_dims[0]) * esize;
    if inner % 16 != 0 {
        return Err(refuse(
            format!("inner box row of {inner} bytes"),
            "a multiple of 16 bytes",
        ));
    }
    if let Some(span) = spec.swizzle.span_bytes().filter(|&span| inner > span) {
        return Err(refuse(
            format!("inner box row of {inner} bytes with swizzle {:?}", spec.swizzle),
            &format!("at most the swizzle span of {span} bytes"),
        ));
    }
    // The last byte the map can reach must lie in the buffer.
    let reach = spec
        .strides
        .iter()
        .zip(&spec.dims[1..])
        .fold((spec.dims[0]) * esize, |r, (&s, &n)| {
            r.saturating_add((n - 1).saturating_mul(s))
        });
    if reach > buffer_bytes {
        return Err(refuse(
            format!("spanning {reach} bytes"),
            &format!("a tensor inside its buffer of {buffer_bytes} bytes"),
        ));
    }
    match device.kind() {
        DeviceKind::Cuda => cuda_encode(data_type, address, spec),
        DeviceKind::Emulator => Ok(emulator_encode(esize, address, spec)),
    }
}

/// `cuemu::EmuTensorMap`, word by word.
fn emulator_encode(esize: u64, address: u64, spec: &TensorMapSpec<'_>) -> TensorMap {
    let mut w = [0u64; 16];
    w[0] = EMU_MAGIC | (spec.dims.len() as u64) << 32;
    w[1] = esize | (spec.swizzle as u64) << 32;
    w[2] = address;
    w[3..3 + spec.dims.len()].copy_from_slice(spec.dims);
    w[8] = esize;
    w[9..9 + spec.strides.len()].copy_from_slice(spec.strides);
    for (d, &b) in spec.box_dims.iter().enumerate() {
        w[13 + d / 2] |= u64::from(b) << (32 * (d % 2));
    }
    TensorMap(w)
}

fn cuda_encode(data_type: CUtensorMapDataType, address: u64, spec: &TensorMapSpec<'_>) -> Result<TensorMap> {
    use cudarc::driver::sys;
    use sys::CUtensorMapSwizzle::*;
    let swizzle = match spec.swizzle {
        Swizzle::None => CU_TENSOR_MAP_SWIZZLE_NONE,
        Swizzle::B32 => CU_TENSOR_MAP_SWIZZLE_32B,
        Swizzle::B64 => CU_TENSOR_MAP_SWIZZLE_64B,
        Swizzle::B128 => CU_TENSOR_MAP_SWIZZLE_128B,
    };
    let element_strides = [1u32; 5];
    let mut map = TensorMap([0; 16]);
    // SAFETY: `map` is 128 bytes, 64-byte aligned, as CUtensorMap; the arrays hold `rank`
    // (strides: rank - 1) values, checked by `encode`; the driver only reads them.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            (&mut map as *mut TensorMap).cast(),
            data_type,
            spec.dims.len() as u32,
            address as *mut std::ffi::c_void,
            spec.dims.as_ptr(),
            spec.strides.as_ptr(),
            spec.box_dims.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()?;
    }
    Ok(map)
}
