//! Router ops (math §2, §3) on every available device against `reference::router`: selection
//! (ids exact, or a near-tie the reference scores cannot separate), its backward, expert
//! statistics, the aux loss and z-loss with their gradients, the bias update; the reference
//! gradients against finite differences; every validation error.
mod common;
#[path = "router/select_losses.rs"]
mod select_losses;

use common::{AtOffset, Rng, Tolerance, assert_close, devices, view_offset};
use moe_kernels::device::EmulatorDevice;
use moe_kernels::device::profile::{Access, Space};
use moe_kernels::ops::dispatch::{CountedMap, MapConfig, RoutingMap};
use moe_kernels::ops::router::{
    self, AuxLossConfig, AuxLossTarget, AuxLossWorkspace, RouterConfig, ScoreFunction, SelectionOrder, ZLossTarget,
    ZLossWorkspace,
};
use moe_kernels::reference::router as reference;
use moe_kernels::{Device, DeviceBuffer, Error};
use proptest::prelude::*;

const NO_BIAS: Option<&DeviceBuffer<f32>> = None;

/// What one `select` call produced, downloaded.
struct Selected {
    ids: Vec<i32>,
    weights: Vec<f32>,
    nonfinite_rows: u32,
}

/// Runs `select` (asserting one launch and no host sync) and downloads its outputs.
fn run_select(device: &Device, config: &RouterConfig, logits: &[f32], bias: Option<&[f32]>) -> Selected {
    run_select_at(device, config, logits, bias, 0)
}

/// Which selection kernels a test runs.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kernels {
    /// `router::select`'s: N / 32 lanes per row.
    Select,
    /// Their dev-tools warp-per-row twins (`router::select_warp_per_row`).
    WarpPerRow,
}

/// [`run_select`] with every buffer a view at `common::view_offset(offset, i)`.
fn run_select_at(
    device: &Device,
    config: &RouterConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
    offset: usize,
) -> Selected {
    run_kernels_at(device, Kernels::Select, config, logits, bias, offset)
}

/// [`run_select_at`] on the given kernels.
fn run_kernels_at(
    device: &Device,
    kernels: Kernels,
    config: &RouterConfig,
    logits: &[f32],
    bias: Option<&[f32]>,
    offset: usize,
) -> Selected {
    let at = |i| view_offset(offset, i);
    let slots = logits.len() / config.experts * config.k;
    let z = AtOffset::upload(device, logits, at(0));
    let bias = bias.map(|b| AtOffset::upload(device, b, at(1)));
    let mut ids = AtOffset::<i32>::zeros(device, slots, at(2));
    let mut weights = AtOffset::<f32>::zeros(device, slots, at(3));
    let mut counter = AtOffset::<u32>::zeros(device, 1, at(4));
    let bias_view = bias.as_ref().map(|b| b.view());
    let before = device.stats();
    {
        let (z, bias) = (&z.view(), bias_view.as_ref());
        let (i, w, c) = (&mut ids.view_mut(), &mut weights.view_mut(), &mut counter.view_mut());
        match kernels {
            Kernels::Select => router::select(device, config, z, bias, i, w, c),
            Kernels::WarpPerRow => router::select_warp_per_row(device, config, z, bias, i, w, c),
        }
        .unwrap();
    }
    let after = device.stats();
    assert_eq!(after.launches - before.launches, 1, "select is one launch");
    assert_eq!(after.host_syncs, before.host_syncs, "select must not sync");
    Selected {
        ids: ids.download(device),
        weights: weights.download(device),
        nonfinite_rows: counter.download(device)[0],
    }
}

/// The routing order with a slack: `a` ranks at least as high as `b` up to rounding.
fn ranks_at_least(a: f64, b: f64) -> bool {
    b.is_nan() || (!a.is_nan() && (a == b || a >= b - 1e-5 * (1.0 + b.abs())))
}

/// Ids that differ from the reference's must be a near-tie: each pick within rounding of the
/// best key still available, inside groups within rounding of the kept ones.
fn assert_near_tie(config: &RouterConfig, row: &[f32], bias: Option<&[f32]>, got: &[i32], what: &str) {
    let keys = reference::selection_keys(config, row, bias);
    let mut allowed = vec![true; keys.len()];
    if config.groups > 1 {
        let scores = reference::group_scores(config, &keys);
        let cut = scores[reference::ranked(&scores)[config.topk_groups - 1]];
        let size = config.experts / config.groups;
        for (e, a) in allowed.iter_mut().enumerate() {
            *a = ranks_at_least(scores[e / size], cut);
        }
        let mut used: Vec<usize> = got.iter().map(|&i| i as usize / size).collect();
        used.sort();
        used.dedup();
        assert!(
            used.len() <= config.topk_groups,
            "{what}: ids {got:?} span {} groups",
            used.len()
        );
    }
    let order = reference::ranked(&keys);
    let mut taken = vec![false; keys.len()];
    for &id in got {
        let id = id as usize;
        let best = keys[order.iter().copied().find(|&e| allowed[e] && !taken[e]).unwrap()];
        assert!(
            allowed[id] && ranks_at_least(keys[id], best),
            "{what}: id {id} (key {}) vs best {best}",
            keys[id]
        );
        taken[id] = true;
    }
}

/// Checks a device selection against the reference: counter exact, ids exact (or a
/// near-tie), distinct and in range, weights of those ids within math §9 f32 tolerance.
fn check_selection(config: &RouterConfig, logits: &[f32], bias: Option<&[f32]>, got: &Selected) {
    let (e, k) = (config.experts, config.k);
    let want = reference::select(config, logits, bias);
    assert_eq!(got.nonfinite_rows, want.nonfinite_rows, "non-finite row count");
    let mut expected_weights = vec![];
    for (t, row) in logits.chunks(e).enumerate() {
        let ids = &got.ids[t * k..(t + 1) * k];
        if reference::row_is_nonfinite(row) {
            // Routed nowhere: every id NO_EXPERT, every weight NaN (checked below).
            assert!(
                ids.iter().all(|&i| i == router::NO_EXPERT),
                "non-finite row {t}: ids {ids:?}"
            );
            expected_weights.extend(reference::weights_for(config, row, ids));
            continue;
        }
        let mut sorted = ids.to_vec();
        sorted.sort();
        sorted.dedup();
        assert!(
            sorted.len() == k && ids.iter().all(|&i| (0..e as i32).contains(&i)),
            "row {t}: ids {ids:?}"
        );
        if ids != &want.ids[t * k..(t + 1) * k] {
            assert_near_tie(
                config,
                row,
                bias,
                ids,
                &format!("row {t}: {:?} vs {:?}", ids, &want.ids[t * k..(t + 1) * k]),
            );
        }
        expected_weights.extend(reference::weights_for(config, row, ids));
    }
    assert_close("weights", &got.weights, &expected_weights, Tolerance::F32.over(k));
}

/// A random valid configuration for E experts: every score / order / renormalize / scale /
/// group option.
fn random_config(rng: &mut Rng, experts: usize) -> RouterConfig {
    let score = [ScoreFunction::Softmax, ScoreFunction::Sigmoid, ScoreFunction::Identity][rng.below(3)];
    let topk_first = score == ScoreFunction::Softmax && rng.below(2) == 0;
    let divisors: Vec<usize> = (1..=experts.min(32)).filter(|g| experts % g == 0).collect();
    let groups = if rng.below(2) == 0 {
        1
    } else {
        divisors[rng.below(divisors.len())]
    };
    let topk_groups = 1 + rng.below(groups);
    let reachable = topk_groups * experts / groups;
    RouterConfig {
        experts,
        k: 1 + rng.below(experts.min(32).min(reachable)),
        score,
        order: if topk_first {
            SelectionOrder::TopkThenSoftmax
        } else {
            SelectionOrder::SoftmaxThenTopk
        },
        renormalize: rng.below(2) == 0,
        scale: [1.0, 2.5][rng.below(2)],
        groups,
        topk_groups,
    }
}

/// What a row of generated logits looks like.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    /// Finite values with planted exact ties.
    Finite,
    /// Some rows also all-equal, all NaN, all -inf, with a NaN, with +inf, or with -inf masks.
    WithSpecials,
    /// [`Rows::WithSpecials`] whose finite values are multiples of 0.5 in [-2, 2]: ties
    /// everywhere, and exact in f32 sums of a few.
    TieHeavy,
}

/// Logits `[T, E]`, normal with std 2 (positive when the identity score is renormalized: a
/// sum of signed logits near 0 is ill-conditioned in any precision).
fn random_logits(rng: &mut Rng, config: &RouterConfig, tokens: usize, rows: Rows) -> Vec<f32> {
    let e = config.experts;
    let mut z = rng.normals(tokens * e, 2.0);
    if rows == Rows::TieHeavy {
        z.iter_mut().for_each(|v| *v = (rng.below(9) as f32 - 4.0) * 0.5);
    }
    if config.score == ScoreFunction::Identity && config.renormalize {
        z.iter_mut().for_each(|v| *v = v.abs() + 0.5);
    }
    for row in z.chunks_mut(e) {
        for _ in 0..e / 6 {
            let (a, b) = (rng.below(e), rng.below(e));
            row[a] = row[b];
        }
        if rows != Rows::Finite {
            match rng.below(9) {
                0 => row.fill(0.5),
                1 => row.fill(f32::NAN),
                2 => row.fill(f32::NEG_INFINITY),
                3 => row[rng.below(e)] = f32::NAN,
                4 => row[rng.below(e)] = f32::INFINITY,
                5 => (0..e.div_ceil(3)).for_each(|_| row[rng.below(e)] = f32::NEG_INFINITY),
                _ => {}
            }
        }
    }
    z
}

fn random_bias(rng: &mut Rng, experts: usize) -> Option<Vec<f32>> {
    (rng.below(2) == 0).then(|| rng.normals(experts, 0.05))
}

const EXPERT_COUNTS: [usize; 7] = [1, 3, 8, 60, 64, 256, 1000];
const TOKEN_COUNTS: [usize; 5] = [0, 1, 5, 17, 130];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn select_matches_reference(
        experts in prop::sample::select(EXPERT_COUNTS.to_vec()),
        tokens in prop::sample::select(TOKEN_COUNTS.to_vec()),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let config = random_config(&mut rng, experts);
        let logits = random_logits(&mut rng, &config, tokens, Rows::WithSpecials);
        let bias = random_bias(&mut rng, experts);
        for device in devices() {
            let got = run_select(&device, &config, &logits, bias.as_deref());
            check_selection(&config, &logits, bias.as_deref(), &got);
        }
    }

    #[test]
    fn select_backward_matches_reference(
        experts in prop::sample::select(EXPERT_COUNTS.to_vec()),
        tokens in prop::sample::select(TOKEN_COUNTS.to_vec()),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let config = random_config(&mut rng, experts);
        let logits = random_logits(&mut rng, &config, tokens, Rows::WithSpecials);
        let ids = reference::select(&config, &logits, None).ids;
        let d_weights = rng.normals(ids.len(), 1.0);
        let want = reference::select_backward(&config, &logits, &ids, &d_weights);
        for device in devices() {
            let z = device.upload(&logits).unwrap();
            let ids = device.upload(&ids).unwrap();
            let dw = device.upload(&d_weights).unwrap();
            let mut dz = device.upload(&vec![f32::NAN; logits.len()]).unwrap();
            let before = device.stats();
            router::select_backward(&device, &config, &z, &ids, &dw, &mut dz).unwrap();
            let after = device.stats();
            prop_assert_eq!(after.launches - before.launches, 1);
            prop_assert_eq!(after.host_syncs, before.host_syncs);
            let tol = Tolerance::F32.over(config.k).scaled(config.scale as f64);
            assert_close("dz", &device.download(&dz).unwrap(), &want, tol);
        }
    }
}

/// E in every selection kernel (rows of 32 / 1, 2, 4, 8, 16, 32 lanes), both layouts.
const WIDTH_EXPERTS: [usize; 10] = [3, 8, 32, 60, 64, 100, 256, 320, 512, 1000];

/// A [`random_config`] whose selection keys the kernels compute exactly on tie-heavy logits:
/// the logits themselves (identity, topk_then_softmax), or without groups a softmax or sigmoid
/// of them, a monotone map that keeps every tie and every order of values 0.5 apart.
fn exact_keys_config(rng: &mut Rng, experts: usize) -> RouterConfig {
    let mut config = random_config(rng, experts);
    if config.score != ScoreFunction::Identity && config.order != SelectionOrder::TopkThenSoftmax {
        config.groups = 1;
        config.topk_groups = 1;
    }
    config
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The kernels' N / 32 lanes per row give the warp-per-row mapping's ids, weight bits and
    /// count, at every kernel width, in both layouts (odd views load element by element), on
    /// random and tie-heavy rows with every special row, with and without a bias.
    #[test]
    fn select_matches_warp_per_row_bit_for_bit(
        experts in prop::sample::select(WIDTH_EXPERTS.to_vec()),
        tokens in prop::sample::select(vec![1usize, 5, 19]),
        seed in any::<u64>(),
        odd_views in any::<bool>(),
        tie_heavy in any::<bool>(),
    ) {
        let mut rng = Rng::new(seed);
        let config = random_config(&mut rng, experts);
        let rows = if tie_heavy { Rows::TieHeavy } else { Rows::WithSpecials };
        let logits = random_logits(&mut rng, &config, tokens, rows);
        let bias = random_bias(&mut rng, experts);
        let offset = usize::from(odd_views);
        for device in devices() {
            let rows = run_kernels_at(&device, Kernels::Select, &config, &logits, bias.as_deref(), offset);
            let warps = run_kernels_at(&device, Kernels::WarpPerRow, &config, &logits, bias.as_deref(), offset);
            prop_assert_eq!(&rows.ids, &warps.ids);
            let bits = |w: &[f32]| w.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&rows.weights), bits(&warps.weights));
            prop_assert_eq!(rows.nonfinite_rows, warps.nonfinite_rows);
            check_selection(&config, &logits, bias.as_deref(), &rows);
        }
    }

    /// On tie-heavy rows whose keys are exact (multiples of 0.5, a bias of multiples of 0.25
    /// where keys are logits plus bias), both mappings pick exactly the reference's ids: ties
    /// to the lower id, NaN below -inf, non-finite rows routed nowhere.
    #[test]
    fn select_tie_heavy_ids_equal_the_reference(
        experts in prop::sample::select(WIDTH_EXPERTS.to_vec()),
        tokens in prop::sample::select(vec![1usize, 5, 19]),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let config = exact_keys_config(&mut rng, experts);
        let logits = random_logits(&mut rng, &config, tokens, Rows::TieHeavy);
        let keys_are_logits =
            config.score == ScoreFunction::Identity || config.order == SelectionOrder::TopkThenSoftmax;
        let bias = (keys_are_logits && rng.below(2) == 0)
            .then(|| (0..experts).map(|_| (rng.below(9) as f32 - 4.0) * 0.25).collect::<Vec<_>>());
        let want = reference::select(&config, &logits, bias.as_deref());
        for device in devices() {
            for kernels in [Kernels::Select, Kernels::WarpPerRow] {
                let got = run_kernels_at(&device, kernels, &config, &logits, bias.as_deref(), 0);
                prop_assert_eq!(&got.ids, &want.ids, "{:?}", kernels);
                check_selection(&config, &logits, bias.as_deref(), &got);
            }
        }
    }
}

/// Every E from the register layout's edges, both layouts (E % 4 == 0 loads 16 bytes).
#[test]
fn select_at_every_kernel_width_edge() {
    let mut rng = Rng::new(7);
    for experts in [
        2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1023, 1024,
    ] {
        let config = RouterConfig {
            experts,
            k: experts.min(32),
            ..RouterConfig::default()
        };
        let logits = random_logits(&mut rng, &config, 3, Rows::Finite);
        for device in devices() {
            check_selection(&config, &logits, None, &run_select(&device, &config, &logits, None));
        }
    }
}

/// DeepSeek-V3's router: sigmoid, bias for selection only, 8 groups keep 4, renormalize, 2.5.
#[test]
fn select_deepseek_v3_routing() {
    let mut rng = Rng::new(11);
    let config = RouterConfig::deepseek_v3();
    let logits = random_logits(&mut rng, &config, 9, Rows::Finite);
    let bias = rng.normals(256, 0.5);
    for device in devices() {
        let got = run_select(&device, &config, &logits, Some(&bias));
        check_selection(&config, &logits, Some(&bias), &got);
        // The bias moved the choice, not the weights: they sum to the scale.
        for w in got.weights.chunks(8) {
            assert!((w.iter().sum::<f32>() - 2.5).abs() < 1e-5);
        }
    }
}

/// Ties go to the lower index; NaN ranks below -inf; non-finite rows keep k distinct ids, get
/// zero weights and are counted; the counter adds across calls.
#[test]
fn select_ties_and_nonfinite_rows() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    let config = RouterConfig {
        experts: 6,
        k: 3,
        ..RouterConfig::default()
    };
    #[rustfmt::skip]
    let logits = [
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, // all equal: ids 0, 1, 2, weights 1/6
        0.0, 2.0, 0.0, 2.0, 0.0, 2.0, // planted ties: 1, 3, 5
        nan, nan, nan, nan, nan, nan, // all NaN: routed nowhere (ids -1, weights NaN)
        -inf, -inf, -inf, -inf, -inf, -inf, // all -inf: routed nowhere
        nan, -inf, nan, -inf, 3.0, nan, // one NaN: routed nowhere
        0.0, inf, 1.0, 2.0, 0.0, 0.0, // one +inf: routed nowhere
        -inf, 1.0, -inf, 0.0, -inf, -inf, // -inf masks: 1, 3, 0 with finite weights
    ];
    let no = router::NO_EXPERT;
    let expected_ids = [
        0, 1, 2, 1, 3, 5, no, no, no, no, no, no, no, no, no, no, no, no, 1, 3, 0,
    ];
    for device in devices() {
        let got = run_select(&device, &config, &logits, None);
        assert_eq!(got.ids, expected_ids);
        assert_eq!(got.nonfinite_rows, 4);
        check_selection(&config, &logits, None, &got);
        assert!(got.weights[6..18].iter().all(|w| w.is_nan()), "{:?}", got.weights);
        assert!(got.weights[18..20].iter().all(|&w| w > 0.0) && got.weights[20] == 0.0);

        // The counter accumulates: a second call without zeroing adds 4 more.
        let z = device.upload(&logits).unwrap();
        let mut ids = device.alloc_zeros::<i32>(21).unwrap();
        let mut weights = device.alloc_zeros::<f32>(21).unwrap();
        let mut counter = device.upload(&[10u32]).unwrap();
        router::select(&device, &config, &z, NO_BIAS, &mut ids, &mut weights, &mut counter).unwrap();
        assert_eq!(device.download(&counter).unwrap(), [14]);
    }
}

/// Non-finite rows beside finite ones in the same warp, at every lanes-per-row width (E = 48,
/// 200, 700: 2, 8 and 32 lanes a row), for each option whose weights need a sum over the row's
/// lanes (renormalize, topk_then_softmax): a non-finite row's lanes still join every warp-wide
/// shuffle (an early return left the other rows' lanes waiting in it while its own went on to
/// the counted kernel's block barrier: a deadlock), and every row matches the reference, in the
/// plain and the counted kernel alike.
#[test]
fn nonfinite_rows_beside_finite_rows_with_row_sums() {
    let configs = |experts| {
        [
            RouterConfig {
                experts,
                k: 4,
                score: ScoreFunction::Sigmoid,
                renormalize: true,
                ..RouterConfig::default()
            },
            RouterConfig {
                experts,
                k: 4,
                order: SelectionOrder::TopkThenSoftmax,
                ..RouterConfig::default()
            },
            RouterConfig {
                experts,
                k: 4,
                renormalize: true,
                ..RouterConfig::default()
            },
        ]
    };
    let mut rng = Rng::new(1013);
    for device in devices() {
        for experts in [48, 200, 700] {
            let tokens = 20;
            let mut logits = rng.normals(tokens * experts, 2.0);
            for (t, row) in logits.chunks_mut(experts).enumerate() {
                match t % 5 {
                    1 => row[t % experts] = f32::NAN,
                    3 => row[experts - 1] = f32::INFINITY,
                    _ => {}
                }
            }
            for config in configs(experts) {
                let got = run_select(&device, &config, &logits, None);
                assert_eq!(got.nonfinite_rows, 8, "{config:?}");
                check_selection(&config, &logits, None, &got);
                // The counted kernel: after the selection its lanes meet at block barriers,
                // where a lane that skipped a shuffle would leave its warp waiting.
                let map_config = MapConfig::new(experts);
                let mut map = RoutingMap::alloc(&device, tokens, 4, &map_config).unwrap();
                let mut workspace = device
                    .alloc_zeros::<i32>(map_config.counted_workspace_len(tokens, 4).unwrap())
                    .unwrap();
                let mut target = CountedMap {
                    config: &map_config,
                    map: &mut map,
                    workspace: &mut workspace,
                    zeroed: false,
                };
                let z = device.upload(&logits).unwrap();
                let mut ids = device.alloc_zeros::<i32>(tokens * 4).unwrap();
                let mut weights = device.alloc_zeros::<f32>(tokens * 4).unwrap();
                let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
                router::select_counted(
                    &device,
                    &config,
                    &z,
                    NO_BIAS,
                    &mut ids,
                    &mut weights,
                    &mut nonfinite,
                    Some(&mut target),
                )
                .unwrap_or_else(|e| panic!("{config:?}: {e}"));
                assert_eq!(device.download(&ids).unwrap(), got.ids, "{config:?}");
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&device.download(&weights).unwrap()),
                    bits(&got.weights),
                    "{config:?}"
                );
            }
        }
    }
}

/// Central differences in f64 of `loss` at `z` (each logit moved by ±h, the step actually
/// representable in f32 used as the denominator).
fn finite_differences(z: &[f32], loss: impl Fn(&[f32]) -> f64) -> Vec<f64> {
    let h = 1e-3f32;
    (0..z.len())
        .map(|i| {
            let (mut up, mut down) = (z.to_vec(), z.to_vec());
            up[i] += h;
            down[i] -= h;
            (loss(&up) - loss(&down)) / (up[i] as f64 - down[i] as f64)
        })
        .collect()
}

/// The reference backward is the derivative of the reference forward, for every score /
/// order / renormalize combination, with a scale (ids held fixed; inputs without near-ties).
#[test]
fn reference_select_backward_matches_finite_differences() {
    let mut rng = Rng::new(3);
    let combos = [
        (ScoreFunction::Softmax, SelectionOrder::SoftmaxThenTopk),
        (ScoreFunction::Softmax, SelectionOrder::TopkThenSoftmax),
        (ScoreFunction::Sigmoid, SelectionOrder::SoftmaxThenTopk),
        (ScoreFunction::Identity, SelectionOrder::SoftmaxThenTopk),
    ];
    for (score, order) in combos {
        for renormalize in [false, true] {
            let config = RouterConfig {
                experts: 7,
                k: 3,
                score,
                order,
                renormalize,
                scale: 2.5,
                ..RouterConfig::default()
            };
            let logits = random_logits(&mut rng, &config, 2, Rows::Finite);
            let logits: Vec<f32> = logits.iter().enumerate().map(|(i, v)| v + 0.01 * i as f32).collect();
            let ids = reference::select(&config, &logits, None).ids;
            let dw: Vec<f64> = rng.normals(ids.len(), 1.0).iter().map(|&v| v as f64).collect();
            let loss = |z: &[f32]| -> f64 {
                let weights: Vec<f64> = z
                    .chunks(7)
                    .zip(ids.chunks(3))
                    .flat_map(|(row, ids)| reference::weights_for(&config, row, ids))
                    .collect();
                weights.iter().zip(&dw).map(|(w, g)| w * g).sum()
            };
            let dw32: Vec<f32> = dw.iter().map(|&v| v as f32).collect();
            let analytic = reference::select_backward(&config, &logits, &ids, &dw32);
            let numeric = finite_differences(&logits, loss);
            let as_f32: Vec<f32> = analytic.iter().map(|&v| v as f32).collect();
            assert_close(
                &format!("{score:?} {order:?} renormalize {renormalize}"),
                &as_f32,
                &numeric,
                Tolerance { atol: 1e-4, rtol: 1e-3 },
            );
        }
    }
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Error>, argument: &str) {
    match result {
        Err(Error::Shape { argument: a, .. }) | Err(Error::InvalidArgument { argument: a, .. }) => {
            assert_eq!(a, argument, "wrong argument named")
        }
        other => panic!("expected an error naming `{argument}`, got {other:?}"),
    }
}

#[test]
fn router_config_rejects_every_bad_field() {
    let ok = RouterConfig {
        experts: 64,
        k: 4,
        groups: 8,
        topk_groups: 2,
        ..RouterConfig::default()
    };
    ok.validate().unwrap();
    let cases: [(RouterConfig, &str); 12] = [
        (RouterConfig { experts: 0, ..ok }, "experts"),
        (
            RouterConfig {
                experts: 1025,
                groups: 1,
                topk_groups: 1,
                ..ok
            },
            "experts",
        ),
        (RouterConfig { k: 0, ..ok }, "k"),
        (RouterConfig { k: 33, ..ok }, "k"),
        (
            RouterConfig {
                experts: 3,
                k: 4,
                groups: 1,
                topk_groups: 1,
                ..ok
            },
            "k",
        ),
        (RouterConfig { scale: f32::NAN, ..ok }, "scale"),
        (
            RouterConfig {
                score: ScoreFunction::Sigmoid,
                order: SelectionOrder::TopkThenSoftmax,
                ..ok
            },
            "order",
        ),
        (RouterConfig { groups: 0, ..ok }, "groups"),
        (RouterConfig { groups: 64, ..ok }, "groups"),
        (RouterConfig { groups: 5, ..ok }, "groups"),
        (RouterConfig { topk_groups: 9, ..ok }, "topk_groups"),
        (
            RouterConfig {
                k: 17,
                topk_groups: 2,
                ..ok
            },
            "k",
        ),
    ];
    for (config, argument) in cases {
        assert_invalid(config.validate(), argument);
    }
    assert_invalid(RouterConfig { topk_groups: 0, ..ok }.validate(), "topk_groups");
}

/// Every shape error of select and select_backward, and that nothing was launched.
#[test]
fn select_ops_reject_bad_shapes_before_launching() {
    let config = RouterConfig {
        experts: 8,
        k: 2,
        ..RouterConfig::default()
    };
    for device in devices() {
        let buf = |n: usize| device.alloc_zeros::<f32>(n).unwrap();
        let ibuf = |n: usize| device.alloc_zeros::<i32>(n).unwrap();
        let (z, bias, bad_bias) = (buf(24), buf(8), buf(7));
        let (mut ids, mut w, mut counter) = (ibuf(6), buf(6), device.alloc_zeros::<u32>(1).unwrap());
        let before = device.stats().launches;
        let bad = RouterConfig { k: 0, ..config };
        assert_invalid(
            router::select(&device, &bad, &z, NO_BIAS, &mut ids, &mut w, &mut counter),
            "k",
        );
        assert_invalid(
            router::select(&device, &config, &buf(25), NO_BIAS, &mut ids, &mut w, &mut counter),
            "logits",
        );
        assert_invalid(
            router::select(&device, &config, &z, Some(&bad_bias), &mut ids, &mut w, &mut counter),
            "bias",
        );
        assert_invalid(
            router::select(&device, &config, &z, Some(&bias), &mut ibuf(5), &mut w, &mut counter),
            "ids",
        );
        assert_invalid(
            router::select(&device, &config, &z, Some(&bias), &mut ids, &mut buf(7), &mut counter),
            "weights",
        );
        let mut two = device.alloc_zeros::<u32>(2).unwrap();
        assert_invalid(
            router::select(&device, &config, &z, Some(&bias), &mut ids, &mut w, &mut two),
            "nonfinite_rows",
        );
        let mut dz = buf(24);
        assert_invalid(router::select_backward(&device, &bad, &z, &ids, &w, &mut dz), "k");
        assert_invalid(
            router::select_backward(&device, &config, &buf(23), &ids, &w, &mut dz),
            "logits",
        );
        assert_invalid(
            router::select_backward(&device, &config, &z, &ibuf(4), &w, &mut dz),
            "ids",
        );
        assert_invalid(
            router::select_backward(&device, &config, &z, &ids, &buf(5), &mut dz),
            "d_weights",
        );
        assert_invalid(
            router::select_backward(&device, &config, &z, &ids, &w, &mut buf(16)),
            "dz",
        );
        assert_eq!(device.stats().launches, before, "a rejected call launched a kernel");
    }
}

/// `[T, k]` ids with some out of range (-1, E), which count nowhere, and their weights.
fn random_slots(rng: &mut Rng, experts: usize, slots: usize) -> (Vec<i32>, Vec<f32>) {
    let ids = (0..slots).map(|_| rng.below(experts + 2) as i32 - 1).collect();
    (ids, (0..slots).map(|_| rng.uniform(0.0, 1.0)).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn expert_statistics_match_reference(
        experts in prop::sample::select(EXPERT_COUNTS.to_vec()),
        tokens in prop::sample::select(vec![0usize, 1, 7, 300]),
        k in 1usize..=8,
        seed in any::<u64>(),
    ) {
        let config = RouterConfig { experts, k: k.min(experts), ..RouterConfig::default() };
        let mut rng = Rng::new(seed);
        let (ids, weights) = random_slots(&mut rng, experts, tokens * config.k);
        let want_counts = reference::expert_counts(experts, &ids);
        let want_sums = reference::expert_weight_sums(experts, &ids, &weights);
        for device in devices() {
            let (d_ids, d_w) = (device.upload(&ids).unwrap(), device.upload(&weights).unwrap());
            let mut counts = device.upload(&vec![-7i32; experts]).unwrap();
            let mut sums = device.upload(&vec![f32::NAN; experts]).unwrap();
            let workspace_len = router::expert_statistics_workspace_len(&config, tokens).unwrap();
            let mut ws = device.upload(&vec![f32::NAN; workspace_len]).unwrap();
            let before = device.stats();
            router::expert_statistics(&device, &config, &d_ids, &d_w, &mut ws, &mut counts, &mut sums).unwrap();
            let after = device.stats();
            prop_assert_eq!(after.launches - before.launches, 2);
            prop_assert_eq!(after.host_syncs, before.host_syncs);
            prop_assert_eq!(&device.download(&counts).unwrap(), &want_counts);
            let got_sums = device.download(&sums).unwrap();
            assert_close("weight sums", &got_sums, &want_sums, Tolerance::F32.over(tokens * config.k));
            // Fixed reduction order: a second run gives the same bits.
            router::expert_statistics(&device, &config, &d_ids, &d_w, &mut ws, &mut counts, &mut sums).unwrap();
            prop_assert_eq!(device.download(&sums).unwrap(), got_sums);
            let mut only_counts = device.alloc_zeros::<i32>(experts).unwrap();
            router::expert_counts(&device, &config, &d_ids, &mut only_counts).unwrap();
            prop_assert_eq!(&device.download(&only_counts).unwrap(), &want_counts);
        }
    }

    #[test]
    fn aux_loss_matches_reference(
        experts in prop::sample::select(vec![1usize, 3, 8, 60, 256]),
        segments in 0usize..=3,
        segment_len in prop::sample::select(vec![1usize, 4, 9, 150]),
        sequence_level in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let router = RouterConfig { experts, k: 1 + rng.below(experts.min(4)), ..RouterConfig::default() };
        let tokens = segments * segment_len;
        let aux = AuxLossConfig {
            alpha: 0.01 * (1 + rng.below(4)) as f32,
            sequence_length: sequence_level.then_some(segment_len),
        };
        let logits = random_logits(&mut rng, &router, tokens, Rows::WithSpecials);
        let ids = reference::select(&router, &logits, None).ids;
        let dz0 = rng.normals(logits.len(), 1.0);
        let want_loss = reference::aux_loss(&router, &aux, &logits, &ids);
        let mut want_dz: Vec<f64> = dz0.iter().map(|&v| v as f64).collect();
        reference::aux_loss_backward(&router, &aux, &logits, &ids, &mut want_dz);
        for device in devices() {
            let (z, d_ids) = (device.upload(&logits).unwrap(), device.upload(&ids).unwrap());
            let mut workspace = AuxLossWorkspace::new(&device, &router, &aux, tokens).unwrap();
            let mut loss = device.alloc_zeros::<f32>(1).unwrap();
            let mut dz = device.upload(&dz0).unwrap();
            let before = device.stats();
            router::aux_loss(&device, &router, &aux, &z, &d_ids, &mut workspace, &mut loss).unwrap();
            router::aux_loss_backward(&device, &router, &aux, &z, &workspace, &mut dz).unwrap();
            let after = device.stats();
            prop_assert_eq!(after.launches - before.launches, 2, "aux loss: 1 launch, backward: 1");
            prop_assert_eq!(after.host_syncs, before.host_syncs);
            // A scalar: relative error of f32 sums, not an absolute one growing with T * E.
            let tol = Tolerance { atol: 1e-7, rtol: 1e-4 };
            assert_close("aux loss", &device.download(&loss).unwrap(), &[want_loss], tol);
            assert_close("dz + aux grad", &device.download(&dz).unwrap(), &want_dz, Tolerance::F32.over(experts));
        }
    }

    #[test]
    fn z_loss_matches_reference(
        experts in prop::sample::select(EXPERT_COUNTS.to_vec()),
        tokens in prop::sample::select(TOKEN_COUNTS.to_vec()),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let router = RouterConfig { experts, k: 1, ..RouterConfig::default() };
        let coefficient = 1e-3 * (1 + rng.below(10)) as f32;
        let logits = random_logits(&mut rng, &router, tokens, Rows::WithSpecials);
        let dz0 = rng.normals(logits.len(), 1.0);
        let want_loss = reference::z_loss(experts, coefficient, &logits);
        let mut want_dz: Vec<f64> = dz0.iter().map(|&v| v as f64).collect();
        reference::z_loss_backward(experts, coefficient, &logits, &mut want_dz);
        for device in devices() {
            let z = device.upload(&logits).unwrap();
            let mut workspace = ZLossWorkspace::new(&device, tokens).unwrap();
            let mut loss = device.upload(&[f32::NAN]).unwrap();
            let mut dz = device.upload(&dz0).unwrap();
            let before = device.stats();
            router::z_loss(&device, &router, coefficient, &z, &mut workspace, &mut loss).unwrap();
            router::z_loss_backward(&device, &router, coefficient, &z, &workspace, &mut dz).unwrap();
            let after = device.stats();
            prop_assert_eq!(after.launches - before.launches, 2, "z-loss: 1 launch, backward: 1");
            prop_assert_eq!(after.host_syncs, before.host_syncs);
            let tol = Tolerance { atol: 1e-7, rtol: 1e-4 };
            assert_close("z-loss", &device.download(&loss).unwrap(), &[want_loss], tol);
            assert_close("dz + z-loss grad", &device.download(&dz).unwrap(), &want_dz, Tolerance::F32.over(experts));
        }
    }

    /// `router::losses` with both targets is one launch whose aux loss, z-loss, counts, row LSEs
    /// and live rows match the references, have the bits of the single-loss calls (the z-loss's
    /// only at token level: a sequence-level aux loss chunks the rows per sequence), and the same
    /// bits when run again (the grid's ticket was reset). `router::losses_backward` with both is
    /// one launch with the bits of the two single-loss backward calls.
    #[test]
    fn losses_in_one_launch_match_the_single_loss_calls(
        experts in prop::sample::select(vec![3usize, 60, 256, 1000]),
        segments in 0usize..=3,
        segment_len in prop::sample::select(vec![1usize, 9, 70]),
        sequence_level in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let router = RouterConfig { experts, k: 1 + rng.below(experts.min(4)), ..RouterConfig::default() };
        let tokens = segments * segment_len;
        let aux = AuxLossConfig { alpha: 0.02, sequence_length: sequence_level.then_some(segment_len) };
        let coefficient = 1e-3;
        let logits = random_logits(&mut rng, &router, tokens, Rows::WithSpecials);
        let ids = reference::select(&router, &logits, None).ids;
        let want = [reference::aux_loss(&router, &aux, &logits, &ids), reference::z_loss(experts, coefficient, &logits)];
        let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for device in devices() {
            let (z, d_ids) = (device.upload(&logits).unwrap(), device.upload(&ids).unwrap());
            // The single-loss calls.
            let mut aux_alone = AuxLossWorkspace::new(&device, &router, &aux, tokens).unwrap();
            let mut z_alone = ZLossWorkspace::new(&device, tokens).unwrap();
            let mut single = [device.alloc_zeros::<f32>(1).unwrap(), device.alloc_zeros::<f32>(1).unwrap()];
            router::aux_loss(&device, &router, &aux, &z, &d_ids, &mut aux_alone, &mut single[0]).unwrap();
            router::z_loss(&device, &router, coefficient, &z, &mut z_alone, &mut single[1]).unwrap();
            // Both in one launch, twice, the losses reset to NaN in between.
            let mut aux_ws = AuxLossWorkspace::new(&device, &router, &aux, tokens).unwrap();
            let mut z_ws = ZLossWorkspace::new(&device, tokens).unwrap();
            let inputs = LossInputs { router: &router, aux: &aux, coefficient, z: &z, ids: &d_ids };
            let runs = losses_twice(&device, &inputs, &mut aux_ws, &mut z_ws);
            prop_assert_eq!(runs[0].map(f32::to_bits), runs[1].map(f32::to_bits), "a second launch differs");
            let tol = Tolerance { atol: 1e-7, rtol: 1e-4 };
            assert_close("aux loss, z-loss", &runs[0], &want, tol);
            prop_assert_eq!(runs[0][0].to_bits(), device.download(&single[0]).unwrap()[0].to_bits(), "aux loss bits");
            if !sequence_level {
                prop_assert_eq!(runs[0][1].to_bits(), device.download(&single[1]).unwrap()[0].to_bits(), "z-loss bits");
            }
            // What the backward passes read.
            prop_assert_eq!(device.download(aux_ws.counts()).unwrap(), device.download(aux_alone.counts()).unwrap());
            prop_assert_eq!(device.download(aux_ws.live_rows()).unwrap(), device.download(aux_alone.live_rows()).unwrap());
            prop_assert_eq!(device.download(z_ws.live_rows()).unwrap(), device.download(z_alone.live_rows()).unwrap());
            prop_assert_eq!(bits(device.download(z_ws.row_lse()).unwrap()), bits(device.download(z_alone.row_lse()).unwrap()));
            let live: i32 = logits.chunks(experts).filter(|row| reference::row_logsumexp(row).is_some()).count() as i32;
            prop_assert_eq!(device.download(z_ws.live_rows()).unwrap(), vec![live]);
            // Both gradients in one launch have the bits of the two single-loss backward calls.
            let dz0 = rng.normals(logits.len(), 1.0);
            let (mut dz_two, mut dz_one) = (device.upload(&dz0).unwrap(), device.upload(&dz0).unwrap());
            router::aux_loss_backward(&device, &router, &aux, &z, &aux_alone, &mut dz_two).unwrap();
            router::z_loss_backward(&device, &router, coefficient, &z, &z_alone, &mut dz_two).unwrap();
            let before = device.stats();
            router::losses_backward(&device, &router, &z, Some((&aux, &aux_ws)), Some((coefficient, &z_ws)), &mut dz_one)
                .unwrap();
            let after = device.stats();
            prop_assert_eq!(after.launches - before.launches, 1);
            prop_assert_eq!(after.host_syncs, before.host_syncs);
            prop_assert_eq!(bits(device.download(&dz_one).unwrap()), bits(device.download(&dz_two).unwrap()));
            let mut want_dz: Vec<f64> = dz0.iter().map(|&v| v as f64).collect();
            reference::aux_loss_backward(&router, &aux, &logits, &ids, &mut want_dz);
            reference::z_loss_backward(experts, coefficient, &logits, &mut want_dz);
            assert_close("dz + both gradients", &device.download(&dz_one).unwrap(), &want_dz, Tolerance::F32.over(experts));
            // Asking for neither launches nothing.
            router::losses_backward(&device, &router, &z, None, None, &mut dz_one).unwrap();
            let before = device.stats().launches;
            router::losses(
                &device,
                &router,
                &z,
                None::<AuxLossTarget<'_, DeviceBuffer<i32>, DeviceBuffer<f32>>>,
                None::<ZLossTarget<'_, DeviceBuffer<f32>>>,
            )
            .unwrap();
            prop_assert_eq!(device.stats().launches, before);
        }
    }
}

/// The logits, ids and workspaces of one batch's losses.
struct LossInputs<'a> {
    router: &'a RouterConfig,
    aux: &'a AuxLossConfig,
    coefficient: f32,
    z: &'a DeviceBuffer<f32>,
    ids: &'a DeviceBuffer<i32>,
}

/// `router::losses` with both targets, twice on the same workspaces (into fresh NaN losses each
/// time), asserting one launch and no memset or host sync each time; both runs' losses.
fn losses_twice(
    device: &Device,
    inputs: &LossInputs<'_>,
    aux_ws: &mut AuxLossWorkspace,
    z_ws: &mut ZLossWorkspace,
) -> [[f32; 2]; 2] {
    [0, 1].map(|_| {
        let mut aux_loss = device.upload(&[f32::NAN]).unwrap();
        let mut z_loss = device.upload(&[f32::NAN]).unwrap();
        let before = device.stats();
        router::losses(
            device,
            inputs.router,
            inputs.z,
            Some(AuxLossTarget {
                config: inputs.aux,
                ids: inputs.ids,
                workspace: aux_ws,
                loss: &mut aux_loss,
            }),
            Some(ZLossTarget {
                coefficient: inputs.coefficient,
                workspace: z_ws,
                loss: &mut z_loss,
            }),
        )
        .unwrap();
        let after = device.stats();
        assert_eq!(after.launches - before.launches, 1, "launches");
        assert_eq!((after.host_syncs, after.memsets), (before.host_syncs, before.memsets));
        [
            device.download(&aux_loss).unwrap()[0],
            device.download(&z_loss).unwrap()[0],
        ]
    })
}

/// `router::losses` past one group of 32 chunks (64 rows a chunk): a group's last block adds its
/// chunks and the grid's last block the groups. A segment of 33 chunks ends in a group of one
/// (its own sum), one of 67 in a group of 3, and two sequences of 34 chunks end in groups of 2.
/// Both losses, the per-sequence counts and live rows match the references, and a second launch
/// has the same bits (every ticket was reset); the z-loss alone matches its reference too.
#[test]
fn losses_add_chunk_groups_then_groups() {
    let chunk = 64;
    for (experts, segments, segment_len, sequence_level) in [
        (8, 1, 33 * chunk, false),
        (60, 1, 66 * chunk + 5, false),
        (8, 2, 34 * chunk, true),
    ] {
        let mut rng = Rng::new(segment_len as u64);
        let router = RouterConfig {
            experts,
            k: 2,
            ..RouterConfig::default()
        };
        let tokens = segments * segment_len;
        let aux = AuxLossConfig {
            alpha: 0.02,
            sequence_length: sequence_level.then_some(segment_len),
        };
        let coefficient = 1e-3;
        let logits = random_logits(&mut rng, &router, tokens, Rows::WithSpecials);
        let ids = reference::select(&router, &logits, None).ids;
        let want = [
            reference::aux_loss(&router, &aux, &logits, &ids),
            reference::z_loss(experts, coefficient, &logits),
        ];
        let (sequences, sequence_len) = if sequence_level {
            (segments, segment_len)
        } else {
            (1, tokens)
        };
        let (mut want_counts, mut want_live) = (Vec::new(), Vec::new());
        for s in 0..sequences {
            let rows = s * sequence_len..(s + 1) * sequence_len;
            want_counts.extend(reference::expert_counts(experts, &ids[rows.start * 2..rows.end * 2]));
            let live = logits[rows.start * experts..rows.end * experts]
                .chunks(experts)
                .filter(|row| reference::row_logsumexp(row).is_some())
                .count();
            want_live.push(live as i32);
        }
        for device in devices() {
            let (z, d_ids) = (device.upload(&logits).unwrap(), device.upload(&ids).unwrap());
            let mut aux_ws = AuxLossWorkspace::new(&device, &router, &aux, tokens).unwrap();
            let mut z_ws = ZLossWorkspace::new(&device, tokens).unwrap();
            let inputs = LossInputs {
                router: &router,
                aux: &aux,
                coefficient,
                z: &z,
                ids: &d_ids,
            };
            let runs = losses_twice(&device, &inputs, &mut aux_ws, &mut z_ws);
            let case = format!("E = {experts}, {segments} x {segment_len} tokens, sequence level {sequence_level}");
            assert_eq!(
                runs[0].map(f32::to_bits),
                runs[1].map(f32::to_bits),
                "{case}: a second launch differs"
            );
            assert_close(&case, &runs[0], &want, Tolerance { atol: 1e-7, rtol: 1e-4 });
            assert_eq!(device.download(aux_ws.counts()).unwrap(), want_counts, "{case}: counts");
            assert_eq!(
                device.download(aux_ws.live_rows()).unwrap(),
                want_live,
                "{case}: live rows"
            );
            let live: i32 = want_live.iter().sum();
            assert_eq!(
                device.download(z_ws.live_rows()).unwrap(),
                vec![live],
                "{case}: z live rows"
            );
            // The z-loss alone: its own workspace's group tickets and chunking.
            let mut z_alone = ZLossWorkspace::new(&device, tokens).unwrap();
            let mut z_loss = device.upload(&[f32::NAN]).unwrap();
            router::z_loss(&device, &router, coefficient, &z, &mut z_alone, &mut z_loss).unwrap();
            let alone = device.download(&z_loss).unwrap();
            assert_close(
                &format!("{case}: z-loss alone"),
                &alone,
                &want[1..],
                Tolerance { atol: 1e-7, rtol: 1e-4 },
            );
            assert_eq!(
                device.download(z_alone.live_rows()).unwrap(),
                vec![live],
                "{case}: z-loss alone's live rows"
            );
        }
    }
}

/// The loss references' gradients against finite differences (ids held fixed).
#[test]
fn reference_loss_gradients_match_finite_differences() {
    let mut rng = Rng::new(5);
    let router = RouterConfig {
        experts: 6,
        k: 2,
        ..RouterConfig::default()
    };
    let logits = random_logits(&mut rng, &router, 4, Rows::Finite);
    let ids = reference::select(&router, &logits, None).ids;
    for sequence_length in [None, Some(2)] {
        let aux = AuxLossConfig {
            alpha: 0.5,
            sequence_length,
        };
        let mut analytic = vec![0.0; logits.len()];
        reference::aux_loss_backward(&router, &aux, &logits, &ids, &mut analytic);
        let numeric = finite_differences(&logits, |z| reference::aux_loss(&router, &aux, z, &ids));
        let analytic: Vec<f32> = analytic.iter().map(|&v| v as f32).collect();
        assert_close(
            "aux loss gradient",
            &analytic,
            &numeric,
            Tolerance { atol: 1e-4, rtol: 1e-3 },
        );
    }
    let mut analytic = vec![0.0; logits.len()];
    reference::z_loss_backward(6, 0.1, &logits, &mut analytic);
    let numeric = finite_differences(&logits, |z| reference::z_loss(6, 0.1, z));
    let analytic: Vec<f32> = analytic.iter().map(|&v| v as f32).collect();
    assert_close(
        "z-loss gradient",
        &analytic,
        &numeric,
        Tolerance { atol: 1e-4, rtol: 1e-3 },
    );
}

/// Under-loaded experts (count below the mean) gain gamma, over-loaded lose it, exactly-average
/// ones stay; the mean 14/4 = 3.5 is not an integer, the mean 12/4 = 3 is.
#[test]
fn bias_update_matches_reference() {
    for counts in [vec![0, 3, 4, 7], vec![3, 3, 6, 0], vec![5; 1000]] {
        let mut rng = Rng::new(counts.len() as u64);
        let bias = rng.normals(counts.len(), 0.1);
        let want = reference::bias_update(1e-3, &counts, &bias);
        for device in devices() {
            let d_counts = device.upload(&counts).unwrap();
            let mut d_bias = device.upload(&bias).unwrap();
            let before = device.stats();
            router::bias_update(&device, 1e-3, &d_counts, &mut d_bias).unwrap();
            assert_eq!(device.stats().launches - before.launches, 1);
            assert_eq!(device.stats().host_syncs, before.host_syncs);
            assert_eq!(device.download(&d_bias).unwrap(), want);
        }
    }
}

/// Every validation error of the statistics, loss and bias-update ops; nothing launched.
#[test]
fn balance_ops_reject_bad_arguments_before_launching() {
    let router = RouterConfig {
        experts: 8,
        k: 2,
        ..RouterConfig::default()
    };
    let aux = AuxLossConfig {
        alpha: 0.01,
        sequence_length: Some(2),
    };
    for device in devices() {
        let buf = |n: usize| device.alloc_zeros::<f32>(n).unwrap();
        let ibuf = |n: usize| device.alloc_zeros::<i32>(n).unwrap();
        let (z, ids) = (buf(32), ibuf(8));
        let before = device.stats().launches;
        let ws_len = router::expert_statistics_workspace_len(&router, 4).unwrap();
        // Lengths of (ids, weights, workspace, counts, weight_sums), one of them wrong.
        let stats_cases = [
            ([7, 8, ws_len, 8, 8], "ids"),
            ([8, 6, ws_len, 8, 8], "weights"),
            ([8, 8, ws_len + 1, 8, 8], "workspace"),
            ([8, 8, ws_len, 7, 8], "counts"),
            ([8, 8, ws_len, 8, 9], "weight_sums"),
        ];
        for ([ids, weights, ws, counts, sums], argument) in stats_cases {
            let (ids, weights, mut ws) = (ibuf(ids), buf(weights), buf(ws));
            let result = router::expert_statistics(
                &device,
                &router,
                &ids,
                &weights,
                &mut ws,
                &mut ibuf(counts),
                &mut buf(sums),
            );
            assert_invalid(result, argument);
        }
        assert_invalid(router::expert_counts(&device, &router, &ids, &mut ibuf(9)), "counts");

        let bad_alpha = AuxLossConfig {
            alpha: f32::INFINITY,
            ..aux
        };
        assert_invalid(
            AuxLossWorkspace::new(&device, &router, &bad_alpha, 4).map(|_| ()),
            "alpha",
        );
        let zero_len = AuxLossConfig {
            sequence_length: Some(0),
            ..aux
        };
        assert_invalid(
            AuxLossWorkspace::new(&device, &router, &zero_len, 4).map(|_| ()),
            "sequence_length",
        );
        let odd = AuxLossConfig {
            sequence_length: Some(3),
            ..aux
        };
        assert_invalid(
            AuxLossWorkspace::new(&device, &router, &odd, 4).map(|_| ()),
            "sequence_length",
        );
        let mut ws = AuxLossWorkspace::new(&device, &router, &aux, 4).unwrap();
        let mut other_ws = AuxLossWorkspace::new(&device, &router, &AuxLossConfig::default(), 4).unwrap();
        let mut loss = buf(1);
        assert_invalid(
            router::aux_loss(&device, &router, &aux, &buf(31), &ids, &mut ws, &mut loss),
            "logits",
        );
        assert_invalid(
            router::aux_loss(&device, &router, &aux, &z, &ibuf(6), &mut ws, &mut loss),
            "ids",
        );
        assert_invalid(
            router::aux_loss(&device, &router, &aux, &z, &ids, &mut other_ws, &mut loss),
            "workspace",
        );
        assert_invalid(
            router::aux_loss(&device, &router, &aux, &z, &ids, &mut ws, &mut buf(2)),
            "loss",
        );
        assert_invalid(
            router::aux_loss(&device, &router, &odd, &z, &ids, &mut ws, &mut loss),
            "sequence_length",
        );
        assert_invalid(
            router::aux_loss_backward(&device, &router, &aux, &z, &other_ws, &mut buf(32)),
            "workspace",
        );
        assert_invalid(
            router::aux_loss_backward(&device, &router, &aux, &z, &ws, &mut buf(31)),
            "dz",
        );

        let mut lse = ZLossWorkspace::new(&device, 4).unwrap();
        assert_invalid(
            router::z_loss(&device, &router, f32::NAN, &z, &mut lse, &mut loss),
            "coefficient",
        );
        assert_invalid(
            router::z_loss(
                &device,
                &router,
                0.1,
                &z,
                &mut ZLossWorkspace::new(&device, 3).unwrap(),
                &mut loss,
            ),
            "workspace",
        );
        assert_invalid(router::z_loss(&device, &router, 0.1, &z, &mut lse, &mut buf(0)), "loss");
        assert_invalid(
            router::z_loss_backward(&device, &router, 0.1, &z, &lse, &mut buf(8)),
            "dz",
        );
        assert_invalid(
            router::z_loss_backward(&device, &router, 0.1, &buf(30), &lse, &mut buf(30)),
            "logits",
        );
        // With both targets, either one's bad argument is refused before the launch: a z-loss
        // workspace too small for T = 4, then an aux loss buffer of 2 elements.
        for (aux_loss_len, z_rows, argument) in [(1, 3, "workspace"), (2, 4, "loss")] {
            let mut z_workspace = ZLossWorkspace::new(&device, z_rows).unwrap();
            let (mut aux_loss, mut z_loss) = (buf(aux_loss_len), buf(1));
            let aux_target = AuxLossTarget {
                config: &aux,
                ids: &ids,
                workspace: &mut ws,
                loss: &mut aux_loss,
            };
            let z_target = ZLossTarget {
                coefficient: 0.1,
                workspace: &mut z_workspace,
                loss: &mut z_loss,
            };
            assert_invalid(
                router::losses(&device, &router, &z, Some(aux_target), Some(z_target)),
                argument,
            );
        }

        assert_invalid(router::bias_update(&device, f32::NAN, &ibuf(8), &mut buf(8)), "gamma");
        assert_invalid(router::bias_update(&device, 1e-3, &ibuf(7), &mut buf(8)), "counts");
        assert_invalid(router::bias_update(&device, 1e-3, &ibuf(0), &mut buf(0)), "bias");
        assert_eq!(device.stats().launches, before, "a rejected call launched a kernel");
    }
}

/// Slots whose id is out of range or repeats an earlier slot's get no gradient and are not
/// read out of bounds: the same dz as the reference with those slots moved to unused experts
/// with a zero d_weight (equivalent for the dense softmax and plain sigmoid backward).
#[test]
fn select_backward_ignores_invalid_and_repeated_ids() {
    let mut rng = Rng::new(13);
    for score in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        let config = RouterConfig {
            experts: 8,
            k: 4,
            score,
            scale: 2.5,
            ..RouterConfig::default()
        };
        let logits = random_logits(&mut rng, &config, 2, Rows::Finite);
        let ids = [3, -1, 3, 8, 5, 1, 5, 100];
        let d_weights = rng.normals(8, 1.0);
        let moved_ids = [3, 0, 1, 2, 5, 1, 0, 2];
        let moved_dw: Vec<f32> = d_weights
            .iter()
            .zip(&ids)
            .zip(&moved_ids)
            .map(|((&g, a), b)| if a == b { g } else { 0.0 })
            .collect();
        let want = reference::select_backward(&config, &logits, &moved_ids, &moved_dw);
        for device in devices() {
            let (z, d_ids, dw) = (
                device.upload(&logits).unwrap(),
                device.upload(&ids).unwrap(),
                device.upload(&d_weights).unwrap(),
            );
            let mut dz = device.alloc_zeros::<f32>(16).unwrap();
            router::select_backward(&device, &config, &z, &d_ids, &dw, &mut dz).unwrap();
            assert_close(
                &format!("{score:?} dz"),
                &device.download(&dz).unwrap(),
                &want,
                Tolerance::F32,
            );
        }
    }
}

/// A NaN bias entry ranks its expert lowest (like a NaN score); +inf ranks it first; the
/// weights still come from the unbiased scores.
#[test]
fn select_with_non_finite_bias_entries() {
    let config = RouterConfig {
        experts: 5,
        k: 2,
        ..RouterConfig::default()
    };
    let logits = [4.0, 3.0, 2.0, 1.0, 0.0];
    let bias = [f32::NAN, 0.0, 0.0, f32::INFINITY, 0.0];
    for device in devices() {
        let got = run_select(&device, &config, &logits, Some(&bias));
        assert_eq!(got.ids, [3, 1]);
        assert_eq!(got.nonfinite_rows, 0);
        check_selection(&config, &logits, Some(&bias), &got);
    }
}

/// In the profiling build (`MOE_EMU_PROFILE=1`): select and its backward touch exactly the
/// bytes of their floor (nothing else is read or written), and the backward reads z once.
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn select_and_backward_touch_only_their_floor_bytes() {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let (tokens, e, k) = (12u64, 256u64, 8u64);
    let config = RouterConfig {
        experts: e as usize,
        k: k as usize,
        score: ScoreFunction::Sigmoid,
        renormalize: true,
        ..RouterConfig::default()
    };
    let mut rng = Rng::new(17);
    let logits = random_logits(&mut rng, &config, tokens as usize, Rows::Finite);
    let bias = rng.normals(e as usize, 0.1);
    let selected = run_select(&device, &config, &logits, Some(&bias));
    let [p] = <[_; 1]>::try_from(emulator.take_profiles()).unwrap();
    assert_eq!(p.kernel, "router_select_e256_f32");
    assert_eq!(p.unique_global_load_bytes, 4 * (tokens * e + e), "z and bias");
    assert_eq!(p.unique_global_store_bytes, 8 * tokens * k, "ids and weights");
    // Rows vectorise: each 16-byte load of z covers 4 rows of 8 lanes, 128 contiguous bytes
    // each: 16 sectors per request (the bias, the same for every row, is left out here).
    run_select(&device, &config, &logits, None);
    let [p] = <[_; 1]>::try_from(emulator.take_profiles()).unwrap();
    let vector_loads: Vec<_> = p
        .sites
        .iter()
        .filter(|s| s.space == Space::Global && s.access == Access::Load)
        .filter(|s| s.traffic.bytes == 16 * s.traffic.lane_accesses)
        .collect();
    assert!(!vector_loads.is_empty(), "no 16-byte loads of z");
    for site in vector_loads {
        assert_eq!(site.traffic.sectors_per_request(), 16.0, "{:?}", site.traffic);
    }

    let (z, ids) = (device.upload(&logits).unwrap(), device.upload(&selected.ids).unwrap());
    let dw = device.upload(&selected.weights).unwrap();
    let mut dz = device.alloc_zeros::<f32>(logits.len()).unwrap();
    router::select_backward(&device, &config, &z, &ids, &dw, &mut dz).unwrap();
    let [p] = <[_; 1]>::try_from(emulator.take_profiles()).unwrap();
    assert_eq!(
        p.unique_global_load_bytes,
        4 * tokens * e + 8 * tokens * k,
        "z, ids, d_weights"
    );
    assert_eq!(p.unique_global_store_bytes, 4 * tokens * e, "dz");
    // z once (sigmoid needs no softmax sum), plus the k selected logits again.
    assert!(
        p.global_load_redundancy() <= 1.0 + k as f64 / e as f64 + 1e-9,
        "{}",
        p.global_load_redundancy()
    );
}

/// In the profiling build: `router::losses` with both targets reads z and the ids once from
/// memory, and beyond them only its own row LSEs, per-chunk partials and tickets; it reduces the
/// partials in levels (a ticket per chunk in its group, one per group in its segment); and every
/// full-warp load is coalesced (16-byte row loads at 16 sectors a request, 4-byte column loads
/// at 4).
#[test]
#[cfg_attr(
    not(moe_emu_profile),
    ignore = "needs the profiling build: MOE_EMU_PROFILE=1 (clang-19); CI runs it"
)]
fn losses_read_z_and_ids_once() {
    let emulator = EmulatorDevice::from_env().unwrap().profiling().unwrap();
    let device = Device::Emulator(emulator.clone());
    let (tokens, e, k, chunks) = (34 * 64u64, 64u64, 4u64, 34u64);
    let router = RouterConfig {
        experts: e as usize,
        k: k as usize,
        ..RouterConfig::default()
    };
    let aux = AuxLossConfig::default();
    let mut rng = Rng::new(23);
    let logits = random_logits(&mut rng, &router, tokens as usize, Rows::Finite);
    let ids = reference::select(&router, &logits, None).ids;
    let (z, d_ids) = (device.upload(&logits).unwrap(), device.upload(&ids).unwrap());
    let mut aux_ws = AuxLossWorkspace::new(&device, &router, &aux, tokens as usize).unwrap();
    let mut z_ws = ZLossWorkspace::new(&device, tokens as usize).unwrap();
    let inputs = LossInputs {
        router: &router,
        aux: &aux,
        coefficient: 1e-3,
        z: &z,
        ids: &d_ids,
    };
    losses_twice(&device, &inputs, &mut aux_ws, &mut z_ws);
    // The second launch's profile: the first's again (the uploads of the NaN losses are no launch).
    let [_, p] = <[_; 2]>::try_from(emulator.take_profiles()).unwrap();
    assert_eq!(p.kernel, "router_losses_f32");
    assert_eq!(p.config.grid, (1, 1, chunks as u32), "64 rows a chunk");
    // Per chunk: its finite rows and their LSE^2 sum, then E counts and E probability sums. The
    // groups of chunks 0..32 and 32..34 sum theirs into the slots of chunks 0 and 32.
    let partials = 4 * chunks * (2 + 2 * e);
    // The tickets: the groups' (chunks 0 and 32) and the segment's (chunk 33); one segment
    // takes no grid ticket. The segment's live rows are read from its partial slot, not back
    // from live_rows.
    let groups = 2;
    let (tickets, live_rows) = (4 * groups + 4, 4);
    assert_eq!(
        p.unique_global_load_bytes,
        4 * tokens * e + 4 * tokens * k + 4 * tokens + partials + tickets,
        "z, ids, the row LSEs read back, the partials, the tickets"
    );
    let results = 4 * e + live_rows + 4 + 4 + 4;
    assert_eq!(
        p.unique_global_store_bytes,
        2 * 4 * tokens + partials + tickets + results,
        "row LSEs (both workspaces), partials, tickets, counts, live rows, both losses and z's live rows"
    );
    // Every chunk takes its group's ticket, every group its segment's: not one level.
    let atomics = p.traffic(Space::Global, Access::Atomic);
    assert_eq!(atomics.lane_accesses, chunks + groups, "{atomics:?}");
    let full_warp_loads: Vec<_> = p
        .sites
        .iter()
        .filter(|s| s.space == Space::Global && s.access == Access::Load)
        .filter(|s| s.traffic.lane_accesses == 32 * s.traffic.requests)
        .collect();
    assert!(full_warp_loads.len() >= 3, "{full_warp_loads:?}");
    for site in full_warp_loads {
        assert!(
            32 * site.traffic.sectors <= site.traffic.bytes,
            "uncoalesced: {:?}",
            site.traffic
        );
    }
}

/// The near-tie acceptance of `check_selection` is not vacuous: swapping two keys that differ
/// by one f32 ulp passes, picking a clearly worse expert fails.
#[test]
fn near_tie_check_accepts_only_near_ties() {
    let config = RouterConfig {
        experts: 4,
        k: 2,
        score: ScoreFunction::Identity,
        ..RouterConfig::default()
    };
    let logits = [1.0, 1.0 + f32::EPSILON, 0.5, 0.0];
    assert_eq!(reference::select(&config, &logits, None).ids, [1, 0]);
    let selection = |ids: Vec<i32>| Selected {
        weights: reference::weights_for(&config, &logits, &ids)
            .iter()
            .map(|&w| w as f32)
            .collect(),
        ids,
        nonfinite_rows: 0,
    };
    check_selection(&config, &logits, None, &selection(vec![0, 1]));
    let worse = std::panic::catch_unwind(|| check_selection(&config, &logits, None, &selection(vec![1, 2])));
    assert!(worse.is_err(), "a clearly worse expert was accepted");
}

/// A large-ish batch (many blocks), E not a power of two, with the statistics of its routing.
#[test]
fn large_batch_select_backward_and_statistics() {
    let mut rng = Rng::new(19);
    let config = RouterConfig {
        experts: 60,
        k: 6,
        renormalize: true,
        groups: 6,
        topk_groups: 3,
        ..RouterConfig::default()
    };
    let tokens = 4099;
    let logits = random_logits(&mut rng, &config, tokens, Rows::WithSpecials);
    let bias = rng.normals(60, 0.01);
    for device in devices() {
        let got = run_select(&device, &config, &logits, Some(&bias));
        check_selection(&config, &logits, Some(&bias), &got);

        let d_weights = rng.normals(got.ids.len(), 1.0);
        let want = reference::select_backward(&config, &logits, &got.ids, &d_weights);
        let (z, ids) = (device.upload(&logits).unwrap(), device.upload(&got.ids).unwrap());
        let (dw, weights) = (device.upload(&d_weights).unwrap(), device.upload(&got.weights).unwrap());
        let mut dz = device.alloc_zeros::<f32>(logits.len()).unwrap();
        router::select_backward(&device, &config, &z, &ids, &dw, &mut dz).unwrap();
        assert_close(
            "dz",
            &device.download(&dz).unwrap(),
            &want,
            Tolerance::F32.over(config.k),
        );

        let mut ws = device
            .alloc_zeros(router::expert_statistics_workspace_len(&config, tokens).unwrap())
            .unwrap();
        let (mut counts, mut sums) = (
            device.alloc_zeros::<i32>(60).unwrap(),
            device.alloc_zeros::<f32>(60).unwrap(),
        );
        router::expert_statistics(&device, &config, &ids, &weights, &mut ws, &mut counts, &mut sums).unwrap();
        assert_eq!(
            device.download(&counts).unwrap(),
            reference::expert_counts(60, &got.ids)
        );
        let want_sums = reference::expert_weight_sums(60, &got.ids, &got.weights);
        assert_close(
            "weight sums",
            &device.download(&sums).unwrap(),
            &want_sums,
            Tolerance::F32.over(tokens),
        );
    }
}

/// Every buffer a view at odd element offsets (cudarc sub-slices of bigger tensors): rows of
/// E % 4 == 0 logits that would take the 16-byte path when aligned, and odd E; every op on
/// every device against the reference. Edge sizes: no tokens, one expert, k = E.
mod unaligned {
    use super::*;

    const EXPERTS: [usize; 6] = [1, 3, 8, 13, 64, 300];

    #[test]
    fn select_and_backward_at_odd_offsets() {
        let mut rng = Rng::new(120);
        for experts in EXPERTS {
            for tokens in [0, 1, 9] {
                for k in [1, experts.min(32)] {
                    let config = RouterConfig {
                        k,
                        ..random_config(&mut rng, experts)
                    };
                    let config = RouterConfig {
                        groups: 1,
                        topk_groups: 1,
                        ..config
                    };
                    let logits = random_logits(&mut rng, &config, tokens, Rows::WithSpecials);
                    let bias = random_bias(&mut rng, experts);
                    let ids = reference::select(&config, &logits, None).ids;
                    let d_weights = rng.normals(ids.len(), 1.0);
                    let want_dz = reference::select_backward(&config, &logits, &ids, &d_weights);
                    for device in devices() {
                        for offset in [1, 2] {
                            let got = run_select_at(&device, &config, &logits, bias.as_deref(), offset);
                            check_selection(&config, &logits, bias.as_deref(), &got);
                            let at = |i| view_offset(offset, i);
                            let (z, d_ids, dw) = (
                                AtOffset::upload(&device, &logits, at(0)),
                                AtOffset::upload(&device, &ids, at(1)),
                                AtOffset::upload(&device, &d_weights, at(2)),
                            );
                            let mut dz = AtOffset::upload(&device, &vec![f32::NAN; logits.len()], at(3));
                            router::select_backward(
                                &device,
                                &config,
                                &z.view(),
                                &d_ids.view(),
                                &dw.view(),
                                &mut dz.view_mut(),
                            )
                            .unwrap();
                            let tol = Tolerance::F32.over(config.k).scaled(config.scale as f64);
                            assert_close(
                                &format!("dz E={experts} k={k} T={tokens}"),
                                &dz.download(&device),
                                &want_dz,
                                tol,
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn statistics_and_losses_at_odd_offsets() {
        let mut rng = Rng::new(121);
        for experts in EXPERTS {
            for tokens in [0, 1, 9] {
                let router = RouterConfig {
                    experts,
                    k: experts.min(3),
                    ..RouterConfig::default()
                };
                let (ids, weights) = random_slots(&mut rng, experts, tokens * router.k);
                let want_counts = reference::expert_counts(experts, &ids);
                let want_sums = reference::expert_weight_sums(experts, &ids, &weights);
                let logits = random_logits(&mut rng, &router, tokens, Rows::Finite);
                let dz0 = rng.normals(logits.len(), 1.0);
                let want_z = reference::z_loss(experts, 1e-3, &logits);
                let mut want_dz: Vec<f64> = dz0.iter().map(|&v| v as f64).collect();
                reference::z_loss_backward(experts, 1e-3, &logits, &mut want_dz);
                let selected = reference::select(&router, &logits, None).ids;
                let aux = AuxLossConfig {
                    alpha: 0.01,
                    sequence_length: None,
                };
                let want_aux = reference::aux_loss(&router, &aux, &logits, &selected);
                let mut want_aux_dz: Vec<f64> = dz0.iter().map(|&v| v as f64).collect();
                reference::aux_loss_backward(&router, &aux, &logits, &selected, &mut want_aux_dz);
                for device in devices() {
                    let at = |i| view_offset(3, i);
                    let (d_ids, d_w) = (
                        AtOffset::upload(&device, &ids, at(0)),
                        AtOffset::upload(&device, &weights, at(1)),
                    );
                    let mut counts = AtOffset::upload(&device, &vec![-7i32; experts], at(2));
                    let mut sums = AtOffset::upload(&device, &vec![f32::NAN; experts], at(3));
                    let ws_len = router::expert_statistics_workspace_len(&router, tokens).unwrap();
                    let mut ws = AtOffset::upload(&device, &vec![f32::NAN; ws_len], at(4));
                    let z = AtOffset::upload(&device, &logits, at(5));
                    let mut z_workspace = ZLossWorkspace::new(&device, tokens).unwrap();
                    let mut loss = AtOffset::upload(&device, &[f32::NAN], at(7));
                    let mut dz = AtOffset::upload(&device, &dz0, at(8));
                    let d_sel = AtOffset::upload(&device, &selected, at(9));
                    let mut workspace = AuxLossWorkspace::new(&device, &router, &aux, tokens).unwrap();
                    let mut aux_loss = AtOffset::<f32>::zeros(&device, 1, at(10));
                    let mut aux_dz = AtOffset::upload(&device, &dz0, at(11));
                    let zv = z.view();
                    let before = device.stats();
                    router::expert_statistics(
                        &device,
                        &router,
                        &d_ids.view(),
                        &d_w.view(),
                        &mut ws.view_mut(),
                        &mut counts.view_mut(),
                        &mut sums.view_mut(),
                    )
                    .unwrap();
                    router::z_loss(&device, &router, 1e-3, &zv, &mut z_workspace, &mut loss.view_mut()).unwrap();
                    router::z_loss_backward(&device, &router, 1e-3, &zv, &z_workspace, &mut dz.view_mut()).unwrap();
                    router::aux_loss(
                        &device,
                        &router,
                        &aux,
                        &zv,
                        &d_sel.view(),
                        &mut workspace,
                        &mut aux_loss.view_mut(),
                    )
                    .unwrap();
                    router::aux_loss_backward(&device, &router, &aux, &zv, &workspace, &mut aux_dz.view_mut()).unwrap();
                    assert_eq!(
                        device.stats().host_syncs,
                        before.host_syncs,
                        "a router op synced the host"
                    );
                    assert_eq!(device.stats().launches - before.launches, 2 + 2 + 2, "launches");

                    assert_eq!(counts.download(&device), want_counts, "E={experts} T={tokens} counts");
                    let tol = Tolerance::F32.over(tokens * router.k);
                    assert_close("weight sums", &sums.download(&device), &want_sums, tol);
                    let scalar = Tolerance { atol: 1e-7, rtol: 1e-4 };
                    let grad = Tolerance::F32.over(experts);
                    assert_close("z-loss", &loss.download(&device), &[want_z], scalar);
                    assert_close("z-loss dz", &dz.download(&device), &want_dz, grad);
                    assert_close("aux loss", &aux_loss.download(&device), &[want_aux], scalar);
                    assert_close("aux dz", &aux_dz.download(&device), &want_aux_dz, grad);
                }
            }
        }
    }
}
