//! Layers over device weights (`LayerWeights`, `DeviceWeights`): bitwise the same as from
//! `HostWeights`, stepped in place, a gate without a bias, errors naming the tensor; what the
//! layers show of their routing (router logits, Chain-of-Experts per iteration); the sigmoid
//! router with and without renormalized top-k.
use crate::common::{Tolerance, assert_close, devices};
use crate::support::*;
use half::bf16;
use moe_kernels::layers::{
    ChainOfExperts, DeviceWeights, HostWeights, LayerWeights, Mode, MoeConfig, MoeLayer, RouterKind,
};
use moe_kernels::ops::FloatElement;
use moe_kernels::reference::layers as reference;
use moe_kernels::{Device, DeviceBuffer};

/// `host` uploaded tensor by tensor into the device buffers a caller would hold.
pub fn device_weights<T: FloatElement>(device: &Device, config: &MoeConfig, host: &HostWeights) -> DeviceWeights<T> {
    let up = |v: &[f32]| device.upload_from_f32::<T>(v).unwrap();
    let f32_gate =
        |name: &str| name == "c" || (config.gate_form() == moe_kernels::ops::gate::GateForm::Linear && name == "b");
    DeviceWeights {
        gate: host
            .gate
            .iter()
            .filter(|(n, _)| !f32_gate(n))
            .map(|(n, v)| (*n, up(v)))
            .collect(),
        gate_f32: host
            .gate
            .iter()
            .filter(|(n, _)| f32_gate(n))
            .map(|(n, v)| (*n, device.upload(v).unwrap()))
            .collect(),
        selection_bias: (!host.router_bias.is_empty()).then(|| device.upload(&host.router_bias).unwrap()),
        w1: up(&host.w1),
        w2: up(&host.w2),
        shared: (config.shared_experts > 0).then(|| (up(&host.shared_w1), up(&host.shared_w2))),
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_bitwise(what: &str, a: &Run, b: &Run) {
    assert_eq!(bits(&a.y), bits(&b.y), "{what}: y");
    assert_eq!(bits(&a.dx), bits(&b.dx), "{what}: dx");
    assert_eq!(bits(&a.w1), bits(&b.w1), "{what}: dW1");
    assert_eq!(bits(&a.w2), bits(&b.w2), "{what}: dW2");
    assert_eq!(bits(&a.shared_w1), bits(&b.shared_w1), "{what}: shared dW1");
    assert_eq!(a.gate.len(), b.gate.len(), "{what}: gate gradients");
    for ((na, ga), (nb, gb)) in a.gate.iter().zip(&b.gate) {
        assert_eq!((na, bits(ga)), (nb, bits(gb)), "{what}: d gate");
    }
}

fn device_vs_host<T: FloatElement>(device: &Device, what: &str, config: MoeConfig, case: &Case) {
    let mut from_host = MoeLayer::<T>::new(device, config, &case.weights).unwrap();
    let weights = LayerWeights::new(&config, device_weights::<T>(device, &config, &case.weights)).unwrap();
    let mut from_device = MoeLayer::<T>::from_weights(device, config, weights, Mode::Training).unwrap();
    let (a, b) = (run(device, &mut from_host, case), run(device, &mut from_device, case));
    assert_bitwise(what, &a, &b);
    check_against_reference::<T>(what, case, &b, None);
}

#[test]
fn a_layer_over_device_weights_is_bitwise_the_layer_over_host_weights() {
    for device in devices() {
        let sigmoid = MoeConfig {
            shared_experts: 1,
            normalize_topk: true,
            route_scale: 2.5,
            ..small(RouterKind::Sigmoid {
                groups: 3,
                topk_groups: 2,
            })
        };
        device_vs_host::<f32>(&device, "f32 sigmoid", sigmoid, &Case::new::<f32>(sigmoid, 11, 3));
        // Mixtral's router: no gate bias.
        let mixtral = MoeConfig {
            normalize_topk: true,
            ..small(RouterKind::Linear)
        };
        let mut case = Case::new::<bf16>(mixtral, 9, 4);
        case.weights.gate.retain(|(n, _)| *n != "b");
        device_vs_host::<bf16>(&device, "bf16 without gate.b", mixtral, &case);
    }
}

/// An SGD step written into the layer's own buffers changes the next forward exactly as the
/// reference at the stepped weights says.
#[test]
fn weights_stepped_in_place_change_the_next_forward_as_the_reference_predicts() {
    for device in devices() {
        let config = MoeConfig {
            shared_experts: 1,
            ..small(RouterKind::Linear)
        };
        let case = Case::new::<f32>(config, 10, 21);
        let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
        let first = run(&device, &mut layer, &case);
        let lr = 0.5;
        let mut stepped = case.weights.clone();
        let step = |w: &mut Vec<f32>, g: &[f32]| w.iter_mut().zip(g).for_each(|(w, g)| *w -= lr * g);
        let names = ["experts.w1", "experts.w2", "shared.w1", "shared.w2", "gate.w"];
        for name in names {
            let grad = device.download(layer.grad(name).unwrap()).unwrap();
            let host = match name {
                "experts.w1" => &mut stepped.w1,
                "experts.w2" => &mut stepped.w2,
                "shared.w1" => &mut stepped.shared_w1,
                "shared.w2" => &mut stepped.shared_w2,
                _ => &mut stepped.gate[0].1,
            };
            step(host, &grad);
            device
                .upload_into(host, layer.weights_mut().unwrap().tensor_mut(name).unwrap())
                .unwrap();
        }
        let db = device.download(layer.grad("gate.b").unwrap()).unwrap();
        step(&mut stepped.gate[1].1, &db);
        device
            .upload_into(
                &stepped.gate[1].1,
                layer.weights_mut().unwrap().tensor_f32_mut("gate.b").unwrap(),
            )
            .unwrap();
        let stepped_case = Case {
            weights: stepped,
            ..case
        };
        let second = run(&device, &mut layer, &stepped_case);
        check_against_reference::<f32>("after the step", &stepped_case, &second, None);
        assert_ne!(bits(&first.y), bits(&second.y), "the step must move y");
        let downloaded = device.download(layer.weights().tensor("experts.w1").unwrap()).unwrap();
        assert_eq!(bits(&downloaded), bits(&stepped_case.weights.w1));
        // Handing the buffers back returns what the layer holds now.
        let back = layer.into_weights().unwrap().into_device();
        assert_eq!(
            bits(&device.download(&back.w2).unwrap()),
            bits(&stepped_case.weights.w2)
        );
    }
}

#[test]
fn wrong_or_missing_tensors_are_named() {
    for device in devices() {
        let config = MoeConfig {
            shared_experts: 1,
            ..small(RouterKind::Linear)
        };
        let host = HostWeights::random(&config, 5);
        let build = |edit: &dyn Fn(&mut DeviceWeights<f32>)| {
            let mut weights = device_weights::<f32>(&device, &config, &host);
            edit(&mut weights);
            argument_of(LayerWeights::new(&config, weights))
        };
        let short = |len: usize| device.alloc_zeros::<f32>(len).unwrap();
        assert_eq!(build(&|w| w.gate.clear()), "gate.w");
        assert_eq!(build(&|w| w.gate_f32[0].1 = short(5)), "gate.b");
        assert_eq!(build(&|w| w.w1 = short(7)), "experts.w1");
        assert_eq!(build(&|w| w.w2 = short(7)), "experts.w2");
        assert_eq!(build(&|w| w.shared = None), "shared.w1");
        assert_eq!(build(&|w| w.shared.as_mut().unwrap().1 = short(3)), "shared.w2");
        assert_eq!(build(&|w| w.selection_bias = Some(short(6))), "gate.selection_bias");
        // The linear gate keeps its bias in f32: given as T it is refused by name.
        assert_eq!(build(&|w| w.gate.push(("b", short(6)))), "gate.b");
        assert_eq!(build(&|w| w.gate.push(("u", short(6)))), "gate");
        assert_eq!(build(&|w| w.gate.push(("w", short(6 * 32)))), "gate.w");
        let sigmoid = small(RouterKind::Sigmoid {
            groups: 1,
            topk_groups: 1,
        });
        let mut weights = HostWeights::random(&sigmoid, 5);
        weights.router_bias.clear();
        assert_eq!(
            argument_of(MoeLayer::<f32>::new(&device, sigmoid, &weights)),
            "gate.selection_bias"
        );
        let mut weights = HostWeights::random(&config, 5);
        weights.w2.pop();
        assert_eq!(
            argument_of(MoeLayer::<f32>::new(&device, config, &weights)),
            "experts.w2"
        );

        // A buffer replaced through `tensor_mut` by one of another length: the next pass refuses.
        let mut layer = MoeLayer::<f32>::new(&device, config, &host).unwrap();
        assert_eq!(argument_of(layer.weights().tensor("gate.b")), "name");
        assert_eq!(argument_of(layer.weights().tensor_f32("experts.w1")), "name");
        assert_eq!(argument_of(layer.grad("gate.selection_bias")), "name");
        *layer.weights_mut().unwrap().tensor_mut("experts.w2").unwrap() = short(5);
        let x = device.alloc_zeros::<f32>(4 * config.dim).unwrap();
        let mut y = device.alloc_zeros::<f32>(4 * config.dim).unwrap();
        assert_eq!(argument_of(layer.forward(&x, 4, &mut y)), "experts.w2");
        let inference = MoeLayer::<f32>::with_mode(&device, config, &host, Mode::Inference).unwrap();
        assert_eq!(argument_of(inference.grad("experts.w1")), "name");
    }
}

/// One copy of the weights read by a decode layer and a training layer: each gives bitwise
/// what a layer owning its weights gives; nothing can step them while both hold them.
#[test]
fn layers_sharing_one_copy_of_the_weights_run_as_owners_and_cannot_step_them() {
    for device in devices() {
        let config = MoeConfig {
            shared_experts: 1,
            ..small(RouterKind::Sigmoid {
                groups: 3,
                topk_groups: 2,
            })
        };
        let case = Case::new::<bf16>(config, 6, 33);
        let mut owner = MoeLayer::<bf16>::new(&device, config, &case.weights).unwrap();
        let want = run(&device, &mut owner, &case);
        let weights = std::sync::Arc::new(owner.into_weights().unwrap());
        let decode_config = MoeConfig {
            max_tokens: 8,
            ..config
        };
        let mut decode =
            MoeLayer::<bf16>::from_shared_weights(&device, decode_config, weights.clone(), Mode::Inference).unwrap();
        let mut training = MoeLayer::<bf16>::from_shared_weights(&device, config, weights, Mode::Training).unwrap();
        assert!(std::ptr::eq(decode.weights(), training.weights()), "one copy");
        assert_bitwise("shared, training", &want, &run(&device, &mut training, &case));
        let x = device.upload(&to_t::<bf16>(&case.x)).unwrap();
        let mut y = device.alloc_zeros::<bf16>(case.x.len()).unwrap();
        decode.forward(&x, case.tokens, &mut y).unwrap();
        assert_eq!(bits(&download_f32(&device, &y)), bits(&want.y), "shared, decode: y");

        assert_eq!(argument_of(training.weights_mut()), "weights");
        assert_eq!(argument_of(training.update_bias(0.01)), "weights");
        assert_eq!(argument_of(decode.into_weights()), "weights");
        // The decode layer is gone: the training layer holds the weights alone again.
        training.weights_mut().unwrap();
        training.update_bias(0.01).unwrap();
        training.into_weights().unwrap();
    }
}

/// DeepSeek-V3 with `norm_topk_prob` either way: the combine weights are the k sigmoid scores
/// of the logits the layer shows, times the route scale, divided by their sum when asked.
#[test]
fn the_sigmoid_router_honours_normalize_topk() {
    for device in devices() {
        for normalize in [false, true] {
            let config = MoeConfig {
                normalize_topk: normalize,
                route_scale: 2.5,
                ..small(RouterKind::Sigmoid {
                    groups: 3,
                    topk_groups: 2,
                })
            };
            let case = Case::new::<f32>(config, 12, 40);
            let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
            let run = run(&device, &mut layer, &case);
            check_against_reference::<f32>(&format!("normalize_topk {normalize}"), &case, &run, None);
            let f = case.reference::<f32>();
            let logits = device.download(&layer.router_logits().unwrap()).unwrap();
            assert_close(
                "router logits",
                &logits,
                &f.z.iter().map(|&v| v as f64).collect::<Vec<_>>(),
                Tolerance::F32,
            );
            let (ids, weights) = layer.routing().unwrap();
            let (ids, weights) = (device.download(&ids).unwrap(), device.download(&weights).unwrap());
            let k = config.k;
            let mut expected = vec![];
            for t in 0..case.tokens {
                let scores: Vec<f64> = (0..k)
                    .map(|j| 1.0 / (1.0 + (-(logits[t * config.experts + ids[t * k + j] as usize] as f64)).exp()))
                    .collect();
                let sum: f64 = if normalize { scores.iter().sum() } else { 1.0 };
                expected.extend(scores.iter().map(|s| 2.5 * s / sum));
            }
            assert_close("combine weights", &weights, &expected, Tolerance::F32.scaled(4.0));
        }
    }
}

/// Chain-of-Experts shows each iteration's routing, logits and input.
#[test]
fn chain_of_experts_shows_every_iteration() {
    for device in devices() {
        let config = MoeConfig {
            aux_alpha: 0.01,
            ..small(RouterKind::Linear)
        };
        let tokens = 7;
        let case = Case::new::<f32>(config, tokens, 50);
        let weights: Vec<HostWeights> = (0..3).map(|t| HostWeights::random(&config, 60 + t)).collect();
        let r = reference::chain(&config, &weights, &case.x, &case.dy, None, &store_of::<f32>());
        for mode in [Mode::Training, Mode::Inference] {
            let mut chain = ChainOfExperts::<f32>::with_mode(&device, config, &weights, mode).unwrap();
            let x = device.upload(&case.x).unwrap();
            let mut y = device.alloc_zeros::<f32>(case.x.len()).unwrap();
            chain.forward(&x, tokens, &mut y).unwrap();
            for (t, f) in r.iterations.iter().enumerate() {
                let kept = mode == Mode::Training || t == 2;
                if !kept {
                    assert_eq!(argument_of(chain.routing(t)), "iteration");
                    continue;
                }
                let (ids, weights) = chain.routing(t).unwrap();
                assert_eq!(device.download(&ids).unwrap(), f.ids, "iteration {t}: ids");
                let weights = device.download(&weights).unwrap();
                let want: Vec<f64> = f.weights.iter().map(|&w| w as f64).collect();
                assert_close(&format!("iteration {t}: weights"), &weights, &want, Tolerance::F32);
                let logits = device.download(&chain.router_logits(t).unwrap()).unwrap();
                let want: Vec<f64> = f.z.iter().map(|&z| z as f64).collect();
                assert_close(&format!("iteration {t}: logits"), &logits, &want, Tolerance::F32);
            }
            for t in 1..3 {
                let input = device.download(&chain.input(t).unwrap()).unwrap();
                let tol = layer_tolerance::<f32>(&config);
                assert_close(&format!("x({t})"), &input, &r.iterations[t - 1].y, tol);
            }
            assert_eq!(argument_of(chain.input(0)), "iteration");
            assert_eq!(argument_of(chain.routing(3)), "iteration");
        }
    }
}

/// f32 host data rounded into bf16 device buffers is what `bf16::from_f32` gives.
#[test]
fn upload_from_f32_rounds_like_the_host() {
    for device in devices() {
        let values = [0.1f32, -2.7, 1e-3, 65504.0, 3.0e38];
        let buffer: DeviceBuffer<bf16> = device.upload_from_f32(&values).unwrap();
        let want: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(device.download(&buffer).unwrap(), want);
    }
}
