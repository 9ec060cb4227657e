//! ChainOfExperts and VqMoe captured into graphs (the API of `MoeLayer::capture`): a training
//! step replays bitwise equal to an eager layer's, on the captured inputs and after x and dy
//! change, with no host sync; an eager pass, a new mask or mutable gradients drop the graph.
use crate::chain::{ChainCase, run_chain};
use crate::common::devices;
use crate::support::{dense, download_f32, small, to_t};
use crate::vq::{config as vq_config, run_vq, vq_case};
use half::bf16;
use moe_kernels::layers::{Captures, ChainOfExperts, ExpertGrads, GraphIo, MoeConfig, RouterKind, VqMoe};
use moe_kernels::ops::FloatElement;
use moe_kernels::{Device, Error};

type Chain = ChainOfExperts<f32>;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// dW1 and dW2 as dense gradients (experts the pass did not write as zeros): the graph's layer
/// and the eager one hold different stale values there (the capture ran a pass of its own).
fn dense_grads(device: &Device, grads: &ExpertGrads) -> Vec<u32> {
    let written: Vec<bool> = device
        .download(grads.written())
        .unwrap()
        .iter()
        .map(|&f| f != 0)
        .collect();
    let mut all = dense(&device.download(&grads.w1).unwrap(), &written);
    all.extend(dense(&device.download(&grads.w2).unwrap(), &written));
    bits(&all)
}

/// Writes x and dy into a captured pass's buffers.
fn write_inputs<T: FloatElement>(device: &Device, mut io: GraphIo<'_, T>, x: &[f32], dy: &[f32]) {
    device.upload_into(&to_t::<T>(x), &mut io.x).unwrap();
    device.upload_into(&to_t::<T>(dy), &mut io.dy).unwrap();
}

/// Runs `replay`, checking that it launched and did not sync.
fn replay_checked(device: &Device, what: &str, replay: impl FnOnce() -> moe_kernels::Result<()>) {
    let before = device.stats();
    replay().unwrap();
    let after = device.stats();
    assert_eq!(after.host_syncs, before.host_syncs, "{what}: replay synced");
    assert!(after.launches > before.launches, "{what}: replay launched nothing");
}

/// y and dx of a captured pass's buffers.
fn outputs<T: FloatElement>(device: &Device, io: GraphIo<'_, T>) -> (Vec<f32>, Vec<f32>) {
    (download_f32(device, &io.y), download_f32(device, &io.dx))
}

fn chain_config() -> MoeConfig {
    MoeConfig {
        shared_experts: 1,
        aux_alpha: 0.02,
        ..small(RouterKind::Linear)
    }
}

fn check_chain<T: FloatElement>(device: &Device) {
    let config = chain_config();
    let weights = ChainCase::new::<T>(config, 3, 5, 300).weights;
    let cases: Vec<ChainCase> = (0..2)
        .map(|i| ChainCase {
            weights: weights.clone(),
            ..ChainCase::new::<T>(config, 3, 5, 300 + i)
        })
        .collect();
    let mut captured = ChainOfExperts::<T>::new(device, config, &weights).unwrap();
    captured.capture(5, Captures::ForwardBackward).unwrap();
    assert_eq!(captured.graph_tokens(), Some(5));
    let mut eager = ChainOfExperts::<T>::new(device, config, &weights).unwrap();
    for (i, case) in cases.iter().enumerate() {
        let what = format!("chain {} batch {i} on {}", T::NAME, device.description());
        write_inputs(device, captured.graph_io().unwrap(), &case.x, &case.dy);
        replay_checked(device, &what, || captured.replay());
        let (y, dx) = outputs(device, captured.graph_io().unwrap());
        let want = run_chain(device, &mut eager, case);
        assert_eq!(bits(&y), bits(&want.y), "{what}: y");
        assert_eq!(bits(&dx), bits(&want.dx), "{what}: dx");
        for t in 0..captured.iterations() {
            for ((name, g), (_, w)) in captured.router_grads(t).unwrap().tensors().iter().zip(&want.routers[t]) {
                assert_eq!(
                    bits(&device.download(g).unwrap()),
                    bits(w),
                    "{what}: router {t} d{name}"
                );
            }
        }
        assert_eq!(
            dense_grads(device, captured.expert_grads()),
            dense_grads(device, eager.expert_grads()),
            "{what}: dW1, dW2"
        );
    }
}

fn check_vq<T: FloatElement>(device: &Device) {
    let config = vq_config();
    let (first, weights) = vq_case::<T>(config, 6, 310);
    let (second, _) = vq_case::<T>(config, 6, 311);
    let mut captured = VqMoe::<T>::new(device, config, &weights).unwrap();
    captured.capture(6, Captures::ForwardBackward).unwrap();
    assert_eq!(captured.graph_tokens(), Some(6));
    let mut eager = VqMoe::<T>::new(device, config, &weights).unwrap();
    for (i, case) in [first, second].iter().enumerate() {
        let what = format!("VQ-MoE {} batch {i} on {}", T::NAME, device.description());
        write_inputs(device, captured.graph_io().unwrap(), &case.x, &case.dy);
        replay_checked(device, &what, || captured.replay());
        let (y, dx) = outputs(device, captured.graph_io().unwrap());
        let want = run_vq(device, &mut eager, case);
        let get = |b: &moe_kernels::DeviceBuffer<f32>| bits(&device.download(b).unwrap());
        assert_eq!(bits(&y), bits(&want.y), "{what}: y");
        assert_eq!(bits(&dx), bits(&want.dx), "{what}: dx");
        assert_eq!(
            device.download(&captured.codes().unwrap()).unwrap(),
            want.codes,
            "{what}: codes"
        );
        assert_eq!(
            get(&captured.router_grads().tensors()[0].1),
            bits(&want.router),
            "{what}: router"
        );
        assert_eq!(
            get(&captured.mix_grads().tensors()[0].1),
            bits(&want.mix),
            "{what}: mix"
        );
        assert_eq!(get(captured.codebook_grad()), bits(&want.codebook), "{what}: codebook");
        assert_eq!(get(captured.vq_losses()), bits(&want.losses[..2]), "{what}: VQ losses");
        assert_eq!(
            dense_grads(device, captured.expert_grads()),
            dense_grads(device, eager.expert_grads()),
            "{what}: dW1, dW2"
        );
    }
}

#[test]
fn captured_chain_and_vq_training_steps_replay_bitwise() {
    for device in devices() {
        check_chain::<f32>(&device);
        check_chain::<bf16>(&device);
        check_vq::<f32>(&device);
        check_vq::<bf16>(&device);
    }
}

/// The same events drop a chain's and a VQ-MoE's graph as a MoeLayer's.
#[test]
fn what_drops_a_chain_or_vq_graph() {
    let no_graph = |r: moe_kernels::Result<()>| matches!(r, Err(Error::InvalidArgument { argument: "graph", .. }));
    for device in devices() {
        let config = chain_config();
        let case = ChainCase::new::<f32>(config, 2, 4, 320);
        let mut chain = ChainOfExperts::<f32>::new(&device, config, &case.weights).unwrap();
        assert!(no_graph(chain.replay()), "a new chain has no graph");
        let drops: [&dyn Fn(&mut Chain); 3] = [
            &|c| drop(run_chain(&device, c, &case)),
            &|c| c.set_expert_mask(None).unwrap(),
            &|c| {
                c.expert_grads_mut();
            },
        ];
        for (i, drop_graph) in drops.iter().enumerate() {
            chain.capture(4, Captures::Forward).unwrap();
            chain.replay().unwrap();
            drop_graph(&mut chain);
            assert!(no_graph(chain.replay()), "chain change {i} kept the graph");
        }
        let (vq_case, weights) = vq_case::<f32>(vq_config(), 4, 321);
        let mut vq = VqMoe::<f32>::new(&device, vq_config(), &weights).unwrap();
        assert!(vq.capture(0, Captures::Forward).is_err(), "zero tokens");
        vq.capture(4, Captures::Forward).unwrap();
        vq.replay().unwrap();
        drop(run_vq(&device, &mut vq, &vq_case));
        assert!(no_graph(vq.replay()), "an eager VQ-MoE pass kept the graph");
        vq.capture(4, Captures::ForwardBackward).unwrap();
        vq.expert_grads_mut();
        assert!(no_graph(vq.replay()), "mutable VQ-MoE gradients kept the graph");
    }
}
