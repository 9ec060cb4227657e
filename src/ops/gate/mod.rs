//! Router scoring (math §1): `z = score(X)` for the linear gate and the quadratic gates
//! (low-rank, symmetric, attention-like, full and monomial), forward and backward
//! (`kernels/gate.cu`).
//!
//! Layouts (row-major, `nn.Linear`-style: the `d` inputs of every projection row contiguous):
//!
//! | form | weights (dtype of X) | f32 operands | z_{t,e} |
//! |---|---|---|---|
//! | `Linear` | `w [E, d]` | `b [E]` | `W_e·x_t + b_e` |
//! | `LowRank` | `u, v [E, r, d]`, `b [E, d]` | `c [E]` | `Σ_j (U_ej·x)(V_ej·x) + B_e·x + c_e` |
//! | `Symmetric` | `u [E, r, d]`, `b [E, d]` | `c [E]` | `Σ_j (U_ej·x)² + B_e·x + c_e` |
//! | `Attention` | `wq [r, d]`, `k [E, r, d]` | | `Σ_j (Wq_j·x)(K_ej·x) / √r` |
//! | `Full` | `a [E, d, d]`, `b [E, d]` | `c [E]` | `x^T A_e x + B_e·x + c_e` |
//!
//! `b` and `c` are optional everywhere; the *monomial* quadratic gate is `Full` with `b: None`.
//! `U_ej` is row j of `U_e`, so `U_all` stacked as `[E·r, d]` is one projection matrix and
//! math §1's `U_i: [d, r]` is its transpose. X, z: `[T, d]` and `[T, E]`; z and dz are always f32,
//! accumulation is f32 for every dtype. Gradients of the weights are f32 (`[same shape]`);
//! dX has X's dtype.
//!
//! Cost: every forward is **one launch**, a tiled GEMM of an X tile (64 tokens) against the
//! stacked projection rows of a block of experts, whose epilogue forms the per-expert
//! products and writes only z (never the `[T, E·r]` projections). Every dtype runs on tensor
//! cores with f32 accumulation: f16/bf16 on `mma.sync` m16n8k16, f32 on tf32 `mma.sync` m16n8k8
//! with each f32 operand split into two tf32 terms (three products a pair, the dropped one below
//! 2^-22 of it), so its error is f32 accumulation noise. The linear tile is 128 experts × 1 row
//! (for f32, the tile of the backward's GEMMs), a quadratic tile 16 experts × (8 rows: the two
//! factors of a chunk of 4 ranks, interleaved so each lane multiplies its own pair) + 16 linear
//! rows (2 blocks per SM).
//! At r ≤ 4 the quadratic gate is the linear gate with a wider tile: X is read once per
//! expert tile (from L2 after the first), never a second pass per projection; a rank above 4
//! loops over chunks of 4 inside the same launch. The full form is the low-rank form with
//! `U = A_e` and `V = I` (rank d), so it loops over d/4 chunks: O(T·E·d²), for small d.
//!
//! **Decode.** At `T <= 64` every form but `Full` runs a second kernel (`GatePath`): the tiles
//! would give a handful of blocks all the weights to stream, so instead every warp streams a
//! slice of one expert's rows with 16-byte loads against every token, and each projection is
//! the sum of its slices in a fixed order (still one launch, bitwise deterministic).
//!
//! **The routing step** ([`scores_and_select`], and [`route`] into a complete map): the scores,
//! the router's top-k and the routing map's count in one launch, with the bits of the separate
//! calls: above `T = 64` for every form wherever one block of the forward tile holds every
//! expert ([`route_tile_max_experts`]: `E <= 256` for the linear gate in f16/bf16, 128 in f32,
//! 16 for the rank forms),
//! and for the linear gate on the decode kernel at `T <= 64` (any dtype, `E <= 512`, with a map: the last block of each 16
//! tokens selects them, and for [`route`] the last of those places the map too).
//!
//! **Non-finite input rows** (math §1): a row of X with an element that is NaN, ±∞ or at least
//! 2^64 in magnitude gets NaN for every logit, so the router routes it nowhere; the backward
//! treats a zero dz as absent (zero coefficients; NaN or ±∞ in X loads as 0 for dW), so such a
//! row adds exactly nothing to the weight gradients. Non-finite weights are outside the
//! contract: the logits they touch are ±∞ or NaN (NaN on the split-tf32 tiles, where an
//! infinite operand's low term is ∞ - ∞).
//!
//! **Alignment.** Every operand may be a view at any element, in every dtype and on every path:
//! rows are read with 16-byte loads only when every row start of that operand is 16-byte
//! aligned (`rows_aligned_16`), else element by element (the tensor-core tiles stage their
//! operands through shared memory, so they take unaligned inputs too); outputs are written
//! element by element.

mod backward;
mod route;

pub use backward::{GateGrads, backward_workspace_len, scores_backward};
pub use route::{
    DECODE_ROUTE_MAX_EXPERTS, ROUTE_MAX_EXPERTS, route, route_is_fused, route_tile_max_experts, route_with_losses,
    scores_and_select,
};

use super::{Dyn, DynMut, FloatElement, check_len, elements, grid_blocks};
use crate::device::{KernelArgs, LaunchConfig};
use crate::{Device, DeviceSlice, DeviceSliceMut, Element, Error, Result};

/// Threads per block of every gate kernel (`GATE_THREADS` in gate_tile.cuh).
const THREADS: u32 = 256;
/// Tokens per block of the scoring kernels (`GATE_BM`).
const TILE: usize = 64;
/// k-tile width (`GATE_BK`).
const K_TILE: usize = 16;
/// Ranks per chunk of a quadratic tile (`GATE_RC`).
const RANK_CHUNK: usize = 4;
/// Bytes of a shared row of the pair tiles' k-tile: 64 of data, 16 of padding (`MmaRow`).
const MMA_ROW_BYTES: usize = 80;
/// Slots of the tensor-core tile's cp.async ring (`MMA_STAGES`), each one k-tile of X and weights.
const MMA_STAGES: usize = 3;
/// Slots of the split-tf32 tile, each one k-tile of both operands (`STAGED_SLOTS`: the next
/// k-tile is stored into one slot while the other is read).
const STAGED_SLOTS: usize = 2;
/// Rows and columns of the split-tf32 tile's C block (`TF32_BM`, `TF32_BN` in gate_tf32.cuh):
/// the f32 linear forward (tokens x experts), dX (tokens x d) and dW (rows x d).
const SPLIT_TF32_ROWS: usize = 64;
const SPLIT_TF32_COLS: usize = 128;
/// Its shared memory: two slots of one k-tile of each operand, f32, rows padded by 8 words
/// (`TF32_SHARED_BYTES`).
const SPLIT_TF32_SHARED: usize = STAGED_SLOTS * K_TILE * (SPLIT_TF32_ROWS + 8 + SPLIT_TF32_COLS + 8) * size_of::<f32>();
const _: () = assert!(
    SPLIT_TF32_ROWS == TILE,
    "the f32 linear forward's blocks hold the scoring tiles' tokens"
);

/// The scoring function's form (what [`GateWeights`] holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateForm {
    Linear,
    LowRank,
    Symmetric,
    Attention,
    Full,
}

impl GateForm {
    /// Every form, in declaration order.
    pub const ALL: [GateForm; 5] = [
        GateForm::Linear,
        GateForm::LowRank,
        GateForm::Symmetric,
        GateForm::Attention,
        GateForm::Full,
    ];

    fn kernel_name(self) -> &'static str {
        match self {
            GateForm::Linear => "linear",
            GateForm::LowRank => "lowrank",
            GateForm::Symmetric => "symmetric",
            GateForm::Attention => "attention",
            GateForm::Full => "full",
        }
    }
}

/// The tile of a scoring-kernel launch (forward or coefficient pass) for X of type `T`: experts
/// per block and bytes of dynamic shared memory. Every form runs on the tensor-core pair tiles
/// (`MmaForm` in gate_mma.cuh: 128 experts a block for the linear form, 16 for the rank forms; a
/// k-tile row is 80 bytes in every dtype), except the f32 linear forward, which runs on the
/// split-tf32 tile (gate_tf32.cuh, 128 experts).
fn scoring_tile<T: FloatElement>(form: GateForm) -> (usize, usize) {
    if form == GateForm::Linear && size_of::<T>() == size_of::<f32>() {
        return (SPLIT_TF32_COLS, SPLIT_TF32_SHARED);
    }
    pair_tile(form, if form == GateForm::Linear { 128 } else { 16 })
}

/// A pair tile (`MmaForm`) of `experts` experts: `(experts, shared bytes)`.
fn pair_tile(form: GateForm, experts: usize) -> (usize, usize) {
    // Per expert its linear row and the L rows of a chunk; the R rows (`MmaForm`).
    let (left, right) = match form {
        GateForm::Linear => (0, 0),
        GateForm::LowRank => (experts * RANK_CHUNK, experts * RANK_CHUNK),
        GateForm::Symmetric => (experts * RANK_CHUNK, 0),
        GateForm::Attention | GateForm::Full => (experts * RANK_CHUNK, RANK_CHUNK),
    };
    (experts, MMA_STAGES * (TILE + left + right + experts) * MMA_ROW_BYTES)
}

/// The sizes of one scoring call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateShape {
    /// T: rows of X.
    pub tokens: usize,
    /// d: the model dimension.
    pub dim: usize,
    /// E: experts (columns of z).
    pub experts: usize,
    /// r: rank of the low-rank, symmetric and attention forms (ignored by the others).
    pub rank: usize,
}

impl Default for GateShape {
    fn default() -> Self {
        Self {
            tokens: 0,
            dim: 1,
            experts: 1,
            rank: 1,
        }
    }
}

impl GateShape {
    /// Checks the sizes every form needs: `dim` in `1..=4194240`, `experts` and `rank` in
    /// `1..=i32::MAX` (`rank` too for the forms that ignore it), and `[T, d]`, `[T, E]`
    /// element counts that fit in memory.
    pub fn validate(&self) -> Result<()> {
        let max = i32::MAX as usize;
        // d is split into 64-wide tiles along the grid's y axis by the backward kernels.
        super::check_range("shape.dim", self.dim, 1..=65535 * TILE)?;
        super::check_range("shape.experts", self.experts, 1..=max)?;
        super::check_range("shape.rank", self.rank, 1..=max)?;
        elements("shape.tokens", self.tokens, self.dim)?;
        elements("shape.tokens", self.tokens, self.experts)?;
        Ok(())
    }

    /// Elements of X (`[T, d]`) and of dX; `Err` when the count overflows `usize`.
    pub fn x_len(&self) -> Result<usize> {
        elements("shape.tokens", self.tokens, self.dim)
    }

    /// Elements of z (`[T, E]`) and of dz; `Err` when the count overflows `usize`.
    pub fn z_len(&self) -> Result<usize> {
        elements("shape.tokens", self.tokens, self.experts)
    }

    /// The rank the kernels run: `rank`, or d for the full form.
    fn effective_rank(&self, form: GateForm) -> usize {
        if form == GateForm::Full { self.dim } else { self.rank }
    }
}

/// The parameters of one gate, borrowed device buffers (layouts in the module docs). Any
/// buffer type works (`DeviceBuffer`, cudarc's `CudaSlice` / `CudaView`).
pub enum GateWeights<'a, T: FloatElement> {
    Linear {
        w: &'a dyn DeviceSlice<T>,
        b: Option<&'a dyn DeviceSlice<f32>>,
    },
    LowRank {
        u: &'a dyn DeviceSlice<T>,
        v: &'a dyn DeviceSlice<T>,
        b: Option<&'a dyn DeviceSlice<T>>,
        c: Option<&'a dyn DeviceSlice<f32>>,
    },
    Symmetric {
        u: &'a dyn DeviceSlice<T>,
        b: Option<&'a dyn DeviceSlice<T>>,
        c: Option<&'a dyn DeviceSlice<f32>>,
    },
    Attention {
        wq: &'a dyn DeviceSlice<T>,
        k: &'a dyn DeviceSlice<T>,
    },
    /// Also the monomial form (`b: None`). Meant for small d: O(T·E·d²) work.
    Full {
        a: &'a dyn DeviceSlice<T>,
        b: Option<&'a dyn DeviceSlice<T>>,
        c: Option<&'a dyn DeviceSlice<f32>>,
    },
}

/// One parameter tensor of a form: its name (`weights.<name>`, `grads.<name>`) and layout
/// (`dims[..ndim]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateParam {
    pub name: &'static str,
    pub dims: [usize; 3],
    pub ndim: usize,
}

impl GateParam {
    fn layout(&self) -> String {
        let dims: Vec<String> = self.dims[..self.ndim].iter().map(|d| d.to_string()).collect();
        format!("[{}]", dims.join(", "))
    }
}

/// The operands of the scoring kernel: which weight plays which part of the tile.
struct Operands<'a, T: Element> {
    left: Option<Dyn<'a, T>>,
    right: Option<Dyn<'a, T>>,
    query: Option<Dyn<'a, T>>,
    linear: Option<Dyn<'a, T>>,
    bias: Option<Dyn<'a, f32>>,
}

impl<'a, T: FloatElement> GateWeights<'a, T> {
    pub fn form(&self) -> GateForm {
        match self {
            GateWeights::Linear { .. } => GateForm::Linear,
            GateWeights::LowRank { .. } => GateForm::LowRank,
            GateWeights::Symmetric { .. } => GateForm::Symmetric,
            GateWeights::Attention { .. } => GateForm::Attention,
            GateWeights::Full { .. } => GateForm::Full,
        }
    }

    fn operands(&self) -> Operands<'a, T> {
        let none = Operands {
            left: None,
            right: None,
            query: None,
            linear: None,
            bias: None,
        };
        match *self {
            GateWeights::Linear { w, b } => Operands {
                linear: Some(Dyn(w)),
                bias: b.map(Dyn),
                ..none
            },
            GateWeights::LowRank { u, v, b, c } => Operands {
                left: Some(Dyn(u)),
                right: Some(Dyn(v)),
                linear: b.map(Dyn),
                bias: c.map(Dyn),
                ..none
            },
            GateWeights::Symmetric { u, b, c } => Operands {
                left: Some(Dyn(u)),
                linear: b.map(Dyn),
                bias: c.map(Dyn),
                ..none
            },
            GateWeights::Attention { wq, k } => Operands {
                left: Some(Dyn(k)),
                query: Some(Dyn(wq)),
                ..none
            },
            GateWeights::Full { a, b, c } => Operands {
                left: Some(Dyn(a)),
                linear: b.map(Dyn),
                bias: c.map(Dyn),
                ..none
            },
        }
    }

    /// Every parameter this gate holds, in declaration order, with its expected layout.
    pub fn params(&self, shape: &GateShape) -> Vec<GateParam> {
        let present = self.present_lens();
        params(self.form(), shape)
            .into_iter()
            .zip(present)
            .filter(|(_, len)| len.is_some())
            .map(|(p, _)| p)
            .collect()
    }

    /// The length of each parameter of the form, in `params` order (None: an absent option).
    fn present_lens(&self) -> Vec<Option<usize>> {
        fn len<T: Element>(b: &dyn DeviceSlice<T>) -> usize {
            b.len()
        }
        match self {
            GateWeights::Linear { w, b } => vec![Some(len(*w)), b.map(len)],
            GateWeights::LowRank { u, v, b, c } => vec![Some(len(*u)), Some(len(*v)), b.map(len), c.map(len)],
            GateWeights::Symmetric { u, b, c } => vec![Some(len(*u)), b.map(len), c.map(len)],
            GateWeights::Attention { wq, k } => vec![Some(len(*wq)), Some(len(*k))],
            GateWeights::Full { a, b, c } => vec![Some(len(*a)), b.map(len), c.map(len)],
        }
    }

    /// Checks the shape and every weight's length for this form.
    fn validate(&self, shape: &GateShape) -> Result<()> {
        shape.validate()?;
        let form = self.form();
        let rank = shape.effective_rank(form);
        // The stacked rows (E·r, E·d) are indexed with 32-bit ints by the kernels.
        if form != GateForm::Linear {
            let rows = elements("shape.rank", shape.experts, rank)?;
            super::check_range("shape.experts * rank", rows, 1..=i32::MAX as usize)?;
        }
        let (experts_per_block, _) = scoring_tile::<T>(form);
        if shape.experts.div_ceil(experts_per_block) > 65535 {
            return Err(Error::InvalidArgument {
                argument: "shape.experts",
                value: shape.experts.to_string(),
                expected: format!("at most {} experts for the {form:?} gate", 65535 * experts_per_block),
            });
        }
        for (p, got) in params(form, shape).into_iter().zip(self.present_lens()) {
            let expected = elements_of(&p)?;
            match got {
                Some(got) if got != expected => {
                    return Err(Error::Shape {
                        argument: weight_argument(p.name),
                        expected: format!("{} ({expected} elements)", p.layout()),
                        got: format!("{got} elements"),
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A parameter's element count, or an error when it overflows.
fn elements_of(p: &GateParam) -> Result<usize> {
    let rows = elements(weight_argument(p.name), p.dims[0], p.dims[1])?;
    elements(weight_argument(p.name), rows, p.dims[2])
}

/// Every parameter a form may hold, optional ones included: names and layouts.
fn params(form: GateForm, shape: &GateShape) -> Vec<GateParam> {
    let (e, d, r) = (shape.experts, shape.dim, shape.rank);
    let p = |name, dims: &[usize]| {
        let mut all = [1; 3];
        all[..dims.len()].copy_from_slice(dims);
        GateParam {
            name,
            dims: all,
            ndim: dims.len(),
        }
    };
    match form {
        GateForm::Linear => vec![p("w", &[e, d]), p("b", &[e])],
        GateForm::LowRank => vec![p("u", &[e, r, d]), p("v", &[e, r, d]), p("b", &[e, d]), p("c", &[e])],
        GateForm::Symmetric => vec![p("u", &[e, r, d]), p("b", &[e, d]), p("c", &[e])],
        GateForm::Attention => vec![p("wq", &[r, d]), p("k", &[e, r, d])],
        GateForm::Full => vec![p("a", &[e, d, d]), p("b", &[e, d]), p("c", &[e])],
    }
}

fn weight_argument(name: &str) -> &'static str {
    match name {
        "w" => "weights.w",
        "b" => "weights.b",
        "u" => "weights.u",
        "v" => "weights.v",
        "c" => "weights.c",
        "wq" => "weights.wq",
        "k" => "weights.k",
        _ => "weights.a",
    }
}

/// Which scoring kernel [`scores_on_path`] runs. `Auto` is right outside tests and benches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GatePath {
    /// The decode kernel at `T <= DECODE_MAX_TOKENS` for every form but `Full`, else the tiles.
    #[default]
    Auto,
    /// The tiled GEMM: 64 tokens by 16 to 128 experts per block (tensor cores for f16/bf16).
    Tiled,
    /// The decode kernel (`kernels/include/gate_decode.cuh`): every warp streams a slice of
    /// one expert's rows, the slices summed in a fixed order. Any T (meant for few tokens);
    /// the `Full` form (rank d) gets an `Err` naming `path`.
    Decode,
}

/// The most tokens for which `GatePath::Auto` runs the linear gate's decode kernel.
pub const DECODE_MAX_TOKENS: usize = 64;
/// Warps per block of the decode kernel (`DECODE_WARPS`).
const DECODE_WARPS: usize = 8;

/// Tokens per block of the decode kernel (`DecodeForm::TOKENS`): 16 for the linear form, 4 for
/// the rank forms (their lanes hold 9, 8 or 5 accumulators per token).
fn decode_tokens(form: GateForm) -> usize {
    if form == GateForm::Linear {
        DECODE_LINEAR_TOKENS
    } else {
        4
    }
}
/// Tokens per block of the linear decode kernel.
const DECODE_LINEAR_TOKENS: usize = 16;

/// `z = score(X)` (`[T, E]`, f32) for any form: one launch, no host sync.
pub fn scores<T: FloatElement>(
    device: &Device,
    shape: &GateShape,
    weights: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    scores_on_path(device, shape, weights, x, z, GatePath::Auto)
}

/// [`scores`] on a chosen kernel (tests and benches compare the paths).
pub fn scores_on_path<T: FloatElement>(
    device: &Device,
    shape: &GateShape,
    weights: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &mut impl DeviceSliceMut<f32>,
    path: GatePath,
) -> Result<()> {
    check_scores(shape, weights, x, z)?;
    let t = shape.tokens;
    let form = weights.form();
    let decode = match path {
        GatePath::Auto => form != GateForm::Full && t <= DECODE_MAX_TOKENS,
        GatePath::Tiled => false,
        GatePath::Decode if form != GateForm::Full => true,
        GatePath::Decode => {
            return Err(Error::InvalidArgument {
                argument: "path",
                value: format!("{path:?} for the {form:?} gate"),
                expected: "GatePath::Decode for every form but Full".into(),
            });
        }
    };
    if t == 0 {
        return Ok(());
    }
    let config = if decode {
        decode_config(shape, form)?
    } else {
        scoring_config::<T>(form, shape)?
    };
    let o = weights.operands();
    // GATE_SCORES_PARAMS, then the decode kernels' slices.
    let args = scores_args(device, shape, form, &o, x, z);
    if decode {
        let args = args.scalar(decode_slices(t) as i32);
        return device.launch(&format!("gate_decode_{}_{}", form.kernel_name(), T::NAME), config, args);
    }
    device.launch(&format!("gate_scores_{}_{}", form.kernel_name(), T::NAME), config, args)
}

/// The forward's checks: the weights for `shape`, `x` `[T, d]`, `z` `[T, E]`.
fn check_scores<T: FloatElement>(
    shape: &GateShape,
    weights: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    z: &impl DeviceSlice<f32>,
) -> Result<()> {
    weights.validate(shape)?;
    let (t, d, e) = (shape.tokens, shape.dim, shape.experts);
    check_len("x", x, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    check_len("z", z, shape.z_len()?, || format!("[T, E] = [{t}, {e}]"))
}

/// The arguments every forward kernel starts with, in the order and types of
/// GATE_SCORES_PARAMS in gate.cu: x, left, right, query, lin, bias, z, tokens, d, experts,
/// rank (lengths checked by `check_scores`).
fn scores_args<'k, T: FloatElement>(
    device: &'k Device,
    shape: &GateShape,
    form: GateForm,
    o: &'k Operands<'_, T>,
    x: &'k impl DeviceSlice<T>,
    z: &'k mut impl DeviceSliceMut<f32>,
) -> KernelArgs<'k> {
    let args = KernelArgs::new(device)
        .input("x", x)
        .input_or_null("weights", o.left.as_ref())
        .input_or_null("weights", o.right.as_ref())
        .input_or_null("weights", o.query.as_ref())
        .input_or_null("weights", o.linear.as_ref())
        .input_or_null("weights", o.bias.as_ref())
        .output("z", z);
    dims_args(args, shape, form)
}

/// The decode kernel's launch: grid (ceil(E slices / 8), ceil(T / tokens a block)), 256 threads,
/// no dynamic shared memory (gate_decode.cuh).
fn decode_config(shape: &GateShape, form: GateForm) -> Result<LaunchConfig> {
    let (t, e) = (shape.tokens, shape.experts);
    Ok(LaunchConfig {
        grid: (
            grid_blocks("shape.experts", e * decode_slices(t), DECODE_WARPS)?,
            decode_token_blocks(t, form)?,
            1,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    })
}

/// Warps per expert of the decode kernel: 8 at T <= 8 (all of an expert's row in flight at
/// once, one expert per block), halving as T doubles, to 1 above 32 (8 experts per block), so
/// that more experts share each chunk of X from L1 as X grows.
fn decode_slices(tokens: usize) -> usize {
    match tokens {
        0..=8 => 8,
        9..=16 => 4,
        17..=32 => 2,
        _ => 1,
    }
}

/// The decode kernel's grid.y: one block row per `decode_tokens(form)` tokens.
fn decode_token_blocks(tokens: usize, form: GateForm) -> Result<u32> {
    let per_block = decode_tokens(form);
    u32::try_from(tokens.div_ceil(per_block))
        .ok()
        .filter(|&b| b <= 65535)
        .ok_or_else(|| Error::InvalidArgument {
            argument: "shape.tokens",
            value: tokens.to_string(),
            expected: format!(
                "at most {} tokens for the {form:?} gate on GatePath::Decode",
                65535 * per_block
            ),
        })
}

/// The launch of a scoring (or coefficient) kernel: 64-token by BE-expert tiles.
fn scoring_config<T: FloatElement>(form: GateForm, shape: &GateShape) -> Result<LaunchConfig> {
    tile_config(shape, scoring_tile::<T>(form))
}

/// The launch of 64-token by `experts_per_block`-expert tiles with `shared` bytes.
fn tile_config(shape: &GateShape, (experts_per_block, shared): (usize, usize)) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid: (
            grid_blocks("shape.tokens", shape.tokens, TILE)?,
            shape.experts.div_ceil(experts_per_block) as u32,
            1,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: shared as u32,
    })
}

/// The trailing `tokens, d, experts, rank` of the scoring and coefficient kernels.
fn dims_args<'a>(args: KernelArgs<'a>, shape: &GateShape, form: GateForm) -> KernelArgs<'a> {
    args.scalar(shape.tokens as i64)
        .scalar(shape.dim as i32)
        .scalar(shape.experts as i32)
        .scalar(shape.effective_rank(form) as i32)
}
