//! ESFT (math §8) on every available device against `reference::esft`: statistics accumulated
//! over several batches equal one batch of their concatenation (bit for bit) and the reference
//! (counts exact, sums within rounding); selection (ids, mask, count exact; scores within f32
//! rounding) for both score kinds; ties to the lower id; p at its edges; skipped slots; k = 1 and
//! k = E; E = 1024; determinism; every validation error; one launch and no host sync per op.
mod common;

use common::{Rng, Tolerance, assert_close, devices};
use moe_kernels::ops::esft::{self, EsftScores, EsftSelection, EsftStatistics, ScoreKind};
use moe_kernels::reference::esft as reference;
use moe_kernels::{Device, Error};
use proptest::prelude::*;

/// One batch of routing: ids and weights `[T, k]`.
#[derive(Debug, Clone)]
struct Batch {
    ids: Vec<i32>,
    weights: Vec<f32>,
}

/// `tokens` tokens routed to k distinct experts each, with positive weights; expert e is picked
/// with probability growing with e (so scores spread out instead of tying).
fn random_batch(rng: &mut Rng, tokens: usize, experts: usize, k: usize) -> Batch {
    let mut batch = Batch {
        ids: vec![],
        weights: vec![],
    };
    for _ in 0..tokens {
        let mut row: Vec<i32> = vec![];
        while row.len() < k {
            let a = rng.below(experts);
            let id = a.max(rng.below(experts)) as i32;
            if !row.contains(&id) {
                row.push(id);
            }
        }
        batch.ids.extend(row);
        batch.weights.extend((0..k).map(|_| rng.uniform(0.01, 1.0)));
    }
    batch
}

fn concatenate(batches: &[Batch]) -> Batch {
    Batch {
        ids: batches.iter().flat_map(|b| b.ids.clone()).collect(),
        weights: batches.iter().flat_map(|b| b.weights.clone()).collect(),
    }
}

fn reference_statistics(batches: &[Batch], experts: usize, k: usize) -> reference::Statistics {
    let slices: Vec<(&[i32], &[f32])> = batches.iter().map(|b| (&b.ids[..], &b.weights[..])).collect();
    reference::statistics(&slices, experts, k)
}

/// Accumulates `batches` into `scores`, asserting one launch per batch and no host sync.
fn run_accumulate(device: &Device, batches: &[Batch], scores: &mut EsftScores) {
    for batch in batches {
        let ids = device.upload(&batch.ids).unwrap();
        let weights = device.upload(&batch.weights).unwrap();
        let before = device.stats();
        esft::accumulate(device, &ids, &weights, scores).unwrap();
        let after = device.stats();
        assert_eq!(after.launches - before.launches, 1, "accumulate is one launch");
        assert_eq!(after.host_syncs, before.host_syncs, "accumulate must not sync");
    }
}

/// What one `select` produced, downloaded.
#[derive(Debug, PartialEq)]
struct Selected {
    scores: Vec<f32>,
    mask: Vec<bool>,
    selected: Vec<i32>,
    count: i32,
}

/// Runs `select` (asserting one launch, no host sync) and downloads its outputs.
fn run_select(device: &Device, scores: &EsftScores, kind: ScoreKind, p: f64) -> Selected {
    let mut selection = EsftSelection::new(device, scores.experts()).unwrap();
    let before = device.stats();
    esft::select(device, scores, kind, p, &mut selection).unwrap();
    let after = device.stats();
    assert_eq!(after.launches - before.launches, 1, "select is one launch");
    assert_eq!(after.host_syncs, before.host_syncs, "select must not sync");
    Selected {
        scores: device.download(selection.scores()).unwrap(),
        mask: selection.download_mask(device).unwrap(),
        selected: device.download(selection.selected()).unwrap(),
        count: device.download(selection.count()).unwrap()[0],
    }
}

/// Counts, tokens and skipped slots exactly; weight sums within the fixed-point rounding.
fn assert_statistics(what: &str, got: &EsftStatistics, want: &reference::Statistics) {
    assert_eq!(got.counts, want.counts, "{what}: counts");
    assert_eq!(
        (got.tokens, got.skipped_slots),
        (want.tokens, want.skipped_slots),
        "{what}: tokens, skipped"
    );
    let sums: Vec<f32> = got.weight_sums.iter().map(|&s| s as f32).collect();
    let slots = want.counts.iter().copied().max().unwrap_or(0) as usize;
    assert_close(
        &format!("{what}: weight sums"),
        &sums,
        &want.weight_sums,
        Tolerance::F32.over(slots),
    );
}

/// The device's selection against the reference's: the same ids in the same order, a matching
/// mask and count, and scores within f32 rounding.
fn assert_selection(what: &str, got: &Selected, want_scores: &[f64], want: &[usize]) {
    let experts = want_scores.len();
    let mut ids: Vec<i32> = want.iter().map(|&e| e as i32).collect();
    ids.resize(experts, -1);
    assert_eq!(got.selected, ids, "{what}: selected ids");
    assert_eq!(got.count as usize, want.len(), "{what}: count");
    let mask: Vec<bool> = (0..experts).map(|e| want.contains(&e)).collect();
    assert_eq!(got.mask, mask, "{what}: mask");
    assert_close(&format!("{what}: scores"), &got.scores, want_scores, Tolerance::F32);
}

/// Whether `p` sits so close to a prefix's cumulative score that the device's fixed-point
/// rounding of the weights could decide differently from the reference.
fn near_boundary(scores: &[f64], p: f64) -> bool {
    let mut cumulative = 0.0;
    reference::ranked(scores).iter().any(|&e| {
        cumulative += scores[e];
        (cumulative - p).abs() < 1e-7
    })
}

/// Accumulates `batches` batch by batch and as one batch; checks both against each other (bits)
/// and the reference, then selects at several p for both kinds.
fn check_case(device: &Device, batches: &[Batch], experts: usize, k: usize, ps: &[f64]) {
    let what = format!("{device:?} E={experts} k={k}");
    let mut split = EsftScores::new(device, experts, k).unwrap();
    run_accumulate(device, batches, &mut split);
    let mut whole = EsftScores::new(device, experts, k).unwrap();
    run_accumulate(device, &[concatenate(batches)], &mut whole);
    let got = split.download(device).unwrap();
    assert_eq!(got, whole.download(device).unwrap(), "{what}: batches vs one batch");
    let want = reference_statistics(batches, experts, k);
    assert_statistics(&what, &got, &want);
    for kind in [ScoreKind::Gate, ScoreKind::Token] {
        let scores = reference::scores(&want, k, kind);
        for &p in ps {
            if kind == ScoreKind::Gate && near_boundary(&scores, p) {
                continue;
            }
            let selected = run_select(device, &split, kind, p);
            let expected = reference::select(&want, k, kind, p);
            assert_selection(&format!("{what} {kind:?} p={p}"), &selected, &scores, &expected);
        }
    }
}

fn case_strategy() -> impl Strategy<Value = (usize, usize, Vec<usize>, u64)> {
    (
        1usize..=40,
        1usize..=8,
        prop::collection::vec(0usize..=40, 1..=3),
        any::<u64>(),
    )
        .prop_map(|(experts, k, tokens, seed)| (experts, k.min(experts), tokens, seed))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn statistics_and_selection_match_the_reference((experts, k, tokens, seed) in case_strategy()) {
        let mut rng = Rng::new(seed);
        let batches: Vec<Batch> = tokens.iter().map(|&t| random_batch(&mut rng, t, experts, k)).collect();
        for device in devices() {
            check_case(&device, &batches, experts, k, &[0.0, 1e-9, 0.1, 0.2, 0.5, 0.9, 1.0, 1.5]);
        }
    }
}

#[test]
fn k_equal_to_e_and_k_one_and_e_1024() {
    let mut rng = Rng::new(7);
    for (experts, k, tokens) in [(6, 6, 20), (9, 1, 30), (1, 1, 5), (1024, 8, 300)] {
        let batches = [
            random_batch(&mut rng, tokens, experts, k),
            random_batch(&mut rng, 3, experts, k),
        ];
        for device in devices() {
            check_case(&device, &batches, experts, k, &[0.1, 0.2, 1.0]);
        }
    }
}

/// Signed weights (a router with `ScoreFunction::Identity`): negative gate scores rank last and
/// the cumulative gate score is not monotone; the first prefix reaching p still wins.
#[test]
fn signed_weights() {
    let mut rng = Rng::new(19);
    let (experts, k) = (12, 3);
    let mut batch = random_batch(&mut rng, 40, experts, k);
    for w in &mut batch.weights {
        *w = rng.uniform(-1.0, 1.0);
    }
    let want = reference_statistics(std::slice::from_ref(&batch), experts, k);
    assert!(
        want.weight_sums.iter().any(|&s| s < 0.0),
        "the case needs a negative sum"
    );
    for device in devices() {
        check_case(
            &device,
            std::slice::from_ref(&batch),
            experts,
            k,
            &[0.05, 0.1, 0.2, 0.4, 2.0],
        );
    }
}

/// Many slots, so the accumulate grid has several blocks whose histograms meet in the state.
#[test]
fn accumulation_is_deterministic_across_blocks() {
    let mut rng = Rng::new(11);
    let (experts, k) = (64, 6);
    let batch = random_batch(&mut rng, 3000, experts, k);
    for device in devices() {
        let mut first = EsftScores::new(&device, experts, k).unwrap();
        run_accumulate(&device, std::slice::from_ref(&batch), &mut first);
        let mut second = EsftScores::new(&device, experts, k).unwrap();
        run_accumulate(&device, std::slice::from_ref(&batch), &mut second);
        let got = first.download(&device).unwrap();
        assert_eq!(got, second.download(&device).unwrap(), "{device:?}: repeat");
        assert_statistics(
            &format!("{device:?}"),
            &got,
            &reference_statistics(std::slice::from_ref(&batch), experts, k),
        );
        let a = run_select(&device, &first, ScoreKind::Gate, 0.3);
        assert_eq!(
            a,
            run_select(&device, &second, ScoreKind::Gate, 0.3),
            "{device:?}: select repeat"
        );
        first.reset(&device).unwrap();
        let zero = first.download(&device).unwrap();
        assert_eq!(
            zero,
            reference_statistics(&[], experts, k).into_statistics(),
            "{device:?}: reset"
        );
    }
}

/// `EsftStatistics` from the reference's, to compare whole states.
trait IntoStatistics {
    fn into_statistics(self) -> EsftStatistics;
}
impl IntoStatistics for reference::Statistics {
    fn into_statistics(self) -> EsftStatistics {
        EsftStatistics {
            counts: self.counts,
            weight_sums: self.weight_sums,
            tokens: self.tokens,
            skipped_slots: self.skipped_slots,
        }
    }
}

/// Experts 2 and 5 get the same slot count and weight sum, and so do 1, 4 and 7 (weights that
/// are exact in binary, so every sum ties exactly). Ties must rank the lower id first, for both
/// kinds.
#[test]
fn equal_scores_rank_the_lower_id_first() {
    let (experts, k) = (8, 2);
    let pairs: [(i32, i32); 6] = [(7, 2), (5, 1), (2, 4), (4, 5), (7, 1), (5, 2)];
    let mut weights = vec![0.5f32; 12];
    weights[5] = 0.25; // expert 4 in row 2 ...
    weights[6] = 0.75; // ... and in row 3: sum 1.0, like experts 1 and 7 (0.5 + 0.5)
    let batch = Batch {
        ids: pairs.iter().flat_map(|&(a, b)| [a, b]).collect(),
        weights,
    };
    let want = reference_statistics(std::slice::from_ref(&batch), experts, k);
    let (c, w) = (&want.counts, &want.weight_sums);
    assert!(
        c[2] == c[5] && c[1] == c[4] && c[4] == c[7],
        "the case plants count ties"
    );
    assert!(
        w[2] == w[5] && w[1] == w[4] && w[4] == w[7],
        "the case plants weight ties"
    );
    for device in devices() {
        check_case(
            &device,
            std::slice::from_ref(&batch),
            experts,
            k,
            &[1e-9, 0.3, 0.6, 1.0, 5.0],
        );
        let mut scores = EsftScores::new(&device, experts, k).unwrap();
        run_accumulate(&device, std::slice::from_ref(&batch), &mut scores);
        for kind in [ScoreKind::Gate, ScoreKind::Token] {
            let all = run_select(&device, &scores, kind, 5.0);
            // Every expert, in rank order: within equal scores, ids ascend.
            for pair in all.selected.windows(2) {
                let (a, b) = (pair[0] as usize, pair[1] as usize);
                let (sa, sb) = (all.scores[a], all.scores[b]);
                assert!(
                    sa > sb || (sa == sb && a < b),
                    "{device:?} {kind:?}: {a} ({sa}) before {b} ({sb})"
                );
            }
        }
    }
}

/// p = 0 selects nothing; a tiny p the best expert only; p = 1 over token scores exactly the
/// experts that received a slot; p above the total, and any p > 0 before any token, every expert.
#[test]
fn p_at_its_edges() {
    let (experts, k) = (10, 2);
    let mut rng = Rng::new(3);
    let batch = random_batch(&mut rng, 4, experts, k); // 8 slots: some experts get none
    let want = reference_statistics(std::slice::from_ref(&batch), experts, k);
    let used = want.counts.iter().filter(|&&c| c > 0).count();
    assert!(used < experts, "the case needs an expert without slots");
    for device in devices() {
        let mut scores = EsftScores::new(&device, experts, k).unwrap();
        let before_any = run_select(&device, &scores, ScoreKind::Gate, 0.1);
        assert_eq!(
            before_any.count as usize, experts,
            "{device:?}: no tokens yet: every expert"
        );
        run_accumulate(&device, std::slice::from_ref(&batch), &mut scores);
        for kind in [ScoreKind::Gate, ScoreKind::Token] {
            assert_eq!(
                run_select(&device, &scores, kind, 0.0).count,
                0,
                "{device:?} {kind:?} p = 0"
            );
            assert_eq!(
                run_select(&device, &scores, kind, 1e-12).count,
                1,
                "{device:?} {kind:?} tiny p"
            );
            let total = reference::scores(&want, k, kind).iter().sum::<f64>();
            let above = run_select(&device, &scores, kind, total + 0.5);
            assert_eq!(above.count as usize, experts, "{device:?} {kind:?} p > total");
            assert!(above.mask.iter().all(|&m| m));
        }
        let one = run_select(&device, &scores, ScoreKind::Token, 1.0);
        assert_eq!(
            one.count as usize, used,
            "{device:?}: p = 1 stops at the last expert with slots"
        );
        check_case(
            &device,
            std::slice::from_ref(&batch),
            experts,
            k,
            &[0.0, 1e-12, 1.0, 3.0],
        );
    }
}

/// Ids outside [0, E) and unusable weights count nowhere, and are counted as skipped.
#[test]
fn skipped_slots_count_nowhere() {
    let (experts, k) = (5, 2);
    let batch = Batch {
        ids: vec![0, 4, -1, 2, 5, i32::MAX, i32::MIN, 3, 1, 2, 3, 4, 0, 1],
        weights: vec![
            0.5,
            0.5,
            0.9,
            0.1,
            0.3,
            0.3,
            0.3,
            0.7,
            f32::NAN,
            0.2,
            f32::INFINITY,
            1e9,
            -0.5,
            65536.0,
        ],
    };
    let want = reference_statistics(std::slice::from_ref(&batch), experts, k);
    assert_eq!(want.skipped_slots, 7, "the case plants 7 bad slots");
    for device in devices() {
        check_case(&device, std::slice::from_ref(&batch), experts, k, &[0.1, 0.5, 0.9]);
    }
}

#[track_caller]
fn assert_invalid<T>(result: Result<T, Error>, name: &str) {
    match result.err() {
        Some(Error::InvalidArgument { argument, .. }) | Some(Error::Shape { argument, .. }) if argument == name => {}
        other => panic!("expected an error naming `{name}`, got {other:?} (None: Ok)"),
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_argument() {
    for device in devices() {
        let d = &device;
        let launches = d.stats().launches;
        assert_invalid(EsftScores::new(d, 0, 1), "experts");
        assert_invalid(EsftScores::new(d, 1025, 1), "experts");
        assert_invalid(EsftScores::new(d, 8, 0), "k");
        assert_invalid(EsftScores::new(d, 8, 9), "k");
        assert_invalid(EsftSelection::new(d, 0), "experts");
        let mut scores = EsftScores::new(d, 8, 2).unwrap();
        let ids = d.upload(&[0i32, 1, 2]).unwrap();
        let weights = d.upload(&[0.5f32; 3]).unwrap();
        assert_invalid(esft::accumulate(d, &ids, &weights, &mut scores), "ids");
        let ids = d.upload(&[0i32, 1, 2, 3]).unwrap();
        assert_invalid(esft::accumulate(d, &ids, &weights, &mut scores), "weights");
        let mut selection = EsftSelection::new(d, 8).unwrap();
        for p in [f64::NAN, -0.1, f64::INFINITY] {
            assert_invalid(esft::select(d, &scores, ScoreKind::Gate, p, &mut selection), "p");
        }
        let mut wrong = EsftSelection::new(d, 7).unwrap();
        assert_invalid(esft::select(d, &scores, ScoreKind::Token, 0.1, &mut wrong), "selection");
        assert_eq!(
            d.stats().launches,
            launches,
            "{device:?}: a rejected call launched a kernel"
        );
    }
}

/// Routing batches as views at odd element offsets (cudarc sub-slices of a bigger routing
/// output), with the edge sizes: an empty batch, one expert, k = E.
mod unaligned {
    use super::*;
    use common::{AtOffset, view_offset};

    /// [`run_accumulate`] with batch b's ids and weights at `view_offset(offset, 2b)` and `2b + 1`.
    fn accumulate_at(device: &Device, batches: &[Batch], scores: &mut EsftScores, offset: usize) {
        for (b, batch) in batches.iter().enumerate() {
            let ids = AtOffset::upload(device, &batch.ids, view_offset(offset, 2 * b));
            let weights = AtOffset::upload(device, &batch.weights, view_offset(offset, 2 * b + 1));
            let before = device.stats();
            esft::accumulate(device, &ids.view(), &weights.view(), scores).unwrap();
            assert_eq!(device.stats().launches - before.launches, 1, "accumulate is one launch");
            assert_eq!(device.stats().host_syncs, before.host_syncs, "accumulate must not sync");
        }
    }

    #[test]
    fn batches_at_odd_offsets_and_edge_sizes() {
        let mut rng = Rng::new(80);
        for (experts, k, tokens) in [
            (13, 3, [5, 0, 17]),
            (1, 1, [3, 1, 0]),
            (6, 6, [2, 9, 4]),
            (64, 8, [33, 1, 7]),
        ] {
            let batches: Vec<Batch> = tokens.iter().map(|&t| random_batch(&mut rng, t, experts, k)).collect();
            let want = reference_statistics(&batches, experts, k);
            for device in devices() {
                for offset in [1, 2, 3] {
                    let what = format!("{device:?} E={experts} k={k} at {offset}");
                    let mut scores = EsftScores::new(&device, experts, k).unwrap();
                    accumulate_at(&device, &batches, &mut scores, offset);
                    assert_statistics(&what, &scores.download(&device).unwrap(), &want);
                    let token_scores = reference::scores(&want, k, ScoreKind::Token);
                    let selected = run_select(&device, &scores, ScoreKind::Token, 0.5);
                    let expected = reference::select(&want, k, ScoreKind::Token, 0.5);
                    assert_selection(&what, &selected, &token_scores, &expected);
                }
            }
        }
    }
}
