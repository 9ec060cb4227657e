//! Expert-specialized fine-tuning (math §8): score the experts of a layer over any number of
//! probe batches on the device, select the shortest prefix of experts (by score) whose
//! cumulative score reaches p, and train only those: the layer's expert mask makes the
//! weight-gradient GEMM launch blocks for the selected experts only (frozen experts cost no dW
//! work and their gradient buffers are never written), while routing and dX are unchanged.
use super::MoeLayer;
use crate::ops::FloatElement;
use crate::ops::esft::{self, EsftScores, EsftSelection, ScoreKind};
use crate::ops::gemm::ExpertMask;
use crate::{Device, DeviceSlice, Result};

/// Per-expert ESFT statistics of one layer, accumulated on the device.
pub struct EsftTracker {
    device: Device,
    scores: EsftScores,
    selection: EsftSelection,
    selected: Vec<usize>,
}

impl EsftTracker {
    /// Zeroed statistics for a layer of `experts` experts, `k` per token.
    pub fn new(device: &Device, experts: usize, k: usize) -> Result<Self> {
        Ok(Self {
            device: device.clone(),
            scores: EsftScores::new(device, experts, k)?,
            selection: EsftSelection::new(device, experts)?,
            selected: vec![],
        })
    }

    /// Adds one batch of routing (ids and weights, `[T, k]`). One launch; no host sync.
    pub fn accumulate_routing(&mut self, ids: &impl DeviceSlice<i32>, weights: &impl DeviceSlice<f32>) -> Result<()> {
        esft::accumulate(&self.device, ids, weights, &mut self.scores)
    }

    /// Adds the routing of `layer`'s last forward. One launch; no host sync.
    pub fn accumulate<T: FloatElement>(&mut self, layer: &MoeLayer<T>) -> Result<()> {
        let (ids, weights) = layer.routing()?;
        self.accumulate_routing(&ids, &weights)
    }

    /// Forgets every batch.
    pub fn reset(&mut self) -> Result<()> {
        self.scores.reset(&self.device)
    }

    /// The math §8 selection by `kind` scores at cumulative share `p` (ties to the lower id), as
    /// the expert mask of a training step. The selection runs on the device (one launch); the
    /// mask is then read back once (**one host sync**, outside any training step: the
    /// weight-gradient grid is sized from the number of selected experts).
    pub fn select(&mut self, p: f64, kind: ScoreKind) -> Result<ExpertMask> {
        esft::select(&self.device, &self.scores, kind, p, &mut self.selection)?;
        let mask = self.selection.download_mask(&self.device)?;
        self.selected = (0..mask.len()).filter(|&e| mask[e]).collect();
        ExpertMask::new(&self.device, &mask)
    }

    /// The experts the last [`select`](Self::select) chose, in id order.
    pub fn selected(&self) -> &[usize] {
        &self.selected
    }

    /// The device statistics and selection (scores, mask, ids in rank order).
    pub fn statistics(&self) -> (&EsftScores, &EsftSelection) {
        (&self.scores, &self.selection)
    }
}
