//! The layers (issue 7) on every device against the whole-layer references
//! (`moe_kernels::reference::layers`), finite differences of those references, the launch and
//! host-sync budgets, determinism and bad configurations.
mod common;
#[path = "layers/support.rs"]
mod support;

#[path = "layers/chain.rs"]
mod chain;
#[path = "layers/esft.rs"]
mod esft;
#[path = "layers/graph.rs"]
mod graph;
#[path = "layers/graph_chain_vq.rs"]
mod graph_chain_vq;
#[path = "layers/moe.rs"]
mod moe;
#[path = "layers/nonfinite.rs"]
mod nonfinite;
#[path = "layers/vq.rs"]
mod vq;
#[path = "layers/weights.rs"]
mod weights;
#[path = "layers/weights_chain_vq.rs"]
mod weights_chain_vq;
#[path = "layers/written.rs"]
mod written;
