//! The gradient contract of the layers: a backward computes and writes the routed weight
//! gradients of the experts that got rows only, says which on the device
//! (`ExpertGrads::written`), and `ExpertGrads::zero_unwritten` makes them dense. A decode-sized
//! pass after a full one must leave the other experts' buffers untouched, yet give the exact
//! gradient of the experts it wrote, in a MoeLayer and across a Chain-of-Experts' accumulation.
use crate::chain::{ChainCase, run_chain};
use crate::common::devices;
use crate::support::{Case, check_against_reference, dense, run, small};
use half::bf16;
use moe_kernels::Device;
use moe_kernels::layers::{ChainOfExperts, MoeLayer, RouterKind};
use moe_kernels::ops::FloatElement;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// The experts `ids` (one token's k choices) reach, as flags.
fn reached(ids: &[i32], experts: usize) -> Vec<bool> {
    (0..experts).map(|e| ids.contains(&(e as i32))).collect()
}

fn check_layer<T: FloatElement>(device: &Device) {
    let config = small(RouterKind::Linear);
    let full = Case::new::<T>(config, 24, 51);
    let one = Case {
        weights: full.weights.clone(),
        ..Case::new::<T>(config, 1, 52)
    };
    let mut layer = MoeLayer::<T>::new(device, config, &full.weights).unwrap();
    let before = run(device, &mut layer, &full);
    assert!(before.written.iter().all(|&w| w), "24 tokens reach every expert");
    let after = run(device, &mut layer, &one);
    let what = format!("{} on {}", T::NAME, device.description());
    assert_eq!(after.written, reached(&after.ids, config.experts), "{what}: written");
    check_against_reference::<T>(&format!("{what}: one token after 24"), &one, &after, None);
    let (w1_len, w2_len) = (before.w1.len() / config.experts, before.w2.len() / config.experts);
    for e in (0..config.experts).filter(|&e| !after.written[e]) {
        let (r1, r2) = (e * w1_len..(e + 1) * w1_len, e * w2_len..(e + 1) * w2_len);
        assert_eq!(
            bits(&after.w1[r1.clone()]),
            bits(&before.w1[r1]),
            "{what}: expert {e} dW1 written"
        );
        assert_eq!(
            bits(&after.w2[r2.clone()]),
            bits(&before.w2[r2]),
            "{what}: expert {e} dW2 written"
        );
    }
    layer.expert_grads_mut().zero_unwritten(device).unwrap();
    let grads = layer.expert_grads();
    let w1 = device.download(&grads.w1).unwrap();
    assert_eq!(
        bits(&w1),
        bits(&dense(&after.w1, &after.written)),
        "{what}: zero_unwritten dW1"
    );
    let w2 = device.download(&grads.w2).unwrap();
    assert_eq!(
        bits(&w2),
        bits(&dense(&after.w2, &after.written)),
        "{what}: zero_unwritten dW2"
    );
}

#[test]
fn a_decode_backward_writes_only_the_experts_it_reached() {
    for device in devices() {
        check_layer::<f32>(&device);
        check_layer::<bf16>(&device);
    }
}

/// A 3-iteration chain on 2 tokens after one on 24: an expert reached only by a later
/// iteration must be replaced there, not added to the stale gradient of the earlier pass, so the
/// dense gradients equal a fresh chain's bitwise.
#[test]
fn a_chain_accumulates_only_over_this_pass() {
    let config = small(RouterKind::Linear);
    for device in devices() {
        let full = ChainCase::new::<f32>(config, 3, 24, 61);
        let two = ChainCase {
            weights: full.weights.clone(),
            ..ChainCase::new::<f32>(config, 3, 2, 62)
        };
        let mut chain = ChainOfExperts::<f32>::new(&device, config, &full.weights).unwrap();
        run_chain::<f32>(&device, &mut chain, &full);
        let got = run_chain::<f32>(&device, &mut chain, &two);
        let written: Vec<bool> = device
            .download(chain.expert_grads().written())
            .unwrap()
            .iter()
            .map(|&f| f != 0)
            .collect();
        assert!(
            written.iter().any(|&w| !w),
            "2 tokens x 3 iterations left an expert out"
        );
        let mut fresh_chain = ChainOfExperts::<f32>::new(&device, config, &full.weights).unwrap();
        let fresh = run_chain::<f32>(&device, &mut fresh_chain, &two);
        assert_eq!(bits(&got.y), bits(&fresh.y), "y");
        assert_eq!(bits(&dense(&got.w1, &written)), bits(&fresh.w1), "dW1");
        assert_eq!(bits(&dense(&got.w2, &written)), bits(&fresh.w2), "dW2");
    }
}
