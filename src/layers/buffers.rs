//! The buffers of a routed pass, sized once for `max_tokens`: what a forward keeps for its
//! backward ([`Saved`]) and the work buffers both directions reuse ([`Scratch`]).
use super::{Mode, MoeConfig, RouterKind};
use crate::ops::dispatch::STATUS_LEN;
use crate::ops::gate;
use crate::ops::gemm::GemmShape;
use crate::ops::router::{AuxLossWorkspace, ZLossWorkspace};
use crate::ops::{FloatElement, check_range};
use crate::{Device, DeviceBuffer, Result};

/// The sizes of one call, derived once.
#[derive(Clone, Copy)]
pub(super) struct Sizes {
    pub(super) tokens: usize,
    pub(super) experts: usize,
    pub(super) k: usize,
    pub(super) d: usize,
    pub(super) h: usize,
    pub(super) hs: usize,
    pub(super) slots: usize,
    /// Rows of the grouped matrices (`MapConfig::sorted_rows_len`).
    pub(super) rows: usize,
}

impl Sizes {
    pub(super) fn new(config: &MoeConfig, tokens: usize) -> Result<Self> {
        check_range("tokens", tokens, 1..=config.max_tokens)?;
        Ok(Self {
            tokens,
            experts: config.experts,
            k: config.k,
            d: config.dim,
            h: config.hidden,
            hs: config.shared_hidden(),
            slots: tokens * config.k,
            rows: config.map_config().sorted_rows_len(tokens, config.k)?,
        })
    }
    pub(super) fn token_rows(&self) -> usize {
        self.tokens * self.d
    }
    pub(super) fn gemm1(&self) -> GemmShape {
        GemmShape {
            experts: self.experts,
            n: 2 * self.h,
            k: self.d,
        }
    }
    pub(super) fn gemm2(&self) -> GemmShape {
        GemmShape {
            experts: self.experts,
            n: self.d,
            k: self.h,
        }
    }
    pub(super) fn shared1(&self) -> GemmShape {
        GemmShape {
            experts: 1,
            n: 2 * self.hs,
            k: self.d,
        }
    }
    pub(super) fn shared2(&self) -> GemmShape {
        GemmShape {
            experts: 1,
            n: self.d,
            k: self.hs,
        }
    }
}

/// What one forward keeps for its backward, sized for `max_tokens` (per token: z, ids,
/// weights, the map's rows, SwiGLU's GU and H, the expert outputs, the shared FFN's GU and H,
/// the z-loss LSE).
pub(crate) struct Saved<T: FloatElement> {
    /// T of the forward these hold (0: none yet).
    pub(crate) tokens: usize,
    pub(crate) z: DeviceBuffer<f32>,
    pub(crate) ids: DeviceBuffer<i32>,
    pub(crate) weights: DeviceBuffer<f32>,
    pub(crate) counts: DeviceBuffer<i32>,
    pub(super) offsets: DeviceBuffer<i32>,
    pub(super) sorted_rows: DeviceBuffer<i32>,
    pub(crate) inverse: DeviceBuffer<i32>,
    pub(crate) status: DeviceBuffer<i32>,
    pub(super) gu: DeviceBuffer<T>,
    pub(super) h: DeviceBuffer<T>,
    pub(super) yp: DeviceBuffer<T>,
    pub(super) shared_gu: DeviceBuffer<T>,
    pub(super) shared_h: DeviceBuffer<T>,
    pub(super) z_workspace: ZLossWorkspace,
    /// The aux loss's workspace (owned by `ops::router`, sized per T: rebuilt when T changes).
    pub(super) aux: Option<(usize, AuxLossWorkspace)>,
    pub(crate) aux_loss: DeviceBuffer<f32>,
    pub(crate) z_loss: DeviceBuffer<f32>,
}

impl<T: FloatElement> Saved<T> {
    /// In [`Mode::Inference`] the buffers only backward reads (SwiGLU's GU, the shared FFN's
    /// GU, the z-loss LSE) are empty.
    pub(crate) fn alloc(device: &Device, config: &MoeConfig, mode: Mode) -> Result<Self> {
        let s = Sizes::new(config, config.max_tokens)?;
        let zeros_t = |len: usize| device.alloc_zeros::<T>(len);
        let training = |len: usize| if mode == Mode::Training { len } else { 0 };
        Ok(Self {
            tokens: 0,
            z: device.alloc_zeros(s.tokens * s.experts)?,
            ids: device.alloc_zeros(s.slots)?,
            weights: if config.router == RouterKind::Codebook {
                device.upload(&vec![1.0f32; s.slots])?
            } else {
                device.alloc_zeros(s.slots)?
            },
            counts: device.alloc_zeros(s.experts)?,
            offsets: device.alloc_zeros(s.experts + 1)?,
            sorted_rows: device.alloc_zeros(s.rows)?,
            inverse: device.alloc_zeros(s.slots)?,
            status: device.alloc_zeros(STATUS_LEN)?,
            gu: zeros_t(training(s.rows * 2 * s.h))?,
            h: zeros_t(s.rows * s.h)?,
            yp: zeros_t(s.rows * s.d)?,
            shared_gu: zeros_t(training(s.tokens * 2 * s.hs))?,
            shared_h: zeros_t(s.tokens * s.hs)?,
            z_workspace: ZLossWorkspace::new(device, training(if config.z_loss > 0.0 { s.tokens } else { 0 }))?,
            aux: None,
            aux_loss: device.alloc_zeros(1)?,
            z_loss: device.alloc_zeros(1)?,
        })
    }

    /// Bytes of the buffers that grow with the token count, over `max_tokens`.
    pub(crate) fn bytes_per_token(&self, max_tokens: usize) -> usize {
        fn bytes<E: crate::Element>(b: &DeviceBuffer<E>) -> usize {
            b.len() * size_of::<E>()
        }
        let total = bytes(&self.z)
            + bytes(&self.ids)
            + bytes(&self.weights)
            + bytes(&self.sorted_rows)
            + bytes(&self.inverse)
            + bytes(&self.gu)
            + bytes(&self.h)
            + bytes(&self.yp)
            + bytes(&self.shared_gu)
            + bytes(&self.shared_h)
            + bytes(self.z_workspace.row_lse());
        total / max_tokens
    }
}

/// The documented size of [`Saved`] per token: `4E` (z) + `4k` (ids) + `4k` (weights) + `4k`
/// (inverse) + `4k` (sorted rows: T·k rows without capacity) + `k·(2h + h + d)·s` (GU, H and the
/// expert outputs of the token's k rows) + `3·n·h·s` (the shared FFN's GU and H) + `4` with the
/// z-loss (its LSE), for s = `size_of::<T>()`. With capacity the row buffers are sized for
/// `min(T·k, E·C)` rows instead of T·k.
/// `config` must be valid: [`MoeConfig::validate`] bounds every term, so nothing overflows.
pub(crate) fn saved_bytes_per_token(config: &MoeConfig, element_bytes: usize) -> usize {
    let (e, k, d, h, hs) = (
        config.experts,
        config.k,
        config.dim,
        config.hidden,
        config.shared_hidden(),
    );
    let z_loss = if config.z_loss > 0.0 { 4 } else { 0 };
    4 * e + 4 * 4 * k + k * (3 * h + d) * element_bytes + 3 * hs * element_bytes + z_loss
}

/// Buffers every pass reuses, forward and backward, sized for `max_tokens`.
pub(crate) struct Scratch<T: FloatElement> {
    pub(super) map_workspace: DeviceBuffer<i32>,
    /// `map_workspace` is all zeros (fresh, or left so by the last map), so the next pass clears
    /// nothing before its count (`CountedMap::zeroed`).
    pub(super) map_workspace_zeroed: bool,
    /// Non-finite router rows, summed over every call since construction.
    pub(crate) nonfinite_rows: DeviceBuffer<u32>,
    /// ‖c_j‖² of a codebook router (`[E]`; empty for the others).
    pub(super) code_norms: DeviceBuffer<f32>,
    /// Empty: the nearest-code search runs unsplit (one launch, no workspace).
    pub(super) nearest_workspace: DeviceBuffer<u32>,
    /// `[0, max_tokens]`: the shared FFN's one group (the GEMMs clamp it to the call's T rows).
    pub(super) shared_offsets: DeviceBuffer<i32>,
    /// `0..max_tokens`: the inverse of a one-to-one combine, which adds two `[T, d]` tensors.
    pub(crate) identity: DeviceBuffer<i32>,
    pub(super) shared_y: DeviceBuffer<T>,
    pub(super) sum_a: DeviceBuffer<T>,
    pub(super) sum_b: DeviceBuffer<T>,
    pub(super) dyp: DeviceBuffer<T>,
    pub(super) dw: DeviceBuffer<f32>,
    pub(super) dgu: DeviceBuffer<T>,
    pub(super) dxp: DeviceBuffer<T>,
    pub(super) dz: DeviceBuffer<f32>,
    pub(super) dx_gate: DeviceBuffer<T>,
    pub(super) gate_workspace: DeviceBuffer<f32>,
    pub(super) shared_dgu: DeviceBuffer<T>,
    pub(super) shared_dx: DeviceBuffer<T>,
    /// `[T]`: each token's row for the shared FFN's weight gradients, -1 for a token routed
    /// nowhere (`ops::dispatch::live_rows`).
    pub(super) shared_live_rows: DeviceBuffer<i32>,
}

impl<T: FloatElement> Scratch<T> {
    /// The map workspace may hold a count (a replay failed part-way): the next pass clears it.
    pub(crate) fn forget_zeroed(&mut self) {
        self.map_workspace_zeroed = false;
    }

    /// In [`Mode::Inference`] the backward buffers are empty.
    pub(crate) fn alloc(device: &Device, config: &MoeConfig, mode: Mode) -> Result<Self> {
        let s = Sizes::new(config, config.max_tokens)?;
        let training = |len: usize| if mode == Mode::Training { len } else { 0 };
        let map = config.map_config();
        let zeros_t = |len: usize| device.alloc_zeros::<T>(len);
        let shared_rows = if s.hs > 0 { s.token_rows() } else { 0 };
        let identity: Vec<i32> = (0..s.tokens as i32).collect();
        Ok(Self {
            map_workspace: device.alloc_zeros(
                map.workspace_len(s.tokens, s.k)?
                    .max(map.counted_workspace_len(s.tokens, s.k)?),
            )?,
            map_workspace_zeroed: true,
            nonfinite_rows: device.alloc_zeros(1)?,
            code_norms: device.alloc_zeros(if config.router == RouterKind::Codebook {
                s.experts
            } else {
                0
            })?,
            nearest_workspace: device.alloc_zeros(0)?,
            shared_offsets: device.upload(&[0, s.tokens as i32])?,
            identity: device.upload(&identity)?,
            shared_y: zeros_t(shared_rows)?,
            sum_a: zeros_t(s.token_rows())?,
            sum_b: zeros_t(training(s.token_rows()))?,
            dyp: zeros_t(training(s.rows * s.d))?,
            dw: device.alloc_zeros(training(s.slots))?,
            dgu: zeros_t(training(s.rows * 2 * s.h))?,
            dxp: zeros_t(training(s.rows * s.d))?,
            dz: device.alloc_zeros(training(s.tokens * s.experts))?,
            dx_gate: zeros_t(training(s.token_rows()))?,
            gate_workspace: device.alloc_zeros(training(gate::backward_workspace_len(
                config.gate_form(),
                &config.gate_shape(s.tokens),
            )?))?,
            shared_dgu: zeros_t(training(s.tokens * 2 * s.hs))?,
            shared_dx: zeros_t(training(shared_rows))?,
            shared_live_rows: device.alloc_zeros(training(if s.hs > 0 { s.tokens } else { 0 }))?,
        })
    }
}
