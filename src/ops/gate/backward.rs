//! Backward of router scoring (math §1): dX and every weight gradient from dz.
//!
//! Launches (none when their output is empty; no host sync):
//! 1. quadratic forms: `gate_coef_<form>` recomputes the forward tile's projections (tensor
//!    cores for f16/bf16, as the forward) and writes
//!    per-row gradient coefficients into the workspace (`[T, 2·E·r]`: the coefficient of each
//!    left row U/K/A, then of each right row V, or for attention and full the per-expert
//!    terms that 2. sums over experts into `[T, r]`);
//! 2. attention and full: `gate_sum_inplace` (fixed order over experts);
//! 3. `gate_dx`: dX = Σ coefficients · weight rows, one GEMM over up to three stacked segments;
//! 4. one `gate_dw` per weight gradient (coefficients^T X over tokens in order, split over
//!    token slices when the gradient has too few tiles to fill the GPU, the slices then added
//!    by a `gate_sum` in slice order) and one `gate_sum` per bias gradient (Σ_t dz).
//!
//! dX and dW run on tensor cores (tf32 `mma.sync`), with every f32 operand split into two tf32
//! terms, so they keep f32 accuracy (kernels/include/gate_tf32.cuh).
//!
//! Every reduction runs in a fixed order, and the token split depends only on the shape: the
//! gradients are bitwise reproducible.
use super::{
    Dyn, DynMut, GateForm, GateShape, GateWeights, K_TILE, SPLIT_TF32_COLS, SPLIT_TF32_ROWS, SPLIT_TF32_SHARED,
    THREADS, dims_args, params, scoring_config,
};
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::{FloatElement, check_len, elements, grid_blocks};
use crate::{Device, DeviceSlice, DeviceSliceMut, Error, Result};

/// Gradients of a gate's parameters, f32, each shaped like its weight (module docs). An
/// optional gradient must be present exactly when the weight is.
pub enum GateGrads<'a> {
    Linear {
        w: &'a mut dyn DeviceSliceMut<f32>,
        b: Option<&'a mut dyn DeviceSliceMut<f32>>,
    },
    LowRank {
        u: &'a mut dyn DeviceSliceMut<f32>,
        v: &'a mut dyn DeviceSliceMut<f32>,
        b: Option<&'a mut dyn DeviceSliceMut<f32>>,
        c: Option<&'a mut dyn DeviceSliceMut<f32>>,
    },
    Symmetric {
        u: &'a mut dyn DeviceSliceMut<f32>,
        b: Option<&'a mut dyn DeviceSliceMut<f32>>,
        c: Option<&'a mut dyn DeviceSliceMut<f32>>,
    },
    Attention {
        wq: &'a mut dyn DeviceSliceMut<f32>,
        k: &'a mut dyn DeviceSliceMut<f32>,
    },
    Full {
        a: &'a mut dyn DeviceSliceMut<f32>,
        b: Option<&'a mut dyn DeviceSliceMut<f32>>,
        c: Option<&'a mut dyn DeviceSliceMut<f32>>,
    },
}

/// The gradient outputs by the part their weight plays in the scoring tile.
struct GradOutputs<'a> {
    left: Option<DynMut<'a, f32>>,
    right: Option<DynMut<'a, f32>>,
    query: Option<DynMut<'a, f32>>,
    linear: Option<DynMut<'a, f32>>,
    bias: Option<DynMut<'a, f32>>,
}

impl<'a> GateGrads<'a> {
    fn form(&self) -> GateForm {
        match self {
            GateGrads::Linear { .. } => GateForm::Linear,
            GateGrads::LowRank { .. } => GateForm::LowRank,
            GateGrads::Symmetric { .. } => GateForm::Symmetric,
            GateGrads::Attention { .. } => GateForm::Attention,
            GateGrads::Full { .. } => GateForm::Full,
        }
    }

    /// Each gradient's length in `params` order (None: absent).
    fn present_lens(&self) -> Vec<Option<usize>> {
        fn len(b: &&mut dyn DeviceSliceMut<f32>) -> usize {
            b.len()
        }
        match self {
            GateGrads::Linear { w, b } => vec![Some(w.len()), b.as_ref().map(len)],
            GateGrads::LowRank { u, v, b, c } => {
                vec![Some(u.len()), Some(v.len()), b.as_ref().map(len), c.as_ref().map(len)]
            }
            GateGrads::Symmetric { u, b, c } => vec![Some(u.len()), b.as_ref().map(len), c.as_ref().map(len)],
            GateGrads::Attention { wq, k } => vec![Some(wq.len()), Some(k.len())],
            GateGrads::Full { a, b, c } => vec![Some(a.len()), b.as_ref().map(len), c.as_ref().map(len)],
        }
    }

    fn outputs(self) -> GradOutputs<'a> {
        let none = || GradOutputs {
            left: None,
            right: None,
            query: None,
            linear: None,
            bias: None,
        };
        match self {
            GateGrads::Linear { w, b } => GradOutputs {
                linear: Some(DynMut(w)),
                bias: b.map(DynMut),
                ..none()
            },
            GateGrads::LowRank { u, v, b, c } => GradOutputs {
                left: Some(DynMut(u)),
                right: Some(DynMut(v)),
                linear: b.map(DynMut),
                bias: c.map(DynMut),
                ..none()
            },
            GateGrads::Symmetric { u, b, c } => GradOutputs {
                left: Some(DynMut(u)),
                linear: b.map(DynMut),
                bias: c.map(DynMut),
                ..none()
            },
            GateGrads::Attention { wq, k } => GradOutputs {
                left: Some(DynMut(k)),
                query: Some(DynMut(wq)),
                ..none()
            },
            GateGrads::Full { a, b, c } => GradOutputs {
                left: Some(DynMut(a)),
                linear: b.map(DynMut),
                bias: c.map(DynMut),
                ..none()
            },
        }
    }

    /// The same form as the weights, the same optional parameters, the same lengths.
    fn validate<T: FloatElement>(&self, shape: &GateShape, weights: &GateWeights<'_, T>) -> Result<()> {
        let form = weights.form();
        if self.form() != form {
            return Err(Error::InvalidArgument {
                argument: "grads",
                value: format!("{:?}", self.form()),
                expected: format!("the weights' form, {form:?}"),
            });
        }
        let all = params(form, shape);
        for ((p, want), got) in all.iter().zip(weights.present_lens()).zip(self.present_lens()) {
            let argument = grad_argument(p.name);
            match (want, got) {
                (Some(want), Some(got)) if want != got => {
                    return Err(Error::Shape {
                        argument,
                        expected: format!("{} ({want} elements of f32)", p.layout()),
                        got: format!("{got} elements"),
                    });
                }
                (Some(_), None) | (None, Some(_)) => {
                    return Err(Error::InvalidArgument {
                        argument,
                        value: if got.is_some() { "Some" } else { "None" }.into(),
                        expected: "present exactly when the weight is".into(),
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn grad_argument(name: &str) -> &'static str {
    match name {
        "w" => "grads.w",
        "b" => "grads.b",
        "u" => "grads.u",
        "v" => "grads.v",
        "c" => "grads.c",
        "wq" => "grads.wq",
        "k" => "grads.k",
        _ => "grads.a",
    }
}

/// f32 elements of the workspace `scores_backward` needs: the coefficients (none for the linear
/// gate, else `T · (2·E·r + r)`, r = d for the full form), then the largest set of split-K
/// partial sums among the weight gradients (`slices · rows · d`, 0 where a gradient is not split).
pub fn backward_workspace_len(form: GateForm, shape: &GateShape) -> Result<usize> {
    let (coefficients, partials) = (coefficients_len(form, shape)?, partials_len(form, shape)?);
    coefficients
        .checked_add(partials)
        .ok_or_else(|| Error::InvalidArgument {
            argument: "shape",
            value: format!("{coefficients} + {partials} workspace elements"),
            expected: "a workspace whose element count fits in usize".into(),
        })
}

/// The coefficient part of the workspace (module docs, step 1).
fn coefficients_len(form: GateForm, shape: &GateShape) -> Result<usize> {
    if form == GateForm::Linear {
        return Ok(0);
    }
    let r = shape.effective_rank(form);
    let scores = elements("shape.experts", 2, shape.experts)?.checked_add(1);
    let row = elements("shape.rank", scores.unwrap_or(usize::MAX), r)?;
    elements("shape.tokens", shape.tokens, row)
}

/// The rows of each weight gradient a form may have (left and right `E·r`, query `r`, linear
/// `E`), their partial sums' largest size.
fn partials_len(form: GateForm, shape: &GateShape) -> Result<usize> {
    let r = shape.effective_rank(form);
    let mut most = 0;
    for rows in [elements("shape.rank", shape.experts, r)?, r, shape.experts] {
        let split = DwSplit::new(rows, shape.dim, shape.tokens);
        if split.slices > 1 {
            most = most.max(elements(
                "shape.dim",
                elements("shape", split.slices, rows)?,
                shape.dim,
            )?);
        }
    }
    Ok(most)
}

/// Blocks a split dW aims at: about two per SM on the largest current GPUs. A constant rather
/// than the device's SM count, so that the split, and with it every bit of dW, is the same on
/// every device.
const DW_TARGET_BLOCKS: usize = 256;
/// The fewest tokens a slice sums: shorter slices would cost more in partial sums than they save.
const DW_MIN_SLICE_TOKENS: usize = 256;

/// How `gate_dw` splits the sum over tokens of a `[rows, d]` gradient: `slices` slices of
/// `slice_tokens` tokens each (a multiple of the k-tile; the last may be shorter).
struct DwSplit {
    slices: usize,
    slice_tokens: usize,
}

impl DwSplit {
    fn new(rows: usize, d: usize, tokens: usize) -> Self {
        let tiles = rows
            .div_ceil(SPLIT_TF32_ROWS)
            .saturating_mul(d.div_ceil(SPLIT_TF32_COLS))
            .max(1);
        let wanted = DW_TARGET_BLOCKS
            .div_ceil(tiles)
            .min(tokens.div_ceil(DW_MIN_SLICE_TOKENS))
            .max(1);
        // A token count too large to round up (shapes are validated later) takes one slice.
        let slice_tokens = tokens
            .div_ceil(wanted)
            .checked_next_multiple_of(K_TILE)
            .unwrap_or(tokens);
        DwSplit {
            slices: if slice_tokens == 0 {
                1
            } else {
                tokens.div_ceil(slice_tokens)
            },
            slice_tokens,
        }
    }
}

/// Backward of [`scores`](super::scores): from `dz` (`[T, E]`, f32) writes `dx` (`[T, d]`, X's
/// dtype) and every gradient in `grads` (overwritten, not accumulated). `workspace`: f32,
/// [`backward_workspace_len`] elements. No host sync.
#[allow(clippy::too_many_arguments)]
pub fn scores_backward<T: FloatElement>(
    device: &Device,
    shape: &GateShape,
    weights: &GateWeights<'_, T>,
    x: &impl DeviceSlice<T>,
    dz: &impl DeviceSlice<f32>,
    dx: &mut impl DeviceSliceMut<T>,
    grads: GateGrads<'_>,
    workspace: &mut impl DeviceSliceMut<f32>,
) -> Result<()> {
    weights.validate(shape)?;
    grads.validate(shape, weights)?;
    let form = weights.form();
    let (t, d, e) = (shape.tokens, shape.dim, shape.experts);
    check_len("x", x, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    check_len("dz", dz, shape.z_len()?, || format!("[T, E] = [{t}, {e}]"))?;
    check_len("dx", dx, shape.x_len()?, || format!("[T, d] = [{t}, {d}]"))?;
    let ws_len = backward_workspace_len(form, shape)?;
    check_len("workspace", workspace, ws_len, || {
        "backward_workspace_len(form, shape)".into()
    })?;

    let rank = shape.effective_rank(form);
    let ld = 2 * e * rank;
    let sums_at = t * ld; // [T, r]: per-token sums over experts (attention, full)
    let o = weights.operands();
    if t > 0 && form != GateForm::Linear {
        // SAFETY of the argument list: GATE_COEF_PARAMS in gate.cu (x, left, right, query, lin,
        // dz, ws, tokens, d, experts, rank); the workspace holds T · 2·E·r coefficients.
        let args = KernelArgs::new(device)
            .input("x", x)
            .input_or_null("weights", o.left.as_ref())
            .input_or_null("weights", o.right.as_ref())
            .input_or_null("weights", o.query.as_ref())
            .input_or_null("weights", o.linear.as_ref())
            .input("dz", dz)
            .output("workspace", workspace);
        let name = format!("gate_coef_{}_{}", form.kernel_name(), T::NAME);
        device.launch(&name, scoring_config::<T>(form, shape)?, dims_args(args, shape, form))?;
    }
    if t > 0 && matches!(form, GateForm::Attention | GateForm::Full) {
        // SAFETY: gate_sum_inplace_f32(buf, in_off, outer, inner, outer_stride, count, stride,
        // out_off): reads [t, E·r + e·r + j] for e < E, writes [T·2·E·r + t·r + j].
        let args = KernelArgs::new(device)
            .output("workspace", workspace)
            .scalar((e * rank) as i64)
            .scalar(t as i64)
            .scalar(rank as i32)
            .scalar(ld as i64)
            .scalar(e as i64)
            .scalar(rank as i64)
            .scalar(sums_at as i64);
        device.launch("gate_sum_inplace_f32", sum_config(t * rank)?, args)?;
    }

    // The coefficient matrices: in the workspace, except the linear rows' (dz itself).
    let left = Coefs::workspace(0, ld);
    let right = Coefs::workspace(e * rank, ld);
    let query = Coefs::workspace(sums_at, rank);
    let linear = Coefs {
        in_workspace: false,
        offset: 0,
        ld: e,
    };
    let dz = Dyn(dz as &dyn DeviceSlice<f32>);
    if t > 0 {
        let ws = Dyn(&*workspace as &dyn DeviceSlice<f32>);
        let mut segments = vec![];
        for (coefs, weight, rows) in [
            (&left, &o.left, e * rank),
            (&right, &o.right, e * rank),
            (&query, &o.query, rank),
            (&linear, &o.linear, e),
        ] {
            if let Some(w) = weight {
                segments.push((coefs.buffer(&ws, &dz), coefs, w, rows));
            }
        }
        let direct = (form == GateForm::Full).then(|| Coefs::workspace(sums_at, d));
        launch_dx(device, shape, &segments, direct.as_ref().map(|c| (&ws, c)), dx)?;
    }

    let g = grads.outputs();
    let x = Dyn(x as &dyn DeviceSlice<T>);
    let partials_at = coefficients_len(form, shape)?;
    for (coefs, rows, out) in [
        (&left, e * rank, g.left),
        (&right, e * rank, g.right),
        (&query, rank, g.query),
        (&linear, e, g.linear),
    ] {
        if let Some(mut out) = out {
            let dw = DwLaunch {
                coefs,
                rows,
                partials_at,
            };
            dw.launch(device, shape, &x, &dz, workspace, &mut out)?;
        }
    }
    if let Some(mut db) = g.bias {
        // SAFETY: gate_sum_f32(in, in_off, outer, inner, outer_stride, count, stride, out,
        // out_off): db[e] = Σ_t dz[t·E + e].
        let args = KernelArgs::new(device)
            .input("dz", &dz)
            .scalar(0i64)
            .scalar(1i64)
            .scalar(e as i32)
            .scalar(0i64)
            .scalar(t as i64)
            .scalar(e as i64)
            .output("grads", &mut db)
            .scalar(0i64);
        device.launch("gate_sum_f32", sum_config(e)?, args)?;
    }
    Ok(())
}

/// A matrix of f32 gradient coefficients: element (t, n) at `[offset + t·ld + n]` of the
/// workspace, or of dz.
struct Coefs {
    in_workspace: bool,
    offset: usize,
    ld: usize,
}

impl Coefs {
    fn workspace(offset: usize, ld: usize) -> Self {
        Coefs {
            in_workspace: true,
            offset,
            ld,
        }
    }

    fn buffer<'b>(&self, workspace: &'b Dyn<'b, f32>, dz: &'b Dyn<'b, f32>) -> &'b Dyn<'b, f32> {
        if self.in_workspace { workspace } else { dz }
    }
}

/// `gate_sum[_inplace]_f32`: 32 outputs per block, 8 partial sums each in shared memory.
fn sum_config(outputs: usize) -> Result<LaunchConfig> {
    const OUTPUTS_PER_BLOCK: usize = 32;
    let partials = THREADS as usize * size_of::<f32>();
    Ok(LaunchConfig::linear(
        grid_blocks("shape", outputs, OUTPUTS_PER_BLOCK)?,
        THREADS,
        partials as u32,
    ))
}

/// One dX segment: coefficient buffer, where its matrix sits in it, weight rows, row count.
type DxSegment<'s, T> = (&'s Dyn<'s, f32>, &'s Coefs, &'s Dyn<'s, T>, usize);

fn launch_dx<T: FloatElement>(
    device: &Device,
    shape: &GateShape,
    segments: &[DxSegment<'_, T>],
    direct: Option<(&Dyn<'_, f32>, &Coefs)>,
    dx: &mut impl DeviceSliceMut<T>,
) -> Result<()> {
    debug_assert!(segments.len() <= 3, "every form has at most three weight segments");
    let mut args = KernelArgs::new(device);
    for i in 0..3 {
        args = match segments.get(i) {
            Some((g, c, w, rows)) => args
                .input("workspace", *g)
                .scalar(c.offset as i64)
                .scalar(c.ld as i64)
                .input("weights", *w)
                .scalar(*rows as i32),
            None => args.scalar(0u64).scalar(0i64).scalar(0i64).scalar(0u64).scalar(0i32),
        };
    }
    args = match direct {
        Some((g, c)) => args.input("workspace", g).scalar(c.offset as i64).scalar(c.ld as i64),
        None => args.scalar(0u64).scalar(0i64).scalar(0i64),
    };
    // SAFETY: GATE_DX_PARAMS in gate.cu (three segments, direct, dx, tokens, d).
    let args = args
        .output("dx", dx)
        .scalar(shape.tokens as i64)
        .scalar(shape.dim as i32);
    let config = LaunchConfig {
        grid: (
            grid_blocks("shape.tokens", shape.tokens, SPLIT_TF32_ROWS)?,
            shape.dim.div_ceil(SPLIT_TF32_COLS) as u32,
            1,
        ),
        block: (THREADS, 1, 1),
        shared_bytes: SPLIT_TF32_SHARED as u32,
    };
    device.launch(&format!("gate_dx_{}", T::NAME), config, args)
}

/// One weight gradient's `gate_dw` (and, when split, the `gate_sum` of its slices).
struct DwLaunch<'c> {
    coefs: &'c Coefs,
    rows: usize,
    /// Where the split-K slices go in the workspace (after the coefficients).
    partials_at: usize,
}

impl DwLaunch<'_> {
    /// The arguments after g (GATE_DW_PARAMS in gate.cu: g, off, ldg, rows, x, tokens, d,
    /// split_tokens, out, out_off).
    fn dims<'a, T: FloatElement>(
        &self,
        args: KernelArgs<'a>,
        shape: &GateShape,
        x: &'a Dyn<'_, T>,
        split: &DwSplit,
    ) -> KernelArgs<'a> {
        args.scalar(self.coefs.offset as i64)
            .scalar(self.coefs.ld as i64)
            .scalar(self.rows as i32)
            .input("x", x)
            .scalar(shape.tokens as i64)
            .scalar(shape.dim as i32)
            .scalar(split.slice_tokens as i64)
    }

    fn launch<T: FloatElement>(
        &self,
        device: &Device,
        shape: &GateShape,
        x: &Dyn<'_, T>,
        dz: &Dyn<'_, f32>,
        workspace: &mut impl DeviceSliceMut<f32>,
        dw: &mut DynMut<'_, f32>,
    ) -> Result<()> {
        let (rows, d) = (self.rows, shape.dim);
        let split = DwSplit::new(rows, d, shape.tokens);
        let config = LaunchConfig {
            grid: (
                grid_blocks("grads", rows, SPLIT_TF32_ROWS)?,
                d.div_ceil(SPLIT_TF32_COLS) as u32,
                split.slices as u32,
            ),
            block: (THREADS, 1, 1),
            shared_bytes: SPLIT_TF32_SHARED as u32,
        };
        let name = format!("gate_dw_{}", T::NAME);
        if split.slices == 1 {
            let g = if self.coefs.in_workspace {
                Dyn(&*workspace as &dyn DeviceSlice<f32>)
            } else {
                Dyn(dz.0)
            };
            // SAFETY: GATE_DW_PARAMS; one slice writes dW (rows·d) directly.
            let args = self
                .dims(KernelArgs::new(device).input("workspace", &g), shape, x, &split)
                .output("grads", dw)
                .scalar(0i64);
            return device.launch(&name, config, args);
        }
        // SAFETY: GATE_DW_PARAMS; slice s writes [partials_at + s·rows·d, + rows·d) of the
        // workspace (backward_workspace_len counts slices·rows·d there). Coefficients in the
        // workspace are passed as g = null: the kernel reads them from out's buffer.
        let args = KernelArgs::new(device);
        let args = if self.coefs.in_workspace {
            args.scalar(0u64)
        } else {
            args.input("dz", dz)
        };
        let args = self
            .dims(args, shape, x, &split)
            .output("workspace", workspace)
            .scalar(self.partials_at as i64);
        device.launch(&name, config, args)?;
        // SAFETY: gate_sum_f32(in, in_off, outer, inner, outer_stride, count, stride, out,
        // out_off): dW[r·d + l] = Σ_s slices[s·rows·d + r·d + l], s ascending.
        let args = KernelArgs::new(device)
            .input("workspace", &*workspace)
            .scalar(self.partials_at as i64)
            .scalar(rows as i64)
            .scalar(d as i32)
            .scalar(d as i64)
            .scalar(split.slices as i64)
            .scalar((rows * d) as i64)
            .output("grads", dw)
            .scalar(0i64);
        device.launch("gate_sum_f32", sum_config(rows * d)?, args)
    }
}
