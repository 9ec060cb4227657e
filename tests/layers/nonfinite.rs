//! The non-finite policy (math §1, §2) through whole layers: a token whose input row holds a
//! NaN, an infinity or a huge value (1e30: its square overflows f32) is routed nowhere, counted in `nonfinite_rows`, gets a NaN output row, and
//! leaves every other output row and every gradient bitwise what the batch without it gives.
use crate::chain::{ChainCase, run_chain};
use crate::common::devices;
use crate::support::{Case, Run, router_kinds, run, small};
use crate::vq::{config as vq_config, run_vq, vq_case};
use half::bf16;
use moe_kernels::Device;
use moe_kernels::layers::{ChainOfExperts, MoeConfig, MoeLayer, RouterKind, VqMoe};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::router::NO_EXPERT;

/// The batch of `full` minus its last `drop` tokens.
fn without_last(full: &Case, drop: usize) -> Case {
    let (tokens, d) = (full.tokens - drop, full.config.dim);
    Case {
        config: full.config,
        weights: full.weights.clone(),
        tokens,
        x: full.x[..tokens * d].to_vec(),
        dy: full.dy[..tokens * d].to_vec(),
    }
}

/// Every gradient of a run with its name, to compare two runs tensor by tensor.
fn gradients(run: &Run) -> Vec<(&str, &[f32])> {
    let mut all: Vec<(&str, &[f32])> = run.gate.iter().map(|(n, g)| (*n, &g[..])).collect();
    all.extend([
        ("w1", &run.w1[..]),
        ("w2", &run.w2[..]),
        ("shared_w1", &run.shared_w1[..]),
        ("shared_w2", &run.shared_w2[..]),
    ]);
    all
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// The tokens routed nowhere are the last ones, so every other token keeps its place in every
/// fixed summation order (the expert groups, the shared experts' and the gate's sums over
/// tokens): with them only exact zeros are added, and "bitwise" is the right comparison. With
/// the aux and z losses on (except for the codebook router, which has neither): their means
/// count only the tokens routed somewhere, counted on the device.
fn check<T: FloatElement>(device: &Device, name: &str, router: RouterKind) {
    let logits = router != RouterKind::Codebook;
    let config = MoeConfig {
        k: if logits { small(router).k } else { 1 },
        shared_experts: 1,
        aux_alpha: if logits { 0.03 } else { 0.0 },
        z_loss: if logits { 0.01 } else { 0.0 },
        ..small(router)
    };
    let (good, d) = (13, config.dim);
    let mut full = Case::new::<T>(config, good + 3, 3);
    full.x[good * d + 5] = f32::NAN;
    full.x[(good + 1) * d + 7] = f32::INFINITY;
    full.x[(good + 2) * d..].fill(1e30);
    let kept = without_last(&full, 3);
    let what = format!("{name} {} on {}", T::NAME, device.description());

    let mut layer = MoeLayer::<T>::new(device, config, &full.weights).unwrap();
    let got = run::<T>(device, &mut layer, &full);
    assert_eq!(device.download(layer.nonfinite_rows()).unwrap(), [3], "{what}: counted");
    let want = run::<T>(
        device,
        &mut MoeLayer::<T>::new(device, config, &kept.weights).unwrap(),
        &kept,
    );

    let k = config.k;
    assert!(
        got.ids[good * k..].iter().all(|&i| i == NO_EXPERT),
        "{what}: routed nowhere"
    );
    assert!(got.y[good * d..].iter().all(|v| v.is_nan()), "{what}: NaN output rows");
    assert_eq!(bits(&got.y[..good * d]), bits(&want.y), "{what}: other outputs");
    assert_eq!(bits(&got.dx[..good * d]), bits(&want.dx), "{what}: other tokens' dx");
    for ((name, g), (_, w)) in gradients(&got).into_iter().zip(gradients(&want)) {
        assert!(g.iter().all(|v| v.is_finite()), "{what}: d{name} is not finite");
        assert_eq!(bits(g), bits(w), "{what}: d{name}");
    }
}

#[test]
fn tokens_routed_nowhere_leave_the_rest_bitwise_unchanged() {
    for device in devices() {
        let codebook = ("codebook", RouterKind::Codebook);
        for (name, router) in router_kinds().into_iter().chain([codebook]) {
            check::<f32>(&device, name, router);
            check::<bf16>(&device, name, router);
        }
    }
}

/// VqMoe: the bad token is routed nowhere by the router, the nearest-code search and the mix
/// gate alike (counted by the first two), gets a NaN output row, and every other output row,
/// every gradient (both paths' experts, the router, the mix gate, the codebook) and the four
/// losses are bitwise what the batch without it gives.
fn check_vq<T: FloatElement>(device: &Device) {
    let (good, config) = (13, vq_config());
    let d = config.dim;
    let (mut full, weights) = vq_case::<T>(config, good + 3, 9);
    full.x[good * d + 5] = f32::NAN;
    full.x[(good + 1) * d + 7] = f32::NEG_INFINITY;
    full.x[(good + 2) * d..].fill(1e30);
    let kept = without_last(&full, 3);
    let what = format!("VQ-MoE {} on {}", T::NAME, device.description());

    let mut layer = VqMoe::<T>::new(device, config, &weights).unwrap();
    let got = run_vq::<T>(device, &mut layer, &full);
    let (router, codebook) = layer.nonfinite_rows();
    let counts = [router, codebook].map(|b| device.download(b).unwrap()[0]);
    assert_eq!(counts, [3, 3], "{what}: counted (router, codebook)");
    let want = run_vq::<T>(device, &mut VqMoe::<T>::new(device, config, &weights).unwrap(), &kept);

    assert!(got.codes[good..].iter().all(|&c| c == NO_EXPERT), "{what}: codes");
    assert!(got.y[good * d..].iter().all(|v| v.is_nan()), "{what}: NaN output rows");
    assert_eq!(bits(&got.y[..good * d]), bits(&want.y), "{what}: other outputs");
    assert_eq!(bits(&got.dx[..good * d]), bits(&want.dx), "{what}: other tokens' dx");
    let tensors = |r: &crate::vq::VqRun| {
        [
            ("router", &r.router),
            ("mix", &r.mix),
            ("w1", &r.w1),
            ("w2", &r.w2),
            ("codebook", &r.codebook),
            ("losses", &r.losses),
        ]
        .map(|(n, v)| (n, bits(v)))
    };
    for ((name, g), (_, w)) in tensors(&got).into_iter().zip(tensors(&want)) {
        assert!(
            g.iter().all(|&v| f32::from_bits(v).is_finite()),
            "{what}: {name} is not finite"
        );
        assert_eq!(g, w, "{what}: {name}");
    }
}

#[test]
fn vq_tokens_routed_nowhere_leave_the_rest_bitwise_unchanged() {
    for device in devices() {
        check_vq::<f32>(&device);
        check_vq::<bf16>(&device);
    }
}

/// ChainOfExperts (2 iterations, aux and z losses on): the bad tokens stay non-finite through the
/// residual, are routed nowhere and counted by each iteration, and leave every other output
/// row, dx row and gradient bitwise what the batch without them gives.
fn check_chain<T: FloatElement>(device: &Device) {
    let config = MoeConfig {
        shared_experts: 1,
        aux_alpha: 0.03,
        z_loss: 0.01,
        ..small(RouterKind::Linear)
    };
    let (good, d) = (13, config.dim);
    let mut full = ChainCase::new::<T>(config, 2, good + 3, 4);
    full.x[good * d + 2] = f32::NAN;
    full.x[(good + 1) * d] = f32::INFINITY;
    full.x[(good + 2) * d..].fill(-1e30);
    let kept = ChainCase {
        x: full.x[..good * d].to_vec(),
        dy: full.dy[..good * d].to_vec(),
        weights: full.weights.clone(),
        ..full
    };
    let what = format!("chain {} on {}", T::NAME, device.description());
    let mut chain = ChainOfExperts::<T>::new(device, config, &full.weights).unwrap();
    let got = run_chain::<T>(device, &mut chain, &full);
    assert_eq!(device.download(chain.nonfinite_rows()).unwrap(), [6], "{what}: counted");
    let want = run_chain::<T>(
        device,
        &mut ChainOfExperts::<T>::new(device, config, &kept.weights).unwrap(),
        &kept,
    );
    assert!(got.y[good * d..].iter().all(|v| v.is_nan()), "{what}: NaN output rows");
    assert_eq!(bits(&got.y[..good * d]), bits(&want.y), "{what}: other outputs");
    assert_eq!(bits(&got.dx[..good * d]), bits(&want.dx), "{what}: other tokens' dx");
    let mut tensors = vec![("w1", (&got.w1, &want.w1)), ("w2", (&got.w2, &want.w2))];
    tensors.push(("shared_w1", (&got.shared_w1, &want.shared_w1)));
    for (g, w) in got.routers.iter().flatten().zip(want.routers.iter().flatten()) {
        tensors.push((g.0, (&g.1, &w.1)));
    }
    for (name, (g, w)) in tensors {
        assert!(g.iter().all(|v| v.is_finite()), "{what}: d{name} is not finite");
        assert_eq!(bits(g), bits(w), "{what}: d{name}");
    }
}

#[test]
fn chain_tokens_routed_nowhere_leave_the_rest_bitwise_unchanged() {
    for device in devices() {
        check_chain::<f32>(&device);
        check_chain::<bf16>(&device);
    }
}
