//! Routing reports (issue 22) on every available device: each number of a report gathered from
//! a layer's last forward equals the statistic computed here, directly, from the whole-layer
//! CPU reference's outputs on the same small case (load and imbalance, capacity drops and fully
//! dropped tokens, non-finite tokens, Chain-of-Experts transitions, VQ code use, margins, ESFT
//! scores); batches accumulate; gathering is the only place that syncs; the figures are PNG
//! files.
mod common;

use common::{Rng, devices};
use moe_kernels::layers::esft::EsftTracker;
use moe_kernels::layers::{ChainOfExperts, HostWeights, MoeConfig, MoeLayer, RouterKind, VqMoe, VqWeights};
use moe_kernels::ops::esft::ScoreKind;
use moe_kernels::ops::gate::GateForm;
use moe_kernels::reference::esft as esft_reference;
use moe_kernels::reference::layers::{self as reference, MoeForward};
use moe_kernels::report::{self, RoutingReport, figures, text};
use moe_kernels::{Device, Error};
use std::path::PathBuf;

const STORE: &dyn Fn(f64) -> f32 = &|v| v as f32;

fn layer_config(experts: usize, k: usize) -> MoeConfig {
    MoeConfig {
        experts,
        k,
        dim: 16,
        hidden: 16,
        max_tokens: 32,
        ..MoeConfig::default()
    }
}

/// `tokens` rows of seeded inputs, row `nan_row` (if any) poisoned with a NaN.
fn inputs(config: &MoeConfig, tokens: usize, seed: u64, nan_row: Option<usize>) -> Vec<f32> {
    let mut x = Rng::new(seed).normals(tokens * config.dim, 1.0);
    if let Some(row) = nan_row {
        x[row * config.dim + 3] = f32::NAN;
    }
    x
}

/// Slots routed to each expert, from ids (`-1` counts nowhere).
fn routed(ids: &[i32], experts: usize) -> Vec<u64> {
    (0..experts as i32)
        .map(|e| ids.iter().filter(|&&id| id == e).count() as u64)
        .collect()
}

/// The k-th minus (k+1)-th softmax probability of every finite row of `z`.
fn softmax_margins(z: &[f32], experts: usize, k: usize) -> Vec<f64> {
    z.chunks(experts)
        .filter(|row| row.iter().all(|v| v.is_finite()))
        .map(|row| {
            let total: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
            let mut p: Vec<f64> = row.iter().map(|&v| (v as f64).exp() / total).collect();
            p.sort_by(|a, b| b.partial_cmp(a).unwrap());
            p[k - 1] - p[k]
        })
        .collect()
}

fn assert_margins(report: &RoutingReport, forward: &MoeForward, config: &MoeConfig) {
    let want = softmax_margins(&forward.z, config.experts, config.k);
    let got = &report.margins.as_ref().expect("margins").values;
    assert_eq!(got.len(), want.len(), "one margin per finite token");
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-5, "margin of token {t}: {g} vs {w}");
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-kernels-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn layer_report_matches_the_reference() {
    let config = MoeConfig {
        capacity_factor: Some(0.5),
        shared_experts: 1,
        ..layer_config(6, 2)
    };
    let tokens = 24;
    let weights = HostWeights::random(&config, 5);
    let x = inputs(&config, tokens, 6, Some(5));
    let forward = reference::moe_forward(&config, &weights, &x, tokens, Some(&x), STORE);
    for device in devices() {
        let mut layer = MoeLayer::<f32>::new(&device, config, &weights)
            .unwrap()
            .with_residual(true);
        let xd = device.upload(&x).unwrap();
        let mut y = device.alloc_zeros::<f32>(tokens * config.dim).unwrap();
        let before = device.stats();
        layer.forward(&xd, tokens, &mut y).unwrap();
        let middle = device.stats();
        let report = RoutingReport::of_layer(&layer).unwrap();
        let after = device.stats();
        assert_eq!(middle.host_syncs, before.host_syncs, "the forward never syncs");
        // ids, counts, status, slot rows, logits, the non-finite counter.
        assert_eq!(
            after.device_to_host - middle.device_to_host,
            6,
            "the gather's downloads"
        );
        assert_eq!(after.launches, middle.launches, "the gather launches nothing");

        let device_ids = device.download(&layer.routing().unwrap().0).unwrap();
        assert_eq!(device_ids, forward.ids, "{}: the case's routing", device.description());
        let want_routed = routed(&forward.ids, config.experts);
        assert_eq!(report.routed, want_routed);
        let kept: Vec<u64> = forward.map.counts.iter().map(|&c| c as u64).collect();
        assert_eq!(report.kept, kept);
        assert_eq!((report.tokens, report.batches, report.k), (tokens as u64, 1, 2));

        let mean = want_routed.iter().sum::<u64>() as f64 / config.experts as f64;
        let max = *want_routed.iter().max().unwrap() as f64;
        let variance = want_routed.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / config.experts as f64;
        assert!((report.max_over_mean() - max / mean).abs() < 1e-12);
        assert!((report.coefficient_of_variation() - variance.sqrt() / mean).abs() < 1e-12);

        let capacity = report.capacity.as_ref().expect("capacity use");
        let per_expert = (0.5f64 * (tokens * config.k) as f64 / config.experts as f64).ceil() as u64;
        assert_eq!(capacity.slots, per_expert * config.experts as u64);
        assert_eq!(capacity.dropped_slots, forward.map.status[0] as u64);
        assert!(capacity.dropped_slots > 0, "the case drops slots");
        let lost_per_token: Vec<(usize, usize)> = (0..tokens)
            .map(|t| {
                let slots = t * config.k..(t + 1) * config.k;
                let chosen = slots.clone().filter(|&s| forward.ids[s] >= 0).count();
                let lost = slots
                    .filter(|&s| forward.ids[s] >= 0 && forward.map.inverse[s] < 0)
                    .count();
                (chosen, lost)
            })
            .collect();
        let some = lost_per_token.iter().filter(|(_, lost)| *lost > 0).count() as u64;
        let all = lost_per_token.iter().filter(|(c, lost)| *c > 0 && lost == c).count() as u64;
        assert_eq!((capacity.tokens_some_dropped, capacity.tokens_all_dropped), (some, all));
        assert!(
            all > 0 && some > all,
            "the case has tokens losing one slot and tokens losing both"
        );
        let kept_total: u64 = kept.iter().sum();
        assert!((report.capacity_fill().unwrap() - kept_total as f64 / capacity.slots as f64).abs() < 1e-12);
        assert_eq!(report.fallback, "the residual and the shared experts");

        assert_eq!((report.nonfinite_tokens, report.nonfinite_since_built), (1, 1));
        assert_margins(&report, &forward, &config);
        assert!(report.transitions.is_empty() && report.codes.is_none() && report.esft.is_none());

        let printed = report.to_string();
        for line in ["max/mean", "capacity:", "non-finite tokens", "margin (softmax)"] {
            assert!(printed.contains(line), "the text has `{line}`:\n{printed}");
        }
    }
}

#[test]
fn chain_transitions_match_the_reference() {
    let config = layer_config(4, 2);
    let (tokens, iterations) = (16, 3);
    let weights: Vec<HostWeights> = (0..iterations).map(|t| HostWeights::random(&config, 40 + t)).collect();
    let x = inputs(&config, tokens, 41, None);
    let dy = vec![0.0f32; x.len()];
    let result = reference::chain(&config, &weights, &x, &dy, None, STORE);
    for device in devices() {
        let mut chain = ChainOfExperts::<f32>::new(&device, config, &weights).unwrap();
        let xd = device.upload(&x).unwrap();
        let mut y = device.alloc_zeros::<f32>(tokens * config.dim).unwrap();
        chain.forward(&xd, tokens, &mut y).unwrap();
        let report = RoutingReport::of_chain(&chain).unwrap();
        let ids: Vec<&Vec<i32>> = result.iterations.iter().map(|f| &f.ids).collect();
        for (t, want) in ids.iter().enumerate() {
            let got = device.download(&chain.routing(t).unwrap().0).unwrap();
            assert_eq!(&&got, want, "iteration {t}'s routing");
        }
        let all: Vec<i32> = ids.iter().flat_map(|v| v.iter().copied()).collect();
        assert_eq!(report.routed, routed(&all, config.experts));
        assert_eq!(report.tokens, tokens as u64);
        assert_eq!(report.transitions.len(), iterations as usize - 1);
        for (t, transitions) in report.transitions.iter().enumerate() {
            let (a, b) = (ids[t], ids[t + 1]);
            let mut matrix = vec![0u64; config.experts * config.experts];
            let (mut first, mut set) = (0, 0);
            for token in 0..tokens {
                let (ra, rb) = (&a[token * 2..token * 2 + 2], &b[token * 2..token * 2 + 2]);
                matrix[ra[0] as usize * config.experts + rb[0] as usize] += 1;
                first += (ra[0] != rb[0]) as u64;
                let (mut sa, mut sb) = (ra.to_vec(), rb.to_vec());
                sa.sort();
                sb.sort();
                set += (sa != sb) as u64;
            }
            assert_eq!(transitions.from, t);
            assert_eq!(transitions.matrix, matrix, "iteration {t} -> {}", t + 1);
            assert_eq!(
                (transitions.tokens, transitions.first_changed, transitions.set_changed),
                (tokens as u64, first, set)
            );
        }
        assert!(report.to_string().contains("iteration 1 -> 2: first expert changed"));
    }
}

#[test]
fn vq_code_use_matches_the_reference() {
    let config = layer_config(4, 2);
    let tokens = 20;
    let weights = VqWeights::random(&config, 9);
    let x = inputs(&config, tokens, 10, None);
    let forward = reference::vq_forward(&config, &weights, &x, tokens, STORE);
    for device in devices() {
        let mut layer = VqMoe::<f32>::new(&device, config, &weights).unwrap();
        let xd = device.upload(&x).unwrap();
        let mut y = device.alloc_zeros::<f32>(tokens * config.dim).unwrap();
        layer.forward(&xd, tokens, &mut y).unwrap();
        let report = RoutingReport::of_vq(&layer).unwrap();
        let uses = routed(&forward.codes, config.experts);
        assert_eq!(report.codes.as_ref(), Some(&uses));
        let entropy: f64 = uses
            .iter()
            .filter(|&&u| u > 0)
            .map(|&u| u as f64 / tokens as f64)
            .map(|p| -p * p.ln())
            .sum();
        assert!((report::perplexity(&uses) - entropy.exp()).abs() < 1e-12);
        let dead: Vec<usize> = (0..config.experts).filter(|&c| uses[c] == 0).collect();
        assert_eq!(report::dead_codes(&uses), dead);
        assert_eq!(report.routed, routed(&forward.continuous.ids, config.experts));
        assert_margins(&report, &forward.continuous, &config);
    }
    // Perplexity at its edges: uniform use is E, one code is 1, dead codes listed.
    assert!((report::perplexity(&[5, 5, 5, 5]) - 4.0).abs() < 1e-12);
    assert_eq!(report::perplexity(&[0, 9, 0]), 1.0);
    assert_eq!(report::dead_codes(&[0, 9, 0]), [0, 2]);
}

#[test]
fn esft_scores_and_accumulated_batches() {
    let config = layer_config(8, 2);
    let tokens = 24;
    let weights = HostWeights::random(&config, 21);
    let xs = [inputs(&config, tokens, 22, None), inputs(&config, tokens, 23, None)];
    let forwards: Vec<MoeForward> = xs
        .iter()
        .map(|x| reference::moe_forward(&config, &weights, x, tokens, None, STORE))
        .collect();
    let batches: Vec<(&[i32], &[f32])> = forwards.iter().map(|f| (&f.ids[..], &f.weights[..])).collect();
    let statistics = esft_reference::statistics(&batches, config.experts, config.k);
    let selected = {
        let mut ids = esft_reference::select(&statistics, config.k, ScoreKind::Token, 0.5);
        ids.sort();
        ids
    };
    for device in devices() {
        let mut layer = MoeLayer::<f32>::new(&device, config, &weights).unwrap();
        let mut tracker = EsftTracker::new(&device, config.experts, config.k).unwrap();
        let mut y = device.alloc_zeros::<f32>(tokens * config.dim).unwrap();
        let mut reports = vec![];
        for x in &xs {
            layer.forward(&device.upload(x).unwrap(), tokens, &mut y).unwrap();
            tracker.accumulate(&layer).unwrap();
            reports.push(RoutingReport::of_layer(&layer).unwrap());
        }
        tracker.select(0.5, ScoreKind::Token).unwrap();
        let mut total = reports[0].clone();
        total.accumulate(&reports[1]).unwrap();
        let total = total.with_esft(&device, &tracker).unwrap();
        let all: Vec<i32> = forwards.iter().flat_map(|f| f.ids.iter().copied()).collect();
        assert_eq!(total.routed, routed(&all, config.experts));
        assert_eq!((total.tokens, total.batches), (2 * tokens as u64, 2));
        let margins = total.margins.as_ref().unwrap();
        assert_eq!(margins.values.len(), 2 * tokens, "margins append");
        for kind in [ScoreKind::Gate, ScoreKind::Token] {
            let want = esft_reference::scores(&statistics, config.k, kind);
            let got = total.esft_scores(kind).unwrap();
            for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-8, "{kind:?} score of expert {e}: {g} vs {w}");
            }
        }
        assert_eq!(total.esft.as_ref().unwrap().selected, selected);
        assert!(total.to_string().contains("ESFT over 48 tokens"));

        // A report of another kind of layer does not add up.
        let small = layer_config(4, 2);
        let mut small_layer = MoeLayer::<f32>::random(&device, small, 1).unwrap();
        let x4 = device.upload(&inputs(&small, 4, 1, None)).unwrap();
        let mut y4 = device.alloc_zeros::<f32>(4 * small.dim).unwrap();
        small_layer.forward(&x4, 4, &mut y4).unwrap();
        let other = RoutingReport::of_layer(&small_layer).unwrap();
        let refused = total.clone().accumulate(&other);
        assert!(
            matches!(refused, Err(Error::InvalidArgument { argument: "other", .. })),
            "{refused:?}"
        );
    }
}

#[test]
fn quadratic_margins_compare_with_the_linear_gate() {
    let quadratic = MoeConfig {
        router: RouterKind::Quadratic {
            form: GateForm::LowRank,
            rank: 2,
        },
        ..layer_config(6, 2)
    };
    let linear = layer_config(6, 2);
    let tokens = 16;
    let x = inputs(&linear, tokens, 30, None);
    for device in devices() {
        let mut reports = vec![];
        for config in [quadratic, linear] {
            let weights = HostWeights::random(&config, 31);
            let forward = reference::moe_forward(&config, &weights, &x, tokens, None, STORE);
            let mut layer = MoeLayer::<f32>::new(&device, config, &weights).unwrap();
            let mut y = device.alloc_zeros::<f32>(tokens * config.dim).unwrap();
            layer.forward(&device.upload(&x).unwrap(), tokens, &mut y).unwrap();
            let report = RoutingReport::of_layer(&layer).unwrap();
            assert_margins(&report, &forward, &config);
            reports.push(report);
        }
        let compared = text::margin_comparison("quadratic", &reports[0], "linear", &reports[1]);
        assert_eq!(compared.lines().count(), 2);
        assert!(compared.contains("quadratic: k-th minus") && compared.contains("linear: k-th minus"));
    }
}

#[test]
fn a_layer_before_its_first_forward_is_refused() {
    for device in devices() {
        let layer = MoeLayer::<f32>::random(&device, layer_config(4, 2), 1).unwrap();
        let refused = RoutingReport::of_layer(&layer);
        assert!(
            matches!(refused, Err(Error::InvalidArgument { argument: "layer", .. })),
            "{refused:?}"
        );
    }
}

/// Checks `path` is a non-empty PNG file.
fn assert_png(path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.len() > 1000, "{} has {} bytes", path.display(), bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{} is a PNG", path.display());
}

#[test]
fn figures_are_written_as_png() {
    let device = Device::emulator().unwrap();
    let dir = scratch_dir("figures");
    let config = layer_config(4, 2);
    let x = inputs(&config, 16, 50, None);
    let xd = device.upload(&x).unwrap();
    let mut y = device.alloc_zeros::<f32>(16 * config.dim).unwrap();

    let mut chain = ChainOfExperts::<f32>::random(&device, config, 2, 51).unwrap();
    chain.forward(&xd, 16, &mut y).unwrap();
    let chain_report = RoutingReport::of_chain(&chain).unwrap();
    let mut vq = VqMoe::<f32>::random(&device, config, 52).unwrap();
    vq.forward(&xd, 16, &mut y).unwrap();
    let vq_report = RoutingReport::of_vq(&vq).unwrap();

    let written = figures::write_all(&chain_report, &dir.join("chain"), "chain", Some(("vq", &vq_report))).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["load.png", "transitions_0.png", "margins.png"]);
    let vq_written = figures::write_all(&vq_report, &dir.join("vq"), "vq", None).unwrap();
    assert!(vq_written.iter().any(|p| p.ends_with("codes.png")));
    let curves = dir.join("curves.png");
    figures::line_chart(
        &curves,
        "loss",
        ("step", "loss"),
        &[("a", vec![(0.0, 1.0), (1.0, 0.5)])],
    )
    .unwrap();
    for path in written.iter().chain(&vq_written).chain([&curves]) {
        assert_png(path);
    }
    // An unwritable place is an error naming it.
    let blocked = dir.join("curves.png").join("under-a-file");
    let refused = figures::write_all(&vq_report, &blocked, "vq", None);
    assert!(
        matches!(&refused, Err(Error::Report { path, .. }) if path.contains("under-a-file")),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
