//! Routing reports: what a layer's router did, read back from the device after a forward.
//!
//! [`RoutingReport`] is gathered from the buffers a [`MoeLayer`], [`ChainOfExperts`] or
//! [`VqMoe`] already keeps from its last forward (ids, logits, expert counts, the dispatch
//! status, the non-finite counter, codes) and from an [`EsftTracker`]. Every download happens
//! in the `of_*` gatherers, after the pass, never inside it: the passes themselves stay free of
//! host syncs, and the statistics are computed on the host from the copies. Reports of several
//! batches add up ([`RoutingReport::accumulate`]).
//!
//! It holds per-expert load and its imbalance, capacity use and dropped tokens (and the path a
//! fully dropped token takes instead), non-finite tokens, Chain-of-Experts transition matrices
//! between iterations, VQ code use (perplexity, dead codes), the router's score margin between
//! the k-th and (k+1)-th expert, and ESFT scores with the selected set. [`text`] prints it;
//! `figures` (feature `figures`) draws it as PNG files.
use crate::layers::esft::EsftTracker;
use crate::layers::{ChainOfExperts, MoeConfig, MoeLayer, RouterKind, VqMoe};
use crate::ops::FloatElement;
use crate::ops::dispatch::STATUS_CAPACITY_DROPPED;
use crate::ops::esft::ScoreKind;
use crate::ops::router::ScoreFunction;
use crate::{Device, Error, Result};

#[cfg(feature = "figures")]
pub mod figures;
pub mod text;

/// Capacity use of the batches (math §4), for a layer with a capacity factor.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityUse {
    /// Slots the experts could hold: `E·C` summed over batches (and chain iterations).
    pub slots: u64,
    /// Slots the router chose that capacity dropped.
    pub dropped_slots: u64,
    /// Tokens that lost at least one slot to capacity.
    pub tokens_some_dropped: u64,
    /// Tokens that lost every slot: their routed output is zero.
    pub tokens_all_dropped: u64,
}

/// Top-1 expert transitions from one Chain-of-Experts iteration to the next.
#[derive(Debug, Clone, PartialEq)]
pub struct Transitions {
    /// The iteration t of the pair (t, t+1).
    pub from: usize,
    /// `[E, E]`, row-major: tokens whose first expert was i at t and j at t+1.
    pub matrix: Vec<u64>,
    /// Tokens routed at both iterations (non-finite rows are left out).
    pub tokens: u64,
    /// Tokens whose first expert changed.
    pub first_changed: u64,
    /// Tokens whose set of k experts changed.
    pub set_changed: u64,
}

/// Score margins of the router: per routed token, the k-th largest score minus the (k+1)-th
/// (softmax probabilities, or sigmoid scores for a sigmoid router): how far the selection is
/// from changing.
#[derive(Debug, Clone, PartialEq)]
pub struct Margins {
    /// One per token with finite logits, in token order (batches, and a chain's iterations,
    /// appended).
    pub values: Vec<f32>,
    /// The scores the margins are between ("softmax", "sigmoid" or "logits").
    pub scores: &'static str,
}

/// ESFT statistics from an [`EsftTracker`] (math §8).
#[derive(Debug, Clone, PartialEq)]
pub struct EsftSummary {
    /// Gate scores `g_i` (mean gate weight).
    pub gate: Vec<f64>,
    /// Token scores `r_i` (share of routed slots).
    pub token: Vec<f64>,
    /// The experts the tracker's last selection chose, in id order (empty before one).
    pub selected: Vec<usize>,
    /// Tokens the tracker accumulated.
    pub tokens: u64,
}

/// What a router did over one or more forwards. Built by the `of_*` gatherers; see the
/// [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingReport {
    /// What it was gathered from: "MoeLayer", "ChainOfExperts" or "VqMoe".
    pub source: &'static str,
    pub experts: usize,
    pub k: usize,
    /// Forwards accumulated.
    pub batches: u64,
    /// Tokens over the batches (a chain's token counts once, not once per iteration).
    pub tokens: u64,
    /// Slots the router sent to each expert `[E]`, before capacity (every chain iteration).
    pub routed: Vec<u64>,
    /// Rows each expert computed `[E]`, after capacity.
    pub kept: Vec<u64>,
    /// `None` without a capacity factor.
    pub capacity: Option<CapacityUse>,
    /// Tokens routed nowhere in these batches (a non-finite row: all its ids -1), counted once
    /// per routing (a chain routes a non-finite token once per iteration).
    pub nonfinite_tokens: u64,
    /// The layer's own non-finite counter at the last gather (every forward since it was built).
    pub nonfinite_since_built: u64,
    /// What a token that loses every slot to capacity still gets.
    pub fallback: &'static str,
    /// Chain-of-Experts: one per pair of consecutive iterations.
    pub transitions: Vec<Transitions>,
    /// Code use `[E]`: the codebook router's codes, or a VQ-MoE's discrete path.
    pub codes: Option<Vec<u64>>,
    /// `None` for a router without logits, or when k = E (no (k+1)-th score).
    pub margins: Option<Margins>,
    pub esft: Option<EsftSummary>,
}

/// One routing of a batch, downloaded: what every gatherer reduces.
struct Routed {
    ids: Vec<i32>,
    kept: Vec<i32>,
    /// `(dropped slots, slot rows)`, with capacity.
    dropped: Option<(i32, Vec<i32>)>,
    logits: Option<Vec<f32>>,
}

impl RoutingReport {
    /// An empty report of one forward of `tokens` tokens through a layer of `config` (with the
    /// residual or not); `Err` before the first forward (0 tokens).
    fn started(source: &'static str, config: &MoeConfig, tokens: usize, residual: bool) -> Result<Self> {
        if tokens == 0 {
            return Err(Error::InvalidArgument {
                argument: "layer",
                value: format!("a {source} before its first forward"),
                expected: "a layer that has run a forward".into(),
            });
        }
        Ok(Self {
            source,
            experts: config.experts,
            k: config.k,
            batches: 1,
            tokens: tokens as u64,
            routed: vec![0; config.experts],
            kept: vec![0; config.experts],
            capacity: config.capacity_factor.map(|_| CapacityUse {
                slots: 0,
                dropped_slots: 0,
                tokens_some_dropped: 0,
                tokens_all_dropped: 0,
            }),
            nonfinite_tokens: 0,
            nonfinite_since_built: 0,
            fallback: fallback(config, residual),
            transitions: vec![],
            codes: None,
            margins: None,
            esft: None,
        })
    }

    /// The report of `layer`'s last forward. Downloads (host syncs) the ids, the expert counts,
    /// the non-finite counter, the logits (a router with logits, k < E) and, with capacity, the
    /// dispatch status and each slot's row: 3 to 6 downloads, all here.
    pub fn of_layer<T: FloatElement>(layer: &MoeLayer<T>) -> Result<Self> {
        let config = layer.config();
        let saved = layer.saved();
        let device = layer.device();
        let mut report = Self::started("MoeLayer", config, saved.tokens, layer.residual())?;
        let routed = download_routing(device, config, saved)?;
        if config.router == RouterKind::Codebook {
            report.codes = Some(code_use(&routed.ids, config.experts));
        }
        report.add_routing(config, saved.tokens, &routed);
        report.nonfinite_since_built = device.download(layer.nonfinite_rows())?[0] as u64;
        Ok(report)
    }

    /// The report of `chain`'s last forward: every iteration's routing summed, and the
    /// transitions between consecutive iterations. An inference chain keeps only its last
    /// iteration's routing, so its report has that one and no transitions. Downloads as
    /// [`of_layer`](Self::of_layer), per iteration, plus the non-finite counter once.
    pub fn of_chain<T: FloatElement>(chain: &ChainOfExperts<T>) -> Result<Self> {
        let config = chain.config();
        let saved = chain.saved_iterations();
        let device = chain.device();
        let tokens = saved.last().map_or(0, |s| s.tokens);
        let mut report = Self::started("ChainOfExperts", config, tokens, true)?;
        let mut previous: Option<Vec<i32>> = None;
        for (t, iteration) in saved.iter().enumerate() {
            let routed = download_routing(device, config, iteration)?;
            report.add_routing(config, tokens, &routed);
            if let Some(before) = &previous {
                report.transitions.push(transitions(t - 1, before, &routed.ids, config));
            }
            previous = Some(routed.ids);
        }
        report.nonfinite_since_built = device.download(chain.nonfinite_rows())?[0] as u64;
        Ok(report)
    }

    /// The report of a VQ-MoE's last forward: the continuous path's routing (as
    /// [`of_layer`](Self::of_layer)) and the discrete path's code use. `nonfinite_since_built`
    /// sums the router's and the codebook's counters.
    pub fn of_vq<T: FloatElement>(layer: &VqMoe<T>) -> Result<Self> {
        let config = layer.config();
        let saved = layer.saved();
        let device = layer.device();
        let mut report = Self::started("VqMoe", config, saved.tokens, false)?;
        let routed = download_routing(device, config, saved)?;
        report.add_routing(config, saved.tokens, &routed);
        report.codes = Some(code_use(&device.download(&layer.codes()?)?, config.experts));
        let (router, codebook) = layer.nonfinite_rows();
        report.nonfinite_since_built = (device.download(router)?[0] + device.download(codebook)?[0]) as u64;
        Ok(report)
    }

    /// Adds `tracker`'s ESFT scores (both kinds) and its last selection (three downloads).
    pub fn with_esft(mut self, device: &Device, tracker: &EsftTracker) -> Result<Self> {
        let (scores, _) = tracker.statistics();
        let statistics = scores.download(device)?;
        let k = scores.k() as f64;
        let per_token = |value: f64, scale: f64| match statistics.tokens {
            0 => 0.0,
            n => value / (n as f64 * scale),
        };
        self.esft = Some(EsftSummary {
            gate: statistics.weight_sums.iter().map(|&w| per_token(w, 1.0)).collect(),
            token: statistics.counts.iter().map(|&c| per_token(c as f64, k)).collect(),
            selected: tracker.selected().to_vec(),
            tokens: statistics.tokens,
        });
        Ok(self)
    }

    /// Adds `other`, a report of later batches from the same kind of layer: counts, capacity,
    /// transitions and code use add up, margins append, and `other`'s ESFT summary and
    /// non-finite counter (the later ones) replace these.
    pub fn accumulate(&mut self, other: &RoutingReport) -> Result<()> {
        let same = self.source == other.source
            && self.experts == other.experts
            && self.k == other.k
            && self.transitions.len() == other.transitions.len()
            && self.capacity.is_some() == other.capacity.is_some()
            && self.codes.is_some() == other.codes.is_some()
            && self.margins.as_ref().map(|m| m.scores) == other.margins.as_ref().map(|m| m.scores);
        if !same {
            return Err(Error::InvalidArgument {
                argument: "other",
                value: format!("a {} report of E = {}, k = {}", other.source, other.experts, other.k),
                expected: format!(
                    "a report of the same kind of layer: {}, E = {}, k = {}, {} transitions",
                    self.source,
                    self.experts,
                    self.k,
                    self.transitions.len()
                ),
            });
        }
        let add = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        self.batches += other.batches;
        self.tokens += other.tokens;
        add(&mut self.routed, &other.routed);
        add(&mut self.kept, &other.kept);
        if let (Some(a), Some(b)) = (self.capacity.as_mut(), other.capacity.as_ref()) {
            a.slots += b.slots;
            a.dropped_slots += b.dropped_slots;
            a.tokens_some_dropped += b.tokens_some_dropped;
            a.tokens_all_dropped += b.tokens_all_dropped;
        }
        self.nonfinite_tokens += other.nonfinite_tokens;
        self.nonfinite_since_built = other.nonfinite_since_built;
        for (a, b) in self.transitions.iter_mut().zip(&other.transitions) {
            add(&mut a.matrix, &b.matrix);
            a.tokens += b.tokens;
            a.first_changed += b.first_changed;
            a.set_changed += b.set_changed;
        }
        if let (Some(a), Some(b)) = (self.codes.as_mut(), other.codes.as_ref()) {
            add(a, b);
        }
        if let (Some(a), Some(b)) = (self.margins.as_mut(), other.margins.as_ref()) {
            a.values.extend_from_slice(&b.values);
        }
        if other.esft.is_some() {
            self.esft = other.esft.clone();
        }
        Ok(())
    }

    /// Adds one downloaded routing of `tokens` tokens.
    fn add_routing(&mut self, config: &MoeConfig, tokens: usize, routed: &Routed) {
        let k = config.k;
        for &id in &routed.ids {
            if let Some(slot) = usize::try_from(id).ok().and_then(|id| self.routed.get_mut(id)) {
                *slot += 1;
            }
        }
        for (kept, &count) in self.kept.iter_mut().zip(&routed.kept) {
            *kept += count.max(0) as u64;
        }
        let nowhere = routed.ids.chunks(k).filter(|row| row.iter().all(|&id| id < 0)).count();
        self.nonfinite_tokens += nowhere as u64;
        if let (Some(capacity), Some((dropped, rows))) = (self.capacity.as_mut(), routed.dropped.as_ref()) {
            let per_expert = config.map_config().capacity_per_expert(tokens, k).unwrap_or(0);
            capacity.slots += (per_expert * config.experts) as u64;
            capacity.dropped_slots += (*dropped).max(0) as u64;
            for (ids, rows) in routed.ids.chunks(k).zip(rows.chunks(k)) {
                let lost = ids.iter().zip(rows).filter(|&(&id, &row)| id >= 0 && row < 0).count();
                let chosen = ids.iter().filter(|&&id| id >= 0).count();
                capacity.tokens_some_dropped += (lost > 0) as u64;
                capacity.tokens_all_dropped += (chosen > 0 && lost == chosen) as u64;
            }
        }
        if let Some(logits) = &routed.logits {
            let score = config.router_config().score;
            let values = margins(logits, config.experts, k, score);
            let scores = match score {
                ScoreFunction::Softmax => "softmax",
                ScoreFunction::Sigmoid => "sigmoid",
                ScoreFunction::Identity => "logits",
            };
            match self.margins.as_mut() {
                Some(m) => m.values.extend(values),
                None => self.margins = Some(Margins { values, scores }),
            }
        }
    }

    /// Max over mean of the routed load (1 is perfect balance; E when one expert takes all).
    /// 0 when nothing was routed.
    pub fn max_over_mean(&self) -> f64 {
        let mean = mean(&self.routed);
        if mean == 0.0 {
            return 0.0;
        }
        self.routed.iter().copied().max().unwrap_or(0) as f64 / mean
    }

    /// Coefficient of variation of the routed load: population standard deviation over mean
    /// (0 is perfect balance). 0 when nothing was routed.
    pub fn coefficient_of_variation(&self) -> f64 {
        let mean = mean(&self.routed);
        if mean == 0.0 {
            return 0.0;
        }
        let variance = self.routed.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / self.routed.len() as f64;
        variance.sqrt() / mean
    }

    /// Share of the capacity the kept rows fill (`Σ kept / (E·C)`), with capacity.
    pub fn capacity_fill(&self) -> Option<f64> {
        let capacity = self.capacity.as_ref()?;
        let kept: u64 = self.kept.iter().sum();
        Some(if capacity.slots == 0 {
            0.0
        } else {
            kept as f64 / capacity.slots as f64
        })
    }

    /// ESFT scores of `kind`, if the report has them.
    pub fn esft_scores(&self, kind: ScoreKind) -> Option<&[f64]> {
        let esft = self.esft.as_ref()?;
        Some(match kind {
            ScoreKind::Gate => &esft.gate,
            ScoreKind::Token => &esft.token,
        })
    }
}

impl CapacityUse {
    /// Share of the slots the router chose that capacity dropped, over `k · tokens`.
    pub fn dropped_share(&self, tokens: u64, k: usize) -> f64 {
        match tokens * k as u64 {
            0 => 0.0,
            slots => self.dropped_slots as f64 / slots as f64,
        }
    }
}

impl Transitions {
    /// Share of the tokens whose first expert changed.
    pub fn first_changed_share(&self) -> f64 {
        share(self.first_changed, self.tokens)
    }

    /// Share of the tokens whose set of k experts changed.
    pub fn set_changed_share(&self) -> f64 {
        share(self.set_changed, self.tokens)
    }
}

/// Perplexity of code use, `exp(H(p))` with `p` the share of each code (E when uniform, 1 when
/// one code takes all; 0 when nothing was counted).
pub fn perplexity(uses: &[u64]) -> f64 {
    let total: u64 = uses.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let entropy: f64 = (uses.iter().filter(|&&u| u > 0))
        .map(|&u| {
            let p = u as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    entropy.exp()
}

/// The codes no token used.
pub fn dead_codes(uses: &[u64]) -> Vec<usize> {
    (0..uses.len()).filter(|&c| uses[c] == 0).collect()
}

impl Margins {
    /// Their mean (0 when empty).
    pub fn mean(&self) -> f64 {
        match self.values.len() {
            0 => 0.0,
            n => self.values.iter().map(|&v| v as f64).sum::<f64>() / n as f64,
        }
    }

    /// The median (the lower middle value; 0 when empty).
    pub fn median(&self) -> f64 {
        let mut sorted = self.values.clone();
        sorted.sort_by(f32::total_cmp);
        sorted
            .get(sorted.len().saturating_sub(1) / 2)
            .map_or(0.0, |&v| v as f64)
    }

    /// Share of the tokens whose margin is below `threshold` (a near tie).
    pub fn share_below(&self, threshold: f32) -> f64 {
        let below = self.values.iter().filter(|&&v| v < threshold).count();
        share(below as u64, self.values.len() as u64)
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

fn mean(values: &[u64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<u64>() as f64 / values.len() as f64
}

/// What a token dropped from every expert still gets in `config`'s layer.
fn fallback(config: &MoeConfig, residual: bool) -> &'static str {
    match (config.shared_experts > 0, residual) {
        (true, true) => "the residual and the shared experts",
        (true, false) => "the shared experts",
        (false, true) => "the residual",
        (false, false) => "nothing (a zero output row)",
    }
}

/// Downloads what one routing kept (see [`RoutingReport::of_layer`]).
fn download_routing<T: FloatElement>(
    device: &Device,
    config: &MoeConfig,
    saved: &crate::layers::Saved<T>,
) -> Result<Routed> {
    let slots = saved.tokens * config.k;
    let ids = device.download(&saved.ids.slice(..slots)?)?;
    let kept = device.download(&saved.counts)?;
    let dropped = match config.capacity_factor {
        Some(_) => Some((
            device.download(&saved.status)?[STATUS_CAPACITY_DROPPED],
            device.download(&saved.inverse.slice(..slots)?)?,
        )),
        None => None,
    };
    let has_logits = config.router != RouterKind::Codebook && config.k < config.experts;
    let logits = match has_logits {
        true => Some(device.download(&saved.z.slice(..saved.tokens * config.experts)?)?),
        false => None,
    };
    Ok(Routed {
        ids,
        kept,
        dropped,
        logits,
    })
}

/// Uses of each of `experts` codes (ids -1 count nowhere).
fn code_use(codes: &[i32], experts: usize) -> Vec<u64> {
    let mut uses = vec![0u64; experts];
    for &c in codes {
        if let Some(u) = usize::try_from(c).ok().and_then(|c| uses.get_mut(c)) {
            *u += 1;
        }
    }
    uses
}

/// Top-1 and set transitions from ids `before` to `after` (`[T, k]` each).
fn transitions(from: usize, before: &[i32], after: &[i32], config: &MoeConfig) -> Transitions {
    let (e, k) = (config.experts, config.k);
    let mut out = Transitions {
        from,
        matrix: vec![0; e * e],
        tokens: 0,
        first_changed: 0,
        set_changed: 0,
    };
    for (a, b) in before.chunks(k).zip(after.chunks(k)) {
        let (Ok(i), Ok(j)) = (usize::try_from(a[0]), usize::try_from(b[0])) else {
            continue; // routed nowhere at one of the two
        };
        if i >= e || j >= e {
            continue;
        }
        out.tokens += 1;
        out.matrix[i * e + j] += 1;
        out.first_changed += (i != j) as u64;
        out.set_changed += !a.iter().all(|id| b.contains(id)) as u64;
    }
    out
}

/// Per token with finite logits (`[T, E]` rows), the k-th largest score minus the (k+1)-th;
/// scores are the softmax of the row, or its sigmoid.
fn margins(logits: &[f32], experts: usize, k: usize, score: ScoreFunction) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len() / experts);
    for row in logits.chunks(experts) {
        if !row.iter().all(|z| z.is_finite()) {
            continue;
        }
        let mut scores: Vec<f64> = match score {
            ScoreFunction::Sigmoid => row.iter().map(|&z| 1.0 / (1.0 + (-(z as f64)).exp())).collect(),
            ScoreFunction::Identity => row.iter().map(|&z| z as f64).collect(),
            ScoreFunction::Softmax => {
                let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z as f64));
                let exp: Vec<f64> = row.iter().map(|&z| (z as f64 - max).exp()).collect();
                let sum: f64 = exp.iter().sum();
                exp.into_iter().map(|v| v / sum).collect()
            }
        };
        scores.sort_by(|a, b| b.total_cmp(a));
        out.push((scores[k - 1] - scores[k]) as f32);
    }
    out
}
