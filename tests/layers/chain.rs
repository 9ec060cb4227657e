//! ChainOfExperts: one iteration is the MoE layer with its residual (bitwise), C = 2 and 3
//! against the reference and finite differences, the memory formula, budgets.
use crate::common::{Tolerance, assert_close, devices};
use crate::support::*;
use half::bf16;
use moe_kernels::layers::{ChainOfExperts, HostWeights, Mode, MoeConfig, MoeLayer, RouterKind};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gate::GateForm;
use moe_kernels::reference::layers::{self as reference, ChainResult};
use moe_kernels::{Device, Error};

/// Inputs of a chain case: one HostWeights per iteration (rounded to T), x, dy.
pub struct ChainCase {
    pub config: MoeConfig,
    pub weights: Vec<HostWeights>,
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
}

impl ChainCase {
    pub fn new<T: FloatElement>(config: MoeConfig, iterations: usize, tokens: usize, seed: u64) -> Self {
        let base = Case::new::<T>(config, tokens, seed);
        let weights = (0..iterations)
            .map(|t| HostWeights::random(&config, seed + 17 * t as u64).rounded::<T>(&config))
            .collect();
        Self {
            config,
            weights,
            x: base.x,
            dy: base.dy,
        }
    }

    fn reference<T: FloatElement>(&self) -> ChainResult {
        reference::chain(&self.config, &self.weights, &self.x, &self.dy, None, &store_of::<T>())
    }

    /// `<y, dy> + Σ_t (aux_t + z_t)` of the f32 reference, and every iteration's ids.
    fn loss(&self, weights: &[HostWeights], x: &[f32]) -> (f64, Vec<i32>) {
        let r = reference::chain(&self.config, weights, x, &self.dy, None, &|v| v as f32);
        let dot: f64 = r.y.iter().zip(&self.dy).map(|(y, &g)| y * g as f64).sum();
        let losses: f64 = r.iterations.iter().map(|f| f.aux_loss + f.z_loss).sum();
        (dot + losses, r.iterations.iter().flat_map(|f| f.ids.clone()).collect())
    }
}

pub struct ChainRun {
    pub y: Vec<f32>,
    pub dx: Vec<f32>,
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
    pub shared_w1: Vec<f32>,
    pub routers: Vec<Vec<(&'static str, Vec<f32>)>>,
}

pub fn run_chain<T: FloatElement>(device: &Device, chain: &mut ChainOfExperts<T>, case: &ChainCase) -> ChainRun {
    let x = device.upload(&to_t::<T>(&case.x)).unwrap();
    let dy = device.upload(&to_t::<T>(&case.dy)).unwrap();
    let mut y = device.alloc_zeros::<T>(case.x.len()).unwrap();
    let mut dx = device.alloc_zeros::<T>(case.x.len()).unwrap();
    let before = device.stats();
    chain.forward(&x, case.x.len() / case.config.dim, &mut y).unwrap();
    chain.backward(&x, &dy, &mut dx).unwrap();
    assert_eq!(
        device.stats().host_syncs,
        before.host_syncs,
        "a chain pass synced with the host"
    );
    let grads = chain.expert_grads();
    ChainRun {
        y: download_f32(device, &y),
        dx: download_f32(device, &dx),
        w1: device.download(&grads.w1).unwrap(),
        w2: device.download(&grads.w2).unwrap(),
        shared_w1: grads.shared_w1.as_ref().map_or(vec![], |b| device.download(b).unwrap()),
        routers: (0..chain.iterations())
            .map(|t| {
                let grads = chain.router_grads(t).unwrap();
                grads
                    .tensors()
                    .iter()
                    .map(|(n, b)| (*n, device.download(b).unwrap()))
                    .collect()
            })
            .collect(),
    }
}

pub fn check_chain<T: FloatElement>(what: &str, case: &ChainCase, run: &ChainRun) {
    let r = case.reference::<T>();
    let tol = layer_tolerance::<T>(&case.config).scaled(case.weights.len() as f64);
    let tokens = case.x.len() / case.config.dim;
    let grad_tol = tol.over(tokens * case.config.k * case.weights.len());
    assert_close(&format!("{what}: y"), &run.y, &r.y, tol);
    assert_close(&format!("{what}: dx"), &run.dx, &r.grads.dx, tol);
    assert_close(&format!("{what}: dW1"), &run.w1, &r.grads.w1, grad_tol);
    assert_close(&format!("{what}: dW2"), &run.w2, &r.grads.w2, grad_tol);
    assert_close(
        &format!("{what}: shared dW1"),
        &run.shared_w1,
        &r.grads.shared_w1,
        grad_tol,
    );
    for (t, (got, want)) in run.routers.iter().zip(&r.routers).enumerate() {
        for ((name, g), (_, w)) in got.iter().zip(want) {
            assert_close(&format!("{what}: router {t} d{name}"), g, w, grad_tol);
        }
    }
}

#[test]
fn one_iteration_is_the_moe_layer_with_its_residual_bitwise() {
    for device in devices() {
        let config = MoeConfig {
            shared_experts: 1,
            aux_alpha: 0.01,
            ..small(RouterKind::Quadratic {
                form: GateForm::LowRank,
                rank: 2,
            })
        };
        let case = Case::new::<bf16>(config, 19, 41);
        let mut layer = MoeLayer::<bf16>::new(&device, config, &case.weights)
            .unwrap()
            .with_residual(true);
        let single = run(&device, &mut layer, &case);
        let mut chain = ChainOfExperts::<bf16>::new(&device, config, std::slice::from_ref(&case.weights)).unwrap();
        let chain_case = ChainCase {
            config,
            weights: vec![case.weights.clone()],
            x: case.x.clone(),
            dy: case.dy.clone(),
        };
        let chained = run_chain(&device, &mut chain, &chain_case);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&single.y), bits(&chained.y), "y");
        assert_eq!(bits(&single.dx), bits(&chained.dx), "dx");
        assert_eq!(bits(&single.w1), bits(&chained.w1), "dW1");
        assert_eq!(bits(&single.w2), bits(&chained.w2), "dW2");
        for ((_, a), (_, b)) in single.gate.iter().zip(&chained.routers[0]) {
            assert_eq!(bits(a), bits(b), "router grads");
        }
        // And both are x + MoE(x) by the reference.
        check_chain::<bf16>("C = 1", &chain_case, &chained);
    }
}

#[test]
fn two_and_three_iterations_match_the_reference() {
    for device in devices() {
        let linear = MoeConfig {
            aux_alpha: 0.02,
            ..small(RouterKind::Linear)
        };
        let quadratic = MoeConfig {
            shared_experts: 1,
            z_loss: 1e-3,
            k: 1,
            ..small(RouterKind::Quadratic {
                form: GateForm::Attention,
                rank: 4,
            })
        };
        for (what, config, iterations) in [("C = 2", linear, 2), ("C = 3", quadratic, 3)] {
            let case = ChainCase::new::<f32>(config, iterations, 14, 50 + iterations as u64);
            let mut chain = ChainOfExperts::<f32>::new(&device, config, &case.weights).unwrap();
            let run = run_chain(&device, &mut chain, &case);
            check_chain::<f32>(what, &case, &run);
            // Each iteration's losses are on the device.
            let r = case.reference::<f32>();
            for (t, forward) in r.iterations.iter().enumerate() {
                let (aux, z) = chain.loss_buffers(t).unwrap();
                let got = [device.download(aux).unwrap()[0], device.download(z).unwrap()[0]];
                assert_close(
                    &format!("{what}: losses {t}"),
                    &got,
                    &[forward.aux_loss, forward.z_loss],
                    Tolerance::F32.scaled(10.0),
                );
            }
        }
        let case = ChainCase::new::<bf16>(linear, 2, 16, 60);
        let mut chain = ChainOfExperts::<bf16>::new(&device, linear, &case.weights).unwrap();
        let run = run_chain(&device, &mut chain, &case);
        check_chain::<bf16>("bf16 C = 2", &case, &run);
    }
}

#[test]
fn chain_gradients_match_finite_differences() {
    for device in devices() {
        for iterations in [1, 2, 3] {
            let config = MoeConfig {
                shared_experts: 1,
                aux_alpha: 0.05,
                z_loss: 0.01,
                ..small(RouterKind::Linear)
            };
            let case = ChainCase::new::<f32>(config, iterations, 10, 70 + iterations as u64);
            let mut chain = ChainOfExperts::<f32>::new(&device, config, &case.weights).unwrap();
            let run = run_chain(&device, &mut chain, &case);
            let (_, base_ids) = case.loss(&case.weights, &case.x);
            let what = format!("C = {iterations}");
            let seed = 77 + iterations as u64;
            let x_loss = |j: usize, eps: f32| {
                let mut x = case.x.clone();
                x[j] += eps;
                case.loss(&case.weights, &x)
            };
            check_finite_differences(&format!("{what}: dx"), &run.dx, 5, seed, x_loss, &base_ids);
            let weights_loss = |edit: &dyn Fn(&mut Vec<HostWeights>)| {
                let mut w = case.weights.clone();
                edit(&mut w);
                case.loss(&w, &case.x)
            };
            let loss = |j: usize, eps: f32| weights_loss(&|w: &mut Vec<HostWeights>| w[0].w1[j] += eps);
            check_finite_differences(&format!("{what}: W1"), &run.w1, 5, seed, loss, &base_ids);
            let loss = |j: usize, eps: f32| weights_loss(&|w: &mut Vec<HostWeights>| w[0].w2[j] += eps);
            check_finite_differences(&format!("{what}: W2"), &run.w2, 5, seed, loss, &base_ids);
            let last = iterations - 1;
            let loss = |j: usize, eps: f32| weights_loss(&|w: &mut Vec<HostWeights>| w[last].gate[0].1[j] += eps);
            let router_w = &run.routers[last][0].1;
            check_finite_differences(&format!("{what}: last router w"), router_w, 5, seed, loss, &base_ids);
        }
    }
}

#[test]
fn held_bytes_match_the_documented_formula() {
    for device in devices() {
        let plain = small(RouterKind::Linear);
        let rich = MoeConfig {
            shared_experts: 2,
            z_loss: 1e-3,
            k: 3,
            ..small(RouterKind::Quadratic {
                form: GateForm::Symmetric,
                rank: 2,
            })
        };
        for config in [plain, rich] {
            for iterations in 1..=3 {
                let chain = ChainOfExperts::<bf16>::random(&device, config, iterations, 1).unwrap();
                let per_iteration = ChainOfExperts::<bf16>::saved_bytes_per_token_per_iteration(&config).unwrap();
                let input = config.dim * 2;
                assert_eq!(
                    chain.held_bytes_per_token(),
                    iterations * per_iteration - input,
                    "{config:?} C = {iterations}"
                );
            }
            let layer = MoeLayer::<f32>::random(&device, config, 1).unwrap();
            assert_eq!(
                layer.saved_bytes_per_token(),
                MoeLayer::<f32>::saved_bytes_per_token_formula(&config).unwrap()
            );
        }
    }
}

#[test]
fn bad_chain_inputs_are_rejected() {
    for device in devices() {
        let config = small(RouterKind::Linear);
        assert!(matches!(
            ChainOfExperts::<f32>::new(&device, config, &[]),
            Err(Error::InvalidArgument {
                argument: "weights",
                ..
            })
        ));
        let mut chain = ChainOfExperts::<f32>::random(&device, config, 2, 3).unwrap();
        let x = device.alloc_zeros::<f32>(4 * config.dim).unwrap();
        let mut y = device.alloc_zeros::<f32>(4 * config.dim).unwrap();
        assert!(matches!(
            chain.backward(&x, &x, &mut y),
            Err(Error::InvalidArgument {
                argument: "backward",
                ..
            })
        ));
        assert!(matches!(
            chain.forward(&x, 25, &mut y),
            Err(Error::InvalidArgument { argument: "tokens", .. })
        ));
        assert!(matches!(
            chain.forward(&x, 3, &mut y),
            Err(Error::Shape { argument: "x", .. })
        ));
    }
}

/// A wrong output length is rejected before any iteration launches.
#[test]
fn chain_arguments_are_checked_before_any_launch() {
    for device in devices() {
        let config = small(RouterKind::Linear);
        let mut chain = ChainOfExperts::<f32>::random(&device, config, 3, 4).unwrap();
        let x = device.alloc_zeros::<f32>(4 * config.dim).unwrap();
        let mut y = device.alloc_zeros::<f32>(4 * config.dim).unwrap();
        let mut short = device.alloc_zeros::<f32>(3).unwrap();
        let before = device.stats().launches;
        assert!(matches!(
            chain.forward(&x, 4, &mut short),
            Err(Error::Shape { argument: "y", .. })
        ));
        assert_eq!(device.stats().launches, before, "launched before rejecting y");
        chain.forward(&x, 4, &mut y).unwrap();
        let before = device.stats().launches;
        assert!(matches!(
            chain.backward(&x, &y, &mut short),
            Err(Error::Shape { argument: "dx", .. })
        ));
        assert_eq!(device.stats().launches, before, "launched before rejecting dx");
    }
}

/// An ESFT mask on a chain: the selected experts' gradients are summed over iterations like the
/// reference's, the frozen experts' are never written (here: still zero).
#[test]
fn a_masked_chain_accumulates_only_the_selected_experts() {
    for device in devices() {
        let config = small(RouterKind::Linear);
        let case = ChainCase::new::<f32>(config, 2, 12, 150);
        let mut chain = ChainOfExperts::<f32>::new(&device, config, &case.weights).unwrap();
        let selected = [true, false, true, false, false, true];
        let mask = moe_kernels::ops::gemm::ExpertMask::new(&device, &selected).unwrap();
        chain.set_expert_mask(Some(mask)).unwrap();
        let run = run_chain(&device, &mut chain, &case);
        let r = reference::chain(&config, &case.weights, &case.x, &case.dy, Some(&selected), &|v| {
            v as f32
        });
        let tol = layer_tolerance::<f32>(&config).scaled(2.0).over(12 * config.k * 2);
        assert_close("masked chain dW1", &run.w1, &r.grads.w1, tol);
        assert_close("masked chain dW2", &run.w2, &r.grads.w2, tol);
        let per_expert = run.w1.len() / config.experts;
        for e in (0..config.experts).filter(|&e| !selected[e]) {
            assert!(
                run.w1[e * per_expert..(e + 1) * per_expert].iter().all(|&v| v == 0.0),
                "frozen expert {e}"
            );
        }
        assert_close(
            "masked chain dx",
            &run.dx,
            &r.grads.dx,
            layer_tolerance::<f32>(&config).scaled(2.0),
        );
    }
}

/// An inference chain (one set of pass buffers, no losses, no gradients) gives the training
/// chain's y bit for bit, in 4 launches per iteration (at T = 14 the linear gate's decode kernel
/// also selects and builds the routing map), and refuses backward by name.
#[test]
fn an_inference_chain_forwards_like_a_training_one() {
    let config = MoeConfig {
        aux_alpha: 0.02,
        z_loss: 1e-3,
        max_tokens: 14,
        ..small(RouterKind::Linear)
    };
    for device in devices() {
        let case = ChainCase::new::<bf16>(config, 3, 14, 70);
        let x = device.upload(&to_t::<bf16>(&case.x)).unwrap();
        let mut outputs = Vec::new();
        for mode in [Mode::Training, Mode::Inference] {
            let mut chain = ChainOfExperts::<bf16>::with_mode(&device, config, &case.weights, mode).unwrap();
            assert_eq!(chain.mode(), mode);
            let mut y = device.alloc_zeros::<bf16>(case.x.len()).unwrap();
            let before = device.stats();
            chain.forward(&x, 14, &mut y).unwrap();
            let launches = device.stats().launches - before.launches;
            assert_eq!(device.stats().host_syncs, before.host_syncs, "{mode:?}: host syncs");
            if mode == Mode::Inference {
                assert_eq!(launches, 3 * 4, "inference launches");
                let mut dx = device.alloc_zeros::<bf16>(case.x.len()).unwrap();
                let refused = chain.backward(&x, &x, &mut dx).unwrap_err();
                assert!(
                    matches!(
                        refused,
                        Error::InvalidArgument {
                            argument: "backward",
                            ..
                        }
                    ),
                    "{refused}"
                );
                assert!(chain.expert_grads().w1.is_empty());
            }
            outputs.push(device.download(&y).unwrap());
        }
        assert_eq!(outputs[0], outputs[1], "inference y differs from training y");
    }
}
