//! The backward: `dA_e = dC_e · B_e` (`grouped_gemm_dgrad_*`) and `dB_e = dC_e^T · A_e`
//! (`grouped_gemm_wgrad_*`), with the ESFT expert mask, the Chain-of-Experts accumulate mode and
//! the sparse mode that writes only the experts that got rows.
use super::decode::{decode_launch, with_decode_plan};
use super::forward::check_grid_y;
use super::hopper;
use super::{
    ARows, DECODE_MAX_ROWS, EPI_STORE, EPI_SWIGLU_BWD, GemmPath, GemmShape, Groups, TILE_THREADS, check_a_rows,
    check_aligned_16, check_out_type, i64_of, row_tiles, tile_shared,
};
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::{DynMut, FloatElement, check_len, elements, grid_blocks};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// Bytes of the dgrad tile kernel's table of row scales (one per tile row, at most 128).
const SCALE_TABLE: u32 = 128 * 4;

/// What [`dgrad`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DgradEpilogue {
    /// `dA = dC_e · B_e`, `[rows, K]`.
    #[default]
    Store,
    /// The product is `dH` (GEMM2's dA, K = h); with the forward's `GU = [G | U]` (`[rows, 2h]`)
    /// the kernel writes `dGU = [dH ⊙ U ⊙ silu'(G) | dH ⊙ silu(G)]` (`[rows, 2h]`) instead: the
    /// gradient of GEMM1's output, so `dH` never goes to memory.
    SwiGluBackward,
}

/// Options of [`dgrad`]: the epilogue and the kernel (`From<DgradEpilogue>` picks
/// [`GemmPath::Auto`]: decode when `groups.max_group_rows <= DECODE_MAX_ROWS`).
///
/// [`GemmPath::Auto`]: super::GemmPath::Auto
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DgradConfig {
    pub epilogue: DgradEpilogue,
    /// `Tiled` or `Decode` force a kernel; both take the same operands (`Decode` any group size,
    /// slow for big groups). `Hopper` runs the sm_90a kernel (f16/bf16 on an sm_90 GPU or the
    /// emulator; otherwise an `Err` naming `device` or `dc`).
    pub path: GemmPath,
}

impl From<DgradEpilogue> for DgradConfig {
    fn from(epilogue: DgradEpilogue) -> Self {
        Self {
            epilogue,
            path: GemmPath::Auto,
        }
    }
}

/// The experts whose weight gradients are computed (ESFT, math §8): a device list of the
/// active expert ids, built once from host booleans, and its host-known count, so [`wgrad`]
/// launches blocks for active experts only. A list built on the device may hold ids outside
/// `[0, E)`: those entries are skipped (nothing read or written for them).
pub struct ExpertMask<B = DeviceBuffer<i32>> {
    pub active: B,
    pub active_count: usize,
    pub experts: usize,
}

impl ExpertMask<DeviceBuffer<i32>> {
    /// The mask `selected[e]` (one upload; no host sync).
    pub fn new(device: &Device, selected: &[bool]) -> Result<Self> {
        super::check_range("selected.len()", selected.len(), 1..=crate::ops::dispatch::MAX_EXPERTS)?;
        let active: Vec<i32> = (0..selected.len()).filter(|&e| selected[e]).map(|e| e as i32).collect();
        Ok(Self {
            active_count: active.len(),
            // A list of at least one entry, so an empty mask still has a buffer.
            active: device.upload(if active.is_empty() { &[-1] } else { &active })?,
            experts: selected.len(),
        })
    }
}

/// `dA_e = dC_e · B_e` for every row of every group (`dC: [rows, N]`, `B: [E, N, K]`), scaled
/// per row by `row_weights[sorted_rows[r]]` when given (the backward of the forward's row
/// weights, with respect to A), then through `epilogue`:
/// `out` is `[rows, K]` (`Store`) or `dGU: [rows, 2K]` (`SwiGluBackward`, which reads
/// `gu: [rows, 2K]`), of dC's dtype or f32. One launch (none when `groups.rows` is 0), no host
/// sync. `config` is a [`DgradEpilogue`] or a [`DgradConfig`] (to force a kernel); groups of
/// at most [`DECODE_MAX_ROWS`] rows (host-known) take the decode kernel, which streams `B_e` once.
///
/// [`DECODE_MAX_ROWS`]: super::DECODE_MAX_ROWS
#[allow(clippy::too_many_arguments)]
pub fn dgrad<T: FloatElement, O: FloatElement, I: DeviceSlice<i32>>(
    device: &Device,
    dc: &impl DeviceSlice<T>,
    b: &impl DeviceSlice<T>,
    shape: GemmShape,
    groups: &Groups<'_, I>,
    config: impl Into<DgradConfig>,
    row_weights: Option<&impl DeviceSlice<f32>>,
    gu: Option<&impl DeviceSlice<T>>,
    out: &mut impl DeviceSliceMut<O>,
) -> Result<()> {
    let DgradConfig { epilogue, path } = config.into();
    shape.validate()?;
    shape.check_tile_sizes::<T>()?;
    groups.validate(&shape)?;
    check_len("dc", dc, elements("dc", groups.rows, shape.n)?, || "[rows, N]".into())?;
    check_len("b", b, shape.weight_len()?, || {
        format!("[E, N, K] = [{}, {}, {}]", shape.experts, shape.n, shape.k)
    })?;
    check_aligned_16(device, "dc", dc)?;
    check_aligned_16(device, "b", b)?;
    let out_f32 = check_out_type::<T, O>("out")?;
    let (mode, out_cols) = match epilogue {
        DgradEpilogue::Store => (EPI_STORE, shape.k),
        DgradEpilogue::SwiGluBackward => (EPI_SWIGLU_BWD, elements("out", 2, shape.k)?),
    };
    check_len("out", out, elements("out", groups.rows, out_cols)?, || {
        "[rows, K] (SwiGluBackward: [rows, 2K])".into()
    })?;
    match (epilogue, gu) {
        (DgradEpilogue::SwiGluBackward, Some(gu)) => {
            check_len("gu", gu, elements("gu", groups.rows, 2 * shape.k)?, || {
                "[rows, 2K]".into()
            })?
        }
        (DgradEpilogue::SwiGluBackward, None) => return Err(missing("gu", "the forward's GU for SwiGluBackward")),
        (DgradEpilogue::Store, Some(_)) => {
            return Err(Error::InvalidArgument {
                argument: "gu",
                value: "Some".into(),
                expected: "None unless the epilogue is SwiGluBackward".into(),
            });
        }
        (DgradEpilogue::Store, None) => {}
    }
    let slots = match row_weights {
        Some(w) => {
            groups.sorted_rows("row weights")?;
            w.len()
        }
        None => 0,
    };
    if groups.rows == 0 {
        return Ok(());
    }
    let path = match path {
        GemmPath::Auto if groups.max_group_rows.min(groups.rows) <= DECODE_MAX_ROWS => GemmPath::Decode,
        GemmPath::Auto => GemmPath::Tiled,
        GemmPath::Hopper => {
            hopper::check_operands(device, &shape, ("dc", dc), ("b", b), true)?;
            GemmPath::Hopper
        }
        chosen => chosen,
    };
    let (name, launch, plan) = if path == GemmPath::Decode {
        let (launch, plan) = decode_launch((shape.k, shape.n, size_of::<T>(), 1), shape.experts, groups)?;
        (format!("grouped_gemm_decode_dgrad_{}", T::NAME), launch, Some(plan))
    } else if path == GemmPath::Hopper {
        let launch = hopper::launch_config(device, &shape, groups.rows, hopper::Sm90Op::Dgrad)?;
        (format!("grouped_gemm_dgrad_sm90_{}", T::NAME), launch, None)
    } else {
        let tile_cols = if T::NAME == "f32" { 64 } else { 128 };
        let launch = LaunchConfig {
            grid: (
                row_tiles::<T>(groups.rows, shape.experts)?,
                grid_blocks("shape.k", shape.k, tile_cols)?,
                1,
            ),
            block: (TILE_THREADS, 1, 1),
            shared_bytes: tile_shared::<T>(true, false) + SCALE_TABLE,
        };
        check_grid_y(launch.grid.1)?;
        (format!("grouped_gemm_dgrad_{}", T::NAME), launch, None)
    };
    // SAFETY of the argument list: DGRAD_PARAMS in grouped_gemm.cu, in order (the sm90 kernel
    // takes b's tensor map first).
    let weight_map = hopper::WeightMap::new(&shape, hopper::Sm90Op::Dgrad);
    let args = KernelArgs::new(device);
    let args = if path == GemmPath::Hopper {
        args.tensor_map("b", b, &weight_map.spec())
    } else {
        args
    };
    let args = args
        .input("dc", dc)
        .input("b", b)
        .input("groups.offsets", groups.offsets)
        .scalar(shape.experts as i32)
        .scalar(i64_of(groups.rows))
        .scalar(i64_of(shape.n))
        .scalar(i64_of(shape.k))
        .output("out", out)
        .scalar(out_f32)
        .scalar(mode)
        .input_or_null("groups.sorted_rows", groups.sorted_rows)
        .input_or_null("row_weights", row_weights)
        .scalar(i64_of(slots))
        .input_or_null("gu", gu);
    device.launch(&name, launch, with_decode_plan(args, plan))
}

/// How [`wgrad`] writes each expert's `dB_e` (a masked expert's is never touched).
pub enum WgradWrite<'a> {
    /// `dB_e` = the result; an expert without rows gets zeros.
    Replace,
    /// `dB_e` += the result (Chain-of-Experts); an expert without rows keeps its values.
    Accumulate,
    /// **The gradient of an expert without rows is neither computed nor written**: at decode,
    /// where a few experts get rows, the op reads and writes only theirs. An expert with rows is
    /// replaced the first time the pass writes it and added to after (so a Chain-of-Experts
    /// pass accumulates exactly), as recorded on the device in `written`: `[E]` u32, zeroed by
    /// the caller before the pass's first call (one memset), after which `written[e] != 0`
    /// exactly when `dB_e` holds this pass's gradient. `call` numbers the pass's wgrad launches
    /// from 0 in order; two launches may share an index (the two weight matrices of one layer
    /// iteration) when they have the same groups. The rest of `db` holds whatever it held:
    /// [`zero_unwritten`] makes it the dense gradient, at the cost of writing it.
    Sparse {
        written: &'a mut dyn DeviceSliceMut<u32>,
        call: u32,
    },
}

impl WgradWrite<'_> {
    /// [`Accumulate`](Self::Accumulate) when `accumulate`, else [`Replace`](Self::Replace).
    pub fn dense(accumulate: bool) -> Self {
        if accumulate { Self::Accumulate } else { Self::Replace }
    }
}

/// The largest `call` index of [`WgradWrite::Sparse`] (the flag keeps `call + 1` in 31 bits).
pub const MAX_WGRAD_CALL: u32 = (1 << 30) - 1;

/// `dB_e = dC_e^T · A_e` (`[N, K]` f32 per expert) for the experts of `mask` (all when `None`),
/// summed over the group's rows in order, written into `db: [E, N, K]` f32 as `write` says
/// (replaced, accumulated, or only for the experts with rows). `a` as in [`forward`]
/// (gathered from token order or contiguous). One launch (none for an empty mask), no host sync.
///
/// [`forward`]: super::forward
#[allow(clippy::too_many_arguments)]
pub fn wgrad<T: FloatElement, I: DeviceSlice<i32>, M: DeviceSlice<i32>>(
    device: &Device,
    dc: &impl DeviceSlice<T>,
    a: &impl DeviceSlice<T>,
    a_mode: ARows,
    shape: GemmShape,
    groups: &Groups<'_, I>,
    mask: Option<&ExpertMask<M>>,
    write: WgradWrite<'_>,
    db: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    wgrad_on_path(device, dc, a, a_mode, shape, groups, mask, write, db, GemmPath::Auto)
}

/// [`wgrad`] on a chosen kernel: `Auto` and `Tiled` run the row tiles (mma.sync for f16/bf16,
/// FMA for f32), `Hopper` the sm_90a kernel (the same result bitwise run to run, summed in
/// another order than the tiles; an `Err` naming `device`, `dc`, `a`, `shape.n` or `shape.k`
/// where it cannot run), and `Decode`, which has no wgrad kernel, an `Err` naming `path`.
#[allow(clippy::too_many_arguments)]
pub fn wgrad_on_path<T: FloatElement, I: DeviceSlice<i32>, M: DeviceSlice<i32>>(
    device: &Device,
    dc: &impl DeviceSlice<T>,
    a: &impl DeviceSlice<T>,
    a_mode: ARows,
    shape: GemmShape,
    groups: &Groups<'_, I>,
    mask: Option<&ExpertMask<M>>,
    write: WgradWrite<'_>,
    db: &mut impl DeviceSliceMut<f32>,
    path: GemmPath,
) -> Result<()> {
    if path == GemmPath::Decode {
        return Err(Error::InvalidArgument {
            argument: "path",
            value: format!("{path:?}"),
            expected: "GemmPath::Auto, Tiled or Hopper for wgrad".into(),
        });
    }
    shape.validate()?;
    let (mode, mut written, call) = match write {
        WgradWrite::Replace => (0, None, 0),
        WgradWrite::Accumulate => (1, None, 0),
        WgradWrite::Sparse { written, call } => (2, Some(DynMut(written)), call),
    };
    if let Some(flags) = &written {
        check_len("written", flags, shape.experts, || "[E] u32".into())?;
        crate::ops::check_range("call", call as usize, 0..=MAX_WGRAD_CALL as usize)?;
    }
    shape.check_tile_sizes::<T>()?;
    groups.validate(&shape)?;
    check_len("dc", dc, elements("dc", groups.rows, shape.n)?, || "[rows, N]".into())?;
    let (a_rows, _) = check_a_rows(a, a_mode, &shape, groups)?;
    check_aligned_16(device, "dc", dc)?;
    check_aligned_16(device, "a", a)?;
    check_len("db", db, shape.weight_len()?, || "[E, N, K] f32".into())?;
    let blocks_y = match mask {
        Some(mask) => {
            if mask.experts != shape.experts {
                return Err(Error::InvalidArgument {
                    argument: "mask",
                    value: format!("a mask of {} experts", mask.experts),
                    expected: format!("{} experts", shape.experts),
                });
            }
            check_len("mask.active", &mask.active, mask.active_count.max(1), || {
                "[active_count]".into()
            })?;
            mask.active_count
        }
        None => shape.experts,
    };
    if blocks_y == 0 {
        return Ok(());
    }
    let hopper = path == GemmPath::Hopper;
    let launch = if hopper {
        hopper::check_operands(device, &shape, ("dc", dc), ("a", a), false)?;
        hopper::wgrad_launch_config(device, &shape, blocks_y)?
    } else {
        let (tile_m, tile_n) = if T::NAME == "f32" { (64, 64) } else { (128, 128) };
        let tiles = elements("shape", shape.n.div_ceil(tile_m), shape.k.div_ceil(tile_n))?;
        LaunchConfig {
            grid: (grid_blocks("shape", tiles, 1)?, blocks_y as u32, 1),
            block: (TILE_THREADS, 1, 1),
            shared_bytes: tile_shared::<T>(false, false),
        }
    };
    let top_k = match a_mode {
        ARows::Contiguous => 0,
        ARows::Gathered { top_k } => top_k as i32,
    };
    // SAFETY of the argument list: WGRAD_PARAMS in grouped_gemm.cu, in order (the sm90 kernel
    // adds the count of active experts).
    let args = KernelArgs::new(device)
        .input("dc", dc)
        .input("a", a)
        .scalar(i64_of(a_rows))
        .input_or_null("groups.sorted_rows", groups.sorted_rows)
        .scalar(top_k)
        .input("groups.offsets", groups.offsets)
        .input_or_null("mask.active", mask.map(|m| &m.active))
        .scalar(shape.experts as i32)
        .scalar(i64_of(groups.rows))
        .scalar(i64_of(shape.n))
        .scalar(i64_of(shape.k))
        .output("db", db)
        .scalar(mode)
        .output_or_null("written", written.as_mut())
        .scalar(call);
    if hopper {
        // The sm90 kernel walks its tiles itself: the active count closes its parameters.
        let args = args.scalar(blocks_y as i32);
        return device.launch(&format!("grouped_gemm_wgrad_sm90_{}", T::NAME), launch, args);
    }
    device.launch(&format!("grouped_gemm_wgrad_{}", T::NAME), launch, args)
}

/// After a pass of [`WgradWrite::Sparse`] calls: zeroes `dB_e` (`db: [E, per_expert]` f32) of
/// every expert whose `written[e]` is 0, so `db` becomes the dense gradient. One launch, no host
/// sync; it writes every unwritten expert's gradient, which is what sparse mode saves.
pub fn zero_unwritten(
    device: &Device,
    written: &impl DeviceSlice<u32>,
    db: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    let experts = written.len();
    if experts == 0 || db.len() == 0 {
        return Ok(());
    }
    if db.len() % experts != 0 {
        return Err(Error::Shape {
            argument: "db",
            expected: format!("[E, per_expert] with E = {experts} (written.len())"),
            got: format!("{} elements", db.len()),
        });
    }
    crate::ops::check_range("written", experts, 1..=65535)?;
    let per_expert = db.len() / experts;
    const THREADS: u32 = 256;
    let blocks_x = grid_blocks("db", per_expert.div_ceil(4 * THREADS as usize).min(1024), 1)?;
    let launch = LaunchConfig {
        grid: (blocks_x, experts as u32, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY of the argument list: grouped_gemm_zero_unwritten in grouped_gemm.cu, in order.
    let args = KernelArgs::new(device)
        .input("written", written)
        .output("db", db)
        .scalar(experts as i32)
        .scalar(i64_of(per_expert));
    device.launch("grouped_gemm_zero_unwritten", launch, args)
}

fn missing(argument: &'static str, what: &str) -> Error {
    Error::InvalidArgument {
        argument,
        value: "None".into(),
        expected: what.into(),
    }
}
