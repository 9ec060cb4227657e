//! MoeLayer: every router kind against the reference, finite differences, budgets, determinism,
//! bad configurations.
use crate::common::{assert_close, devices};
use crate::support::*;
use half::{bf16, f16};
use moe_kernels::layers::{HostWeights, Mode, MoeConfig, MoeLayer, RouterKind};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gate::GateForm;
use moe_kernels::ops::gemm::ExpertMask;
use moe_kernels::{Device, Error};

fn case_run<T: FloatElement>(device: &Device, config: MoeConfig, tokens: usize, seed: u64) -> (Case, Run) {
    let case = Case::new::<T>(config, tokens, seed);
    let mut layer = MoeLayer::<T>::new(device, config, &case.weights).unwrap();
    let run = run(device, &mut layer, &case);
    (case, run)
}

#[test]
fn every_router_kind_matches_the_reference_f32() {
    for device in devices() {
        for (i, (name, router)) in router_kinds().into_iter().enumerate() {
            // Alternate the options so every kind meets shared experts and both losses somewhere.
            let config = MoeConfig {
                shared_experts: i % 2,
                aux_alpha: if i % 3 == 0 { 0.01 } else { 0.0 },
                z_loss: if i % 3 == 1 { 1e-3 } else { 0.0 },
                ..small(router)
            };
            let (case, run) = case_run::<f32>(&device, config, 13 + i, 100 + i as u64);
            check_against_reference::<f32>(name, &case, &run, None);
        }
    }
}

#[test]
fn sixteen_bit_layers_match_the_reference() {
    for device in devices() {
        let config = MoeConfig {
            shared_experts: 1,
            aux_alpha: 0.01,
            z_loss: 1e-3,
            ..small(RouterKind::Quadratic {
                form: GateForm::LowRank,
                rank: 4,
            })
        };
        let (case, run) = case_run::<bf16>(&device, config, 20, 7);
        check_against_reference::<bf16>("bf16", &case, &run, None);
        let (case, run) = case_run::<f16>(&device, small(RouterKind::Linear), 17, 8);
        check_against_reference::<f16>("f16", &case, &run, None);
    }
}

/// Above the decode threshold (T > 64) a router whose forward tile holds every expert in one
/// block routes in one launch (`gate::scores_and_select`: the gate's tile with the selection and
/// the map's count fused): the routed forward takes 5 launches instead of 6, the fused kernel
/// runs, and forward and backward match the reference. The linear router on tensor cores (bf16)
/// and on split-tf32 tensor cores (f32), and a low-rank router (bf16, E = 6 <= 16); with the router losses
/// (token level, so their chunks are the tiles) still 5: they run in the same launch.
#[test]
fn tile_routers_route_in_one_launch() {
    fn check<T: FloatElement>(device: &Device, router: RouterKind, form: &str, losses: bool) {
        let config = MoeConfig {
            max_tokens: 100,
            aux_alpha: if losses { 0.01 } else { 0.0 },
            z_loss: if losses { 1e-3 } else { 0.0 },
            ..small(router)
        };
        let case = Case::new::<T>(config, 100, 12);
        let mut layer = MoeLayer::<T>::new(device, config, &case.weights).unwrap();
        let x = device.upload(&to_t::<T>(&case.x)).unwrap();
        let mut y = device.alloc_zeros::<T>(case.x.len()).unwrap();
        let before = device.stats();
        layer.forward(&x, case.tokens, &mut y).unwrap();
        let after = device.stats();
        let what = format!("{form} {}, T = 100, losses {losses}", T::NAME);
        assert_eq!(after.launches - before.launches, 5, "{what}: forward launches");
        assert_eq!(after.host_syncs, before.host_syncs);
        let fused = format!(
            "gate_route_{form}_{}_e{}",
            T::NAME,
            config.experts.next_power_of_two().max(32)
        );
        assert!(device.launch_configs().contains_key(fused.as_str()), "{fused} ran");
        let run = run(device, &mut layer, &case);
        check_against_reference::<T>(&what, &case, &run, None);
    }
    let low_rank = RouterKind::Quadratic {
        form: GateForm::LowRank,
        rank: 2,
    };
    for device in devices() {
        check::<bf16>(&device, RouterKind::Linear, "linear", false);
        check::<f32>(&device, RouterKind::Linear, "linear", true);
        check::<bf16>(&device, low_rank, "lowrank", false);
        check::<bf16>(&device, low_rank, "lowrank", true);
    }
}

#[test]
fn capacity_drops_slots_like_the_reference() {
    for device in devices() {
        let config = MoeConfig {
            capacity_factor: Some(0.5),
            shared_experts: 1,
            ..small(RouterKind::Linear)
        };
        let (case, run) = case_run::<f32>(&device, config, 24, 11);
        let f = case.reference::<f32>();
        assert!(f.map.inverse.contains(&-1), "capacity 0.5 must drop slots");
        check_against_reference::<f32>("capacity", &case, &run, None);
    }
}

/// d(loss)/d(every parameter kind) against central differences of the reference forward.
#[test]
fn gradients_match_finite_differences_for_every_router_kind() {
    for device in devices() {
        for (i, (name, router)) in router_kinds().into_iter().enumerate() {
            // Every other softmax router renormalizes its k weights (Mixtral's norm_topk_prob);
            // every third router scales them (DeepSeek's routed_scaling_factor).
            let config = MoeConfig {
                shared_experts: 1,
                aux_alpha: 0.05,
                z_loss: 0.01,
                normalize_topk: i % 2 == 1,
                route_scale: if i % 3 == 2 { 2.5 } else { 1.0 },
                ..small(router)
            };
            let normalized = if config.normalize_topk {
                ", normalized top-k"
            } else {
                ""
            };
            let name = &format!("{name}{normalized}, route scale {}", config.route_scale);
            let (case, run) = case_run::<f32>(&device, config, 12, 300 + i as u64);
            let (_, base_ids) = case.loss(&case.weights, &case.x);
            let seed = 900 + i as u64;
            let x_loss = |j: usize, eps: f32| {
                let mut x = case.x.clone();
                x[j] += eps;
                case.loss(&case.weights, &x)
            };
            check_finite_differences(&format!("{name}: dx"), &run.dx, 6, seed, x_loss, &base_ids);
            let weight_loss = |edit: &dyn Fn(&mut HostWeights)| {
                let mut w = case.weights.clone();
                edit(&mut w);
                case.loss(&w, &case.x)
            };
            for (tensor, grad) in &run.gate {
                let loss = |j: usize, eps: f32| {
                    weight_loss(&|w: &mut HostWeights| {
                        let t = w.gate.iter_mut().find(|(n, _)| n == tensor).unwrap();
                        t.1[j] += eps;
                    })
                };
                check_finite_differences(&format!("{name}: gate.{tensor}"), grad, 4, seed, loss, &base_ids);
            }
            let loss = |j: usize, eps: f32| weight_loss(&|w: &mut HostWeights| w.w1[j] += eps);
            check_finite_differences(&format!("{name}: W1"), &run.w1, 4, seed, loss, &base_ids);
            let loss = |j: usize, eps: f32| weight_loss(&|w: &mut HostWeights| w.w2[j] += eps);
            check_finite_differences(&format!("{name}: W2"), &run.w2, 4, seed, loss, &base_ids);
            let loss = |j: usize, eps: f32| weight_loss(&|w: &mut HostWeights| w.shared_w1[j] += eps);
            check_finite_differences(&format!("{name}: shared W1"), &run.shared_w1, 3, seed, loss, &base_ids);
            let loss = |j: usize, eps: f32| weight_loss(&|w: &mut HostWeights| w.shared_w2[j] += eps);
            check_finite_differences(&format!("{name}: shared W2"), &run.shared_w2, 3, seed, loss, &base_ids);
        }
    }
}

/// The routed forward of the linear and quadratic routers is at most 6 launches and neither
/// direction syncs with the host; the counts with losses and shared experts are stated too. At
/// T = 64 the linear router's decode gate also selects and builds the routing map (4); the
/// quadratic one does not.
#[test]
fn launch_and_host_sync_budgets() {
    for device in devices() {
        let quadratic = RouterKind::Quadratic {
            form: GateForm::LowRank,
            rank: 4,
        };
        // (router, shared experts, losses, forward launches, forward memsets, backward launches)
        let budgets = [
            (RouterKind::Linear, 0, false, 4, 0, 10),
            (quadratic, 0, false, 6, 0, 13),
            (RouterKind::Linear, 1, true, 4 + 2 + 1, 0, 10 + 5 + 1 + 1),
        ];
        for (router, shared, losses, forward, memsets, backward) in budgets {
            let config = MoeConfig {
                shared_experts: shared,
                aux_alpha: if losses { 0.01 } else { 0.0 },
                z_loss: if losses { 1e-3 } else { 0.0 },
                max_tokens: 64,
                ..small(router)
            };
            let case = Case::new::<f32>(config, 64, 5);
            let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
            let x = device.upload(&case.x).unwrap();
            let dy = device.upload(&case.dy).unwrap();
            let mut y = device.alloc_zeros::<f32>(case.x.len()).unwrap();
            let mut dx = device.alloc_zeros::<f32>(case.x.len()).unwrap();
            // A forward first: the measured one finds the map workspace as its last map left it.
            layer.forward(&x, case.tokens, &mut y).unwrap();
            let before = device.stats();
            layer.forward(&x, case.tokens, &mut y).unwrap();
            let middle = device.stats();
            layer.backward(&x, &dy, &mut dx).unwrap();
            let after = device.stats();
            let what = format!("{router:?}, {shared} shared, losses {losses}");
            assert_eq!(middle.launches - before.launches, forward, "{what}: forward launches");
            assert_eq!(middle.memsets - before.memsets, memsets, "{what}: forward memsets");
            assert_eq!(after.launches - middle.launches, backward, "{what}: backward launches");
            assert_eq!(after.host_syncs, before.host_syncs, "{what}: host syncs");
            assert_eq!(after.host_to_device, before.host_to_device, "{what}: uploads");
        }
    }
}

#[test]
fn repeats_are_bitwise_equal_and_fewer_tokens_reuse_the_buffers() {
    for device in devices() {
        let config = MoeConfig {
            shared_experts: 1,
            aux_alpha: 0.01,
            z_loss: 1e-3,
            ..small(RouterKind::Quadratic {
                form: GateForm::Symmetric,
                rank: 2,
            })
        };
        let case = Case::new::<bf16>(config, 24, 21);
        let mut layer = MoeLayer::<bf16>::new(&device, config, &case.weights).unwrap();
        let first = run(&device, &mut layer, &case);
        // A smaller batch in between must not disturb the next full one.
        let small_case = Case {
            weights: case.weights.clone(),
            ..Case::new::<bf16>(config, 5, 22)
        };
        let small_run = run(&device, &mut layer, &small_case);
        check_against_reference::<bf16>("5 tokens", &small_case, &small_run, None);
        let again = run(&device, &mut layer, &case);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&first.y), bits(&again.y), "y");
        assert_eq!(bits(&first.dx), bits(&again.dx), "dx");
        assert_eq!(bits(&first.w1), bits(&again.w1), "dW1");
        assert_eq!(bits(&first.w2), bits(&again.w2), "dW2");
        assert_eq!(bits(&first.shared_w1), bits(&again.shared_w1), "shared dW1");
        for ((_, a), (_, b)) in first.gate.iter().zip(&again.gate) {
            assert_eq!(bits(a), bits(b), "gate grads");
        }
        assert_eq!(first.aux.to_bits(), again.aux.to_bits(), "aux");
    }
}

#[test]
fn the_selection_bias_moves_against_the_load() {
    for device in devices() {
        let config = small(RouterKind::Sigmoid {
            groups: 2,
            topk_groups: 1,
        });
        let case = Case::new::<f32>(config, 24, 31);
        let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
        run(&device, &mut layer, &case);
        let counts = device.download(layer.expert_counts()).unwrap();
        let reference_counts: Vec<i32> = case.reference::<f32>().map.counts;
        assert_eq!(counts, reference_counts);
        // Through the layer: the bias is what the next forward selects with.
        layer.update_bias(0.5).unwrap();
        let mut moved = case.weights.clone();
        moved.router_bias = moe_kernels::reference::router::bias_update(0.5, &counts, &case.weights.router_bias);
        let moved_case = Case { weights: moved, ..case };
        let again = run(&device, &mut layer, &moved_case);
        check_against_reference::<f32>("after bias update", &moved_case, &again, None);
        let linear = MoeLayer::<f32>::random(&device, small(RouterKind::Linear), 1);
        assert!(matches!(
            linear.unwrap().update_bias(0.1),
            Err(Error::InvalidArgument { argument: "router", .. })
        ));
    }
}

#[test]
fn bad_configs_and_inputs_are_rejected_by_name() {
    for device in devices() {
        let base = small(RouterKind::Linear);
        let bad = |config: MoeConfig| argument_of(MoeLayer::<f32>::random(&device, config, 1));
        assert_eq!(bad(MoeConfig { k: 7, ..base }), "k");
        assert_eq!(bad(MoeConfig { experts: 0, ..base }), "experts");
        assert_eq!(bad(MoeConfig { max_tokens: 0, ..base }), "max_tokens");
        let groups = RouterKind::Sigmoid {
            groups: 4,
            topk_groups: 1,
        };
        assert_eq!(bad(small(groups)), "groups");
        assert_eq!(
            bad(MoeConfig {
                route_scale: f32::NAN,
                ..base
            }),
            "route_scale"
        );
        let codebook = MoeConfig {
            k: 1,
            route_scale: 2.0,
            ..small(RouterKind::Codebook)
        };
        assert_eq!(bad(codebook), "route_scale");
        let rank0 = RouterKind::Quadratic {
            form: GateForm::LowRank,
            rank: 0,
        };
        assert_eq!(bad(small(rank0)), "router.rank");
        let linear_form = RouterKind::Quadratic {
            form: GateForm::Linear,
            rank: 2,
        };
        assert_eq!(bad(small(linear_form)), "router.form");
        assert_eq!(
            bad(MoeConfig {
                aux_alpha: -1.0,
                ..base
            }),
            "aux_alpha"
        );
        assert_eq!(
            bad(MoeConfig {
                z_loss: f32::NAN,
                ..base
            }),
            "z_loss"
        );
        assert_eq!(
            bad(MoeConfig {
                capacity_factor: Some(-1.0),
                ..base
            }),
            "capacity.factor"
        );
        let odd = MoeConfig { dim: 30, ..base };
        assert_eq!(argument_of(MoeLayer::<bf16>::random(&device, odd, 1)), "dim");

        let mut weights = HostWeights::random(&base, 1);
        weights.w2.pop();
        assert_eq!(argument_of(MoeLayer::<f32>::new(&device, base, &weights)), "experts.w2");
        let mut weights = HostWeights::random(&base, 1);
        weights.gate[0].1.push(0.0);
        assert_eq!(argument_of(MoeLayer::<f32>::new(&device, base, &weights)), "gate.w");
        weights.gate[0].1.pop();
        weights.gate[1].1.push(0.0);
        assert_eq!(argument_of(MoeLayer::<f32>::new(&device, base, &weights)), "gate.b");

        let mut layer = MoeLayer::<f32>::random(&device, base, 1).unwrap();
        let x = device.alloc_zeros::<f32>(8 * base.dim).unwrap();
        let mut y = device.alloc_zeros::<f32>(8 * base.dim).unwrap();
        let mut dx = device.alloc_zeros::<f32>(8 * base.dim).unwrap();
        assert_eq!(argument_of(layer.backward(&x, &x, &mut dx)), "backward");
        assert_eq!(argument_of(layer.forward(&x, 25, &mut y)), "tokens");
        assert_eq!(argument_of(layer.forward(&x, 0, &mut y)), "tokens");
        assert_eq!(argument_of(layer.forward(&x, 7, &mut y)), "x");
        let mut short = device.alloc_zeros::<f32>(7).unwrap();
        assert_eq!(argument_of(layer.forward(&x, 8, &mut short)), "y");
        layer.forward(&x, 8, &mut y).unwrap();
        assert_eq!(argument_of(layer.backward(&x, &x, &mut short)), "dx");
        let wrong = ExpertMask::new(&device, &[true; 4]).unwrap();
        assert_eq!(argument_of(layer.set_expert_mask(Some(wrong))), "mask");
    }
}

/// Codebook (VQ) routing: the nearest code picks the expert with weight 1; the routed forward is
/// 6 launches (norms, nearest code, map, two GEMMs, combine), the gradient of x is a true one.
#[test]
fn the_codebook_router_matches_the_reference() {
    for device in devices() {
        let config = MoeConfig {
            k: 1,
            ..small(RouterKind::Codebook)
        };
        let (case, run) = case_run::<f32>(&device, config, 16, 140);
        check_against_reference::<f32>("codebook f32", &case, &run, None);
        assert!(run.gate.is_empty(), "a codebook router has no gradient");
        let (_, base_ids) = case.loss(&case.weights, &case.x);
        let x_loss = |j: usize, eps: f32| {
            let mut x = case.x.clone();
            x[j] += eps;
            case.loss(&case.weights, &x)
        };
        check_finite_differences("codebook: dx", &run.dx, 6, 141, x_loss, &base_ids);
        let shared = MoeConfig {
            shared_experts: 1,
            ..config
        };
        let (case, run) = case_run::<bf16>(&device, shared, 20, 142);
        check_against_reference::<bf16>("codebook bf16", &case, &run, None);

        let case = Case::new::<f32>(config, 24, 143);
        let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
        let x = device.upload(&case.x).unwrap();
        let mut y = device.alloc_zeros::<f32>(case.x.len()).unwrap();
        let before = device.stats();
        layer.forward(&x, case.tokens, &mut y).unwrap();
        let after = device.stats();
        assert_eq!(after.launches - before.launches, 6, "codebook-routed forward launches");
        assert_eq!(after.host_syncs, before.host_syncs);

        let bad = |config: MoeConfig| argument_of(MoeLayer::<f32>::random(&device, config, 1));
        assert_eq!(bad(MoeConfig { k: 2, ..config }), "k");
        assert_eq!(
            bad(MoeConfig {
                aux_alpha: 0.1,
                ..config
            }),
            "aux_alpha"
        );
        assert_eq!(bad(MoeConfig { z_loss: 0.1, ..config }), "z_loss");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// Shapes and options swept: E not a power of two, k up to E, odd T, d and h, every router
    /// kind, shared experts, capacity, both losses; forward and backward against the reference.
    #[test]
    fn shape_and_option_sweep(
        experts in 2usize..9,
        k_pick in 0usize..8,
        tokens in 1usize..20,
        dim in 1usize..5,
        hidden in 1usize..5,
        kind in 0usize..7,
        shared in 0usize..2,
        capacity in proptest::option::of(0.25f64..2.0),
        losses in proptest::bool::ANY,
        normalize in proptest::bool::ANY,
        scaled in proptest::bool::ANY,
        seed in 0u64..1000,
    ) {
        let router = match kind {
            6 => RouterKind::Codebook,
            i => router_kinds()[i].1,
        };
        let codebook = router == RouterKind::Codebook;
        // Group-limited routing needs E divisible by its groups: fall back to one group.
        let router = match router {
            RouterKind::Sigmoid { groups, .. } if experts % groups != 0 => {
                RouterKind::Sigmoid { groups: 1, topk_groups: 1 }
            }
            r => r,
        };
        let config = MoeConfig {
            router,
            experts,
            k: if codebook { 1 } else { 1 + k_pick % experts },
            normalize_topk: normalize,
            route_scale: if scaled && !codebook { 2.5 } else { 1.0 },
            dim: dim * 8,
            hidden: hidden * 8 - 3,
            shared_experts: shared,
            capacity_factor: capacity,
            aux_alpha: if losses && !codebook { 0.02 } else { 0.0 },
            z_loss: if losses && !codebook { 1e-3 } else { 0.0 },
            max_tokens: 20,
        };
        let config = match router {
            RouterKind::Sigmoid { groups, topk_groups, .. } if config.k > topk_groups * experts / groups => {
                MoeConfig { router: RouterKind::Sigmoid { groups: 1, topk_groups: 1 }, ..config }
            }
            _ => config,
        };
        for device in devices() {
            let (case, run) = case_run::<f32>(&device, config, tokens, seed);
            check_against_reference::<f32>(&format!("{config:?} T = {tokens}"), &case, &run, None);
        }
    }
}

/// Past `SMALL_MAP_MAX_SLOTS` (T·k > 4096) the routing map has several tiles; the selection
/// counts them (in the gate's tile kernel where one block holds every expert, else
/// `router::select_counted`), so the routed forward keeps its 5 or 6 launches (and no memset: the
/// last map left the workspace zeroed), without a host sync, and matches the reference.
#[test]
fn large_batches_keep_the_launch_budget() {
    let quadratic = RouterKind::Quadratic {
        form: GateForm::LowRank,
        rank: 4,
    };
    // (router, experts, forward launches): E = 6 fits a block of the f32 linear and low-rank
    // tiles (the gate selects), 129 does not (the router's own selection counts the map).
    let past_the_tile = moe_kernels::ops::gate::route_tile_max_experts::<f32>(GateForm::Linear) + 1;
    let routers = [
        (RouterKind::Linear, 6, 5),
        (quadratic, 6, 5),
        (RouterKind::Linear, past_the_tile, 6),
    ];
    for (device, (router, experts, launches)) in devices().into_iter().flat_map(|d| routers.map(|r| (d.clone(), r))) {
        // T·k just past one tile of the map: two tiles, the second with 2 slots.
        let tokens = moe_kernels::ops::dispatch::DEFAULT_TILE_SLOTS / 2 + 1;
        let config = MoeConfig {
            max_tokens: tokens,
            experts,
            ..small(router)
        };
        let case = Case::new::<f32>(config, tokens, 9);
        let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
        let x = device.upload(&case.x).unwrap();
        let mut y = device.alloc_zeros::<f32>(case.x.len()).unwrap();
        // Twice, with 3 tokens (one tile) in between: each map leaves the map workspace zeroed,
        // so no count needs a memset, and the second large batch has the first one's bits.
        let mut outputs = Vec::new();
        for batch in [tokens, 3, tokens] {
            let rows = batch * config.dim;
            let before = device.stats();
            let mut y_batch = y.slice_mut(..rows).unwrap();
            layer.forward(&x.slice(..rows).unwrap(), batch, &mut y_batch).unwrap();
            let after = device.stats();
            assert_eq!(after.memsets - before.memsets, 0, "{router:?}, T = {batch}");
            assert_eq!(after.host_syncs, before.host_syncs);
            if batch == tokens {
                assert_eq!(after.launches - before.launches, launches, "{router:?}, E = {experts}");
                outputs.push(
                    download_f32(&device, &y)
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                );
            }
        }
        assert_eq!(outputs[0], outputs[1], "{router:?}: the second large forward");
        let f = case.reference::<f32>();
        assert_close(
            &format!("large T, {router:?}: y"),
            &download_f32(&device, &y),
            &f.y,
            layer_tolerance::<f32>(&config),
        );
    }
}

/// An inference layer's forward is the training forward's output bit for bit, without the
/// router losses (here in the selection's launch: the same launches) and without gradient or
/// backward buffers; backward and losses are refused by name.
#[test]
fn inference_layers_forward_like_training_ones_and_refuse_backward() {
    fn check<T: FloatElement>(device: &Device) {
        let config = MoeConfig {
            shared_experts: 1,
            aux_alpha: 0.01,
            z_loss: 1e-3,
            max_tokens: 40,
            ..small(RouterKind::Quadratic {
                form: GateForm::LowRank,
                rank: 2,
            })
        };
        let config = MoeConfig {
            dim: 32,
            hidden: 16,
            ..config
        };
        let case = Case::new::<T>(config, 40, 21);
        let x = device.upload(&to_t::<T>(&case.x)).unwrap();
        let mut y = Vec::new();
        let mut launches = Vec::new();
        for mode in [Mode::Training, Mode::Inference] {
            let mut layer = MoeLayer::<T>::with_mode(device, config, &case.weights, mode).unwrap();
            assert_eq!(layer.mode(), mode);
            let mut out = device.alloc_zeros::<T>(case.x.len()).unwrap();
            let before = device.stats();
            layer.forward(&x, case.tokens, &mut out).unwrap();
            let after = device.stats();
            assert_eq!(after.host_syncs, before.host_syncs, "{mode:?}: host syncs");
            launches.push(after.launches - before.launches);
            y.push(device.download(&out).unwrap());
            if mode == Mode::Inference {
                assert!(layer.expert_grads().w1.is_empty() && layer.expert_grads().shared_w1.is_none());
                let mut dx = device.alloc_zeros::<T>(case.x.len()).unwrap();
                assert_eq!(argument_of(layer.backward(&x, &x, &mut dx)), "backward");
                assert_eq!(argument_of(layer.losses()), "losses");
            }
        }
        let bits = |v: &[T]| v.iter().map(|e| e.to_f32().to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y[0]), bits(&y[1]), "{}: inference y differs", T::NAME);
        // Training adds the router losses, which ride in the selection's launch (the low-rank
        // gate scores in a launch of its own, so the selection has one).
        assert_eq!(launches, [6 + 2, 6 + 2], "{}: (training, inference) launches", T::NAME);
    }
    for device in devices() {
        check::<f32>(&device);
        check::<bf16>(&device);
    }
}
