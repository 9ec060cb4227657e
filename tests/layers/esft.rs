//! ESFT: statistics over batches and the math §8 selection against the reference; a training
//! step computes weight gradients for the selected experts only.
use crate::common::{assert_close, devices};
use crate::support::*;
use moe_kernels::layers::esft::EsftTracker;
use moe_kernels::layers::{MoeConfig, MoeLayer, RouterKind};
use moe_kernels::ops::esft::ScoreKind;
use moe_kernels::ops::gemm::ExpertMask;
use moe_kernels::reference::esft as esft_reference;
use moe_kernels::reference::layers as reference;

fn config() -> MoeConfig {
    MoeConfig {
        experts: 8,
        max_tokens: 32,
        ..small(RouterKind::Linear)
    }
}

#[test]
fn selection_over_several_batches_matches_the_reference() {
    for device in devices() {
        let config = config();
        let weights_case = Case::new::<f32>(config, 8, 90);
        let mut layer = MoeLayer::<f32>::new(&device, config, &weights_case.weights).unwrap();
        let mut tracker = EsftTracker::new(&device, config.experts, config.k).unwrap();
        let mut batches = vec![];
        for (b, tokens) in [32, 7, 19].into_iter().enumerate() {
            let case = Case {
                weights: weights_case.weights.clone(),
                ..Case::new::<f32>(config, tokens, 91 + b as u64)
            };
            let x = device.upload(&case.x).unwrap();
            let mut y = device.alloc_zeros::<f32>(case.x.len()).unwrap();
            layer.forward(&x, tokens, &mut y).unwrap();
            let before = device.stats();
            tracker.accumulate(&layer).unwrap();
            let after = device.stats();
            assert_eq!(
                (after.launches - before.launches, after.host_syncs),
                (1, before.host_syncs)
            );
            let (ids, weights) = layer.routing().unwrap();
            batches.push((device.download(&ids).unwrap(), device.download(&weights).unwrap()));
        }
        let views: Vec<(&[i32], &[f32])> = batches.iter().map(|(i, w)| (&i[..], &w[..])).collect();
        let stats = esft_reference::statistics(&views, config.experts, config.k);
        for (kind, p) in [
            (ScoreKind::Gate, 0.1),
            (ScoreKind::Gate, 0.6),
            (ScoreKind::Token, 0.2),
            (ScoreKind::Token, 1.0),
        ] {
            let mask = tracker.select(p, kind).unwrap();
            let mut want = esft_reference::select(&stats, config.k, kind, p);
            want.sort();
            assert_eq!(tracker.selected(), &want[..], "{kind:?} p = {p}");
            assert_eq!(mask.active_count, want.len());
        }
        tracker.reset().unwrap();
        let mask = tracker.select(0.5, ScoreKind::Gate).unwrap();
        assert_eq!(mask.active_count, config.experts, "no statistics select every expert");
    }
}

/// A training step under an ESFT mask: frozen experts' gradients are never written (bitwise
/// what they held), the weight-gradient grid has one row of blocks per selected expert, the
/// selected experts' gradients and dx match the reference (and finite differences).
#[test]
fn a_training_step_computes_weight_gradients_for_selected_experts_only() {
    for device in devices() {
        let config = MoeConfig {
            aux_alpha: 0.02,
            ..config()
        };
        let case = Case::new::<f32>(config, 32, 95);
        let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
        let full = run(&device, &mut layer, &case);
        let mut tracker = EsftTracker::new(&device, config.experts, config.k).unwrap();
        tracker.accumulate(&layer).unwrap();
        let mask = tracker.select(0.4, ScoreKind::Token).unwrap();
        let selected: Vec<bool> = (0..config.experts).map(|e| tracker.selected().contains(&e)).collect();
        let active = mask.active_count;
        assert!(
            active > 0 && active < config.experts,
            "p = 0.4 selects a proper subset ({active})"
        );
        layer.set_expert_mask(Some(mask)).unwrap();
        let step_case = Case {
            weights: case.weights.clone(),
            ..Case::new::<f32>(config, 32, 96)
        };
        let step = run(&device, &mut layer, &step_case);
        let grid = device.launch_configs()["grouped_gemm_wgrad_f32"].grid;
        assert_eq!(grid.1 as usize, active, "wgrad blocks launched for frozen experts");
        let (w1_len, w2_len) = (full.w1.len() / config.experts, full.w2.len() / config.experts);
        for e in (0..config.experts).filter(|&e| !selected[e]) {
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let frozen = |v: &[f32], len: usize| bits(&v[e * len..(e + 1) * len]);
            assert_eq!(
                frozen(&step.w1, w1_len),
                frozen(&full.w1, w1_len),
                "frozen expert {e}: dW1 written"
            );
            assert_eq!(
                frozen(&step.w2, w2_len),
                frozen(&full.w2, w2_len),
                "frozen expert {e}: dW2 written"
            );
        }
        // The selected experts (and dx, router gradients) as the reference with the mask: frozen
        // experts' slices compared against what they held.
        let f = step_case.reference::<f32>();
        let g = reference::moe_backward(
            &config,
            &case.weights,
            &step_case.x,
            &f,
            &step_case.dy,
            false,
            Some(&selected),
            &|v| v as f32,
        );
        let tol = layer_tolerance::<f32>(&config).over(32 * config.k);
        let merged = |full: &[f32], want: &[f64], len: usize| -> Vec<f64> {
            (0..want.len())
                .map(|i| if selected[i / len] { want[i] } else { full[i] as f64 })
                .collect()
        };
        assert_close("masked dW1", &step.w1, &merged(&full.w1, &g.w1, w1_len), tol);
        assert_close("masked dW2", &step.w2, &merged(&full.w2, &g.w2, w2_len), tol);
        assert_close("dx under a mask", &step.dx, &g.dx, layer_tolerance::<f32>(&config));
        // Finite differences on a selected expert's weights.
        let (_, base_ids) = step_case.loss(&case.weights, &step_case.x);
        let first = tracker.selected()[0];
        let in_selected = |j: usize| first * w1_len + j % w1_len;
        let loss = |j: usize, eps: f32| {
            let mut w = case.weights.clone();
            w.w1[in_selected(j)] += eps;
            step_case.loss(&w, &step_case.x)
        };
        let analytic: Vec<f32> = (0..w1_len).map(|j| step.w1[in_selected(j)]).collect();
        check_finite_differences("ESFT dW1 of a selected expert", &analytic, 5, 97, loss, &base_ids);
        // An empty mask launches no weight-gradient GEMM at all.
        layer
            .set_expert_mask(Some(ExpertMask::new(&device, &vec![false; config.experts]).unwrap()))
            .unwrap();
        let x = device.upload(&step_case.x).unwrap();
        let mut y = device.alloc_zeros::<f32>(step_case.x.len()).unwrap();
        let mut dx = device.alloc_zeros::<f32>(step_case.x.len()).unwrap();
        layer.forward(&x, 32, &mut y).unwrap();
        let before = device.stats();
        layer.backward(&x, &x, &mut dx).unwrap();
        let frozen_launches = device.stats().launches - before.launches;
        layer.set_expert_mask(None).unwrap();
        let before = device.stats();
        layer.backward(&x, &x, &mut dx).unwrap();
        assert_eq!(
            device.stats().launches - before.launches,
            frozen_launches + 2,
            "two wgrads skipped"
        );
    }
}
