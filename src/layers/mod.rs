//! Layers: the op families composed into what users call (math §2–§8).
//!
//! - [`MoeLayer`]: route → dispatch → GEMM1 + SwiGLU (gathered rows) → GEMM2 → combine, and
//!   its backward, with optional shared experts, capacity and router losses;
//! - [`ChainOfExperts`]: C routed passes over shared expert weights with an inner residual;
//! - [`VqMoe`]: a routed path and a codebook path mixed by a 2-way softmax gate, with VQ losses;
//! - [`esft`]: expert-specialized fine-tuning statistics, selection and masked training steps.
//!
//! **Launch budget** of one routed forward (linear or quadratic router, no shared experts, no
//! capacity, any T): scores 1, top-k selection with the routing map's counting pass 1
//! (`router::select_counted`), the map's placement 1 (`dispatch::place_counted`), GEMM1 + SwiGLU
//! with the gather fused 1, GEMM2 1, combine 1 = **6**, and no memset (`DeviceStats::memsets`:
//! each map's placement leaves the per-tile counts zeroed, so the next count skips clearing
//! them). A router runs scores, selection and the count as one launch (`gate::route`)
//! above T = 64 wherever one block of its route tile holds every expert (linear: E <= 256 in
//! f16/bf16, 128 in f32; the rank forms 16): **5**; and a linear router at T <= 64 with
//! E <= 512 (any dtype) places the map in the same launch too: **4**. The codebook router takes code norms and nearest code in
//! place of scores and selection, then the whole `routing_map`: 6 up to T·k = 4096, 7 past it.
//! Shared experts add 2; the router losses (aux and z together) ride in the selection's launch
//! (`gate::route_with_losses`: the gate's tile kernel where the losses' chunks are its 64-token
//! tiles, else `router::select_with_losses`), and add 1 at decode or where the gate's scores
//! then run apart from the selection; capacity needs the map's priority pass
//! first, so selection and `routing_map` run apart (6 up to T·k = 4096, 9 past it). Backward: 10
//! for the linear router (combine⁻¹, GEMM2 dgrad + SwiGLU⁻¹, dW2, GEMM1 dgrad, dW1, select⁻¹,
//! gate dX + dW + db, the sum into dx), +1 for the losses, +5 with shared experts; quadratic gates add
//! their coefficient launches.
//! `tests/layers` asserts these counts.
//!
//! A [`MoeLayer`] or [`ChainOfExperts`] built with [`Mode::Inference`] (`with_mode`) is
//! forward-only, for serving: it keeps no SwiGLU GU, runs no router loss and holds no gradient or
//! backward buffer (a chain reuses one set of pass buffers for every iteration). `VqMoe` is
//! training-only.
//!
//! Every pass is stream-ordered and never waits for the device (`Device::stats().host_syncs`
//! does not move inside `forward` or `backward`). Work buffers are sized once, at
//! construction, for [`MoeConfig::max_tokens`] tokens; a call with fewer tokens uses prefixes of
//! them ([`workspace`]).
mod buffers;
mod chain;
mod config;
mod device_weights;
pub mod esft;
mod graph;
mod moe;
mod params;
mod pass;
pub mod vq;
mod weights;
pub mod workspace;

pub(crate) use buffers::Saved;
pub use chain::ChainOfExperts;
pub use config::{Mode, MoeConfig, RouterKind};
pub use device_weights::{DeviceWeights, LayerWeights};
pub use graph::{Captures, GraphIo};
pub use moe::{LossValues, MoeLayer};
pub use params::RouterWeights;
pub use params::{ExpertGrads, RouterGrads};
pub use vq::{VqMoe, VqWeights};
pub use weights::HostWeights;
