//! ChainOfExperts and VqMoe over device weights (`LayerWeights`, `RouterWeights`, a codebook
//! buffer): bitwise the same as over `HostWeights`, stepped in place by name (the next pass
//! matches the reference at the new weights), wrong tensors named.
use crate::chain::{ChainCase, check_chain, run_chain};
use crate::common::devices;
use crate::support::{argument_of, small};
use crate::vq::{check_vq, config as vq_config, run_vq, vq_case};
use crate::weights::device_weights;
use half::bf16;
use moe_kernels::layers::vq::mix_config;
use moe_kernels::layers::{
    ChainOfExperts, HostWeights, LayerWeights, Mode, MoeConfig, RouterKind, RouterWeights, VqMoe, VqWeights,
};
use moe_kernels::{Device, DeviceBuffer};

type T = bf16;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `host`'s router uploaded into caller-held buffers.
fn router_weights(device: &Device, config: &MoeConfig, host: &HostWeights) -> RouterWeights<T> {
    let w = device_weights::<T>(device, config, host);
    RouterWeights::new(config, w.gate, w.gate_f32, w.selection_bias).unwrap()
}

fn chain_over_device_weights(device: &Device, case: &ChainCase) -> ChainOfExperts<T> {
    let config = case.config;
    let weights = LayerWeights::new(&config, device_weights::<T>(device, &config, &case.weights[0])).unwrap();
    let later = case.weights[1..]
        .iter()
        .map(|w| router_weights(device, &config, w))
        .collect();
    ChainOfExperts::from_weights(device, config, weights, later, Mode::Training).unwrap()
}

fn chain_config() -> MoeConfig {
    MoeConfig {
        shared_experts: 1,
        aux_alpha: 0.02,
        ..small(RouterKind::Linear)
    }
}

#[test]
fn a_chain_over_device_weights_is_bitwise_the_chain_over_host_weights_and_steps_in_place() {
    for device in devices() {
        let case = ChainCase::new::<T>(chain_config(), 3, 9, 71);
        let mut from_host = ChainOfExperts::<T>::new(&device, case.config, &case.weights).unwrap();
        let mut from_device = chain_over_device_weights(&device, &case);
        let (a, b) = (
            run_chain(&device, &mut from_host, &case),
            run_chain(&device, &mut from_device, &case),
        );
        for (what, x, y) in [
            ("y", &a.y, &b.y),
            ("dx", &a.dx, &b.dx),
            ("dW1", &a.w1, &b.w1),
            ("dW2", &a.w2, &b.w2),
            ("shared dW1", &a.shared_w1, &b.shared_w1),
        ] {
            assert_eq!(bits(x), bits(y), "{what}");
        }
        for (t, (ga, gb)) in a.routers.iter().zip(&b.routers).enumerate() {
            for ((na, va), (nb, vb)) in ga.iter().zip(gb) {
                assert_eq!((na, bits(va)), (nb, bits(vb)), "router {t}");
            }
        }
        check_chain::<T>("from device weights", &case, &b);
        assert_eq!(from_device.router_weights(2).unwrap().names(), ["gate.w", "gate.b"]);
        assert_eq!(argument_of(from_device.router_weights(3)), "iteration");

        // Iteration 3's router and the experts replaced in place by another draw's.
        let other = HostWeights::random(&case.config, 5).rounded::<T>(&case.config);
        let to_t = |v: &[f32]| v.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let router = from_device.router_weights_mut(2).unwrap();
        device
            .upload_into(&to_t(&other.gate[0].1), router.tensor_mut("gate.w").unwrap())
            .unwrap();
        device
            .upload_into(&other.gate[1].1, router.tensor_f32_mut("gate.b").unwrap())
            .unwrap();
        let w1 = from_device.weights_mut().tensor_mut("experts.w1").unwrap();
        device.upload_into(&to_t(&other.w1), w1).unwrap();
        let mut stepped = ChainCase {
            weights: case.weights.clone(),
            x: case.x.clone(),
            dy: case.dy.clone(),
            ..case
        };
        stepped.weights[2].gate = other.gate.clone();
        stepped.weights[0].w1 = other.w1.clone();
        let c = run_chain(&device, &mut from_device, &stepped);
        check_chain::<T>("after the in-place step", &stepped, &c);
        assert_ne!(bits(&b.y), bits(&c.y), "the step must move y");
    }
}

fn vq_over_device_weights(device: &Device, config: MoeConfig, weights: &VqWeights) -> VqMoe<T> {
    let layer = LayerWeights::new(&config, device_weights::<T>(device, &config, &weights.moe)).unwrap();
    let codebook: DeviceBuffer<T> = device.upload_from_f32(&weights.codebook).unwrap();
    let mix = mix_config(&config);
    let mix_w = device.upload_from_f32::<T>(&weights.mix_w).unwrap();
    let mix_b = device.upload(&weights.mix_b).unwrap();
    let mix_gate = RouterWeights::new(&mix, vec![("w", mix_w)], vec![("b", mix_b)], None).unwrap();
    VqMoe::from_weights(device, config, layer, codebook, mix_gate).unwrap()
}

#[test]
fn a_vq_layer_over_device_weights_is_bitwise_the_layer_over_host_weights_and_steps_in_place() {
    for device in devices() {
        let config = vq_config();
        let (case, weights) = vq_case::<T>(config, 10, 81);
        let mut from_host = VqMoe::<T>::new(&device, config, &weights).unwrap();
        let mut from_device = vq_over_device_weights(&device, config, &weights);
        let (a, b) = (
            run_vq(&device, &mut from_host, &case),
            run_vq(&device, &mut from_device, &case),
        );
        assert_eq!(a.codes, b.codes, "codes");
        for (what, x, y) in [
            ("y", &a.y, &b.y),
            ("dx", &a.dx, &b.dx),
            ("router dw", &a.router, &b.router),
            ("mix dw", &a.mix, &b.mix),
            ("dW1", &a.w1, &b.w1),
            ("dW2", &a.w2, &b.w2),
            ("dC", &a.codebook, &b.codebook),
            ("losses", &a.losses, &b.losses),
        ] {
            assert_eq!(bits(x), bits(y), "{what}");
        }
        check_vq::<T>("from device weights", &case, &weights, &b);

        // The codebook and the mixing gate replaced in place by another draw's.
        let other = VqWeights::random(&config, 3).rounded::<T>(&config);
        let to_t = |v: &[f32]| v.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        device
            .upload_into(&to_t(&other.codebook), from_device.codebook_mut())
            .unwrap();
        let mix = from_device.mix_weights_mut().tensor_mut("gate.w").unwrap();
        device.upload_into(&to_t(&other.mix_w), mix).unwrap();
        let stepped = VqWeights {
            codebook: other.codebook.clone(),
            mix_w: other.mix_w.clone(),
            ..weights.clone()
        };
        let c = run_vq(&device, &mut from_device, &case);
        check_vq::<T>("after the in-place step", &case, &stepped, &c);
        assert_ne!(bits(&b.y), bits(&c.y), "the step must move y");
    }
}

#[test]
fn chain_and_vq_weights_that_do_not_fit_are_named() {
    for device in devices() {
        // A later router checked against another config: refused with its index.
        let config = chain_config();
        let case = ChainCase::new::<T>(config, 2, 4, 90);
        let wider = MoeConfig { experts: 8, ..config };
        let weights = LayerWeights::new(&config, device_weights::<T>(&device, &config, &case.weights[0])).unwrap();
        let stranger = router_weights(&device, &wider, &HostWeights::random(&wider, 1));
        let built = ChainOfExperts::from_weights(&device, config, weights, vec![stranger], Mode::Training);
        assert_eq!(argument_of(built), "later_routers");

        // A router buffer swapped for one of another length: the next pass names it.
        let mut chain = chain_over_device_weights(&device, &case);
        *chain.router_weights_mut(1).unwrap().tensor_mut("gate.w").unwrap() = device.alloc_zeros(5).unwrap();
        let x = device.alloc_zeros::<T>(4 * config.dim).unwrap();
        let mut y = device.alloc_zeros::<T>(4 * config.dim).unwrap();
        assert_eq!(argument_of(chain.forward(&x, 4, &mut y)), "gate.w");

        let config = vq_config();
        let (_, weights) = vq_case::<T>(config, 4, 91);
        let layer = || LayerWeights::new(&config, device_weights::<T>(&device, &config, &weights.moe)).unwrap();
        let codebook = |len: usize| device.alloc_zeros::<T>(len).unwrap();
        let mix_gate =
            |gate_config: &MoeConfig| router_weights(&device, gate_config, &HostWeights::random(gate_config, 2));
        let full = config.experts * config.dim;
        let short_codebook = VqMoe::from_weights(
            &device,
            config,
            layer(),
            codebook(full - 1),
            mix_gate(&mix_config(&config)),
        );
        assert_eq!(argument_of(short_codebook), "codebook");
        // The layer's own router passed as the mixing gate (E outputs, not 2).
        let wrong_mix = VqMoe::from_weights(&device, config, layer(), codebook(full), mix_gate(&config));
        assert_eq!(argument_of(wrong_mix), "mix_gate");
        let mut vq = vq_over_device_weights(&device, config, &weights);
        *vq.codebook_mut() = codebook(3);
        assert_eq!(argument_of(vq.forward(&x, 4, &mut y)), "codebook");
    }
}
