//! A layer's pass captured into a graph (`MoeLayer::capture`): replay equals the eager pass
//! bitwise (outputs, routing, gradients, losses), again after the inputs change, with the
//! captured launch count and no host sync; what drops the graph; what a capture refuses.
use crate::common::devices;
use crate::support::{Case, Run, run, small, to_t};
use half::bf16;
use moe_kernels::layers::{Captures, Mode, MoeConfig, MoeLayer, RouterKind};
use moe_kernels::ops::FloatElement;
use moe_kernels::{Device, DeviceSlice, Error};

type Layer = MoeLayer<f32>;

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|v| v.to_bits()).collect()
}

/// Writes the case's x and dy into the graph's buffers, replays, and downloads what [`run`]
/// downloads after an eager pass.
fn replay<T: FloatElement>(device: &Device, layer: &mut MoeLayer<T>, case: &Case) -> Run {
    let mut io = layer.graph_io().unwrap();
    device.upload_into(&to_t::<T>(&case.x), &mut io.x).unwrap();
    device.upload_into(&to_t::<T>(&case.dy), &mut io.dy).unwrap();
    let before = device.stats();
    layer.replay().unwrap();
    let after = device.stats();
    assert_eq!(after.host_syncs, before.host_syncs, "replay synced the host");
    assert!(after.launches > before.launches, "replay launched nothing");
    let io = layer.graph_io().unwrap();
    let y = crate::support::download_f32(device, &io.y);
    let dx = crate::support::download_f32(device, &io.dx);
    let grads = layer.expert_grads();
    let (ids, _) = layer.routing().unwrap();
    let losses = layer.losses().unwrap();
    Run {
        y,
        ids: device.download(&ids).unwrap(),
        dx,
        gate: layer
            .router_grads()
            .tensors()
            .iter()
            .map(|(n, b)| (*n, device.download(b).unwrap()))
            .collect(),
        w1: device.download(&grads.w1).unwrap(),
        w2: device.download(&grads.w2).unwrap(),
        shared_w1: grads.shared_w1.as_ref().map_or(vec![], |b| device.download(b).unwrap()),
        shared_w2: grads.shared_w2.as_ref().map_or(vec![], |b| device.download(b).unwrap()),
        written: device
            .download(grads.written())
            .unwrap()
            .iter()
            .map(|&f| f != 0)
            .collect(),
        aux: losses.aux,
        z: losses.z,
    }
}

fn assert_same(what: &str, got: &Run, want: &Run) {
    assert_eq!(bits(&got.y), bits(&want.y), "{what}: y");
    assert_eq!(got.ids, want.ids, "{what}: ids");
    assert_eq!(bits(&got.dx), bits(&want.dx), "{what}: dx");
    for ((name, g), (_, w)) in got.gate.iter().zip(&want.gate) {
        assert_eq!(bits(g), bits(w), "{what}: d gate.{name}");
    }
    assert_eq!(got.written, want.written, "{what}: written experts");
    let dense = |r: &Run| {
        (
            crate::support::dense(&r.w1, &r.written),
            crate::support::dense(&r.w2, &r.written),
        )
    };
    let ((g1, g2), (w1, w2)) = (dense(got), dense(want));
    assert_eq!((bits(&g1), bits(&g2)), (bits(&w1), bits(&w2)), "{what}: dW1, dW2");
    assert_eq!(bits(&got.shared_w1), bits(&want.shared_w1), "{what}: shared dW1");
    assert_eq!(
        (got.aux.to_bits(), got.z.to_bits()),
        (want.aux.to_bits(), want.z.to_bits()),
        "{what}: losses"
    );
}

/// A training step captured at T = 5: replay on the captured inputs and on two new batches
/// equals an eager layer's pass on each, bitwise.
fn check_training<T: FloatElement>(device: &Device) {
    let config = MoeConfig {
        shared_experts: 1,
        aux_alpha: 0.02,
        z_loss: 1e-3,
        ..small(RouterKind::Linear)
    };
    let cases: Vec<Case> = (0..3)
        .map(|i| {
            let c = Case::new::<T>(config, 5, 70 + i);
            Case {
                weights: Case::new::<T>(config, 5, 70).weights,
                ..c
            }
        })
        .collect();
    let mut captured = MoeLayer::<T>::new(device, config, &cases[0].weights).unwrap();
    captured.capture(5, Captures::ForwardBackward).unwrap();
    assert_eq!(captured.graph_tokens(), Some(5));
    let mut eager = MoeLayer::<T>::new(device, config, &cases[0].weights).unwrap();
    for (i, case) in cases.iter().enumerate() {
        let got = replay(device, &mut captured, case);
        let want = run(device, &mut eager, case);
        assert_same(
            &format!("{} batch {i} on {}", T::NAME, device.description()),
            &got,
            &want,
        );
    }
}

#[test]
fn a_captured_training_step_replays_bitwise() {
    for device in devices() {
        check_training::<f32>(&device);
        check_training::<bf16>(&device);
    }
}

#[test]
fn a_captured_inference_forward_replays_bitwise() {
    for device in devices() {
        let config = small(RouterKind::Sigmoid {
            groups: 3,
            topk_groups: 2,
        });
        let case = Case::new::<bf16>(config, 1, 80);
        let mut layer = MoeLayer::<bf16>::with_mode(&device, config, &case.weights, Mode::Inference).unwrap();
        assert!(matches!(
            layer.capture(1, Captures::ForwardBackward),
            Err(Error::InvalidArgument {
                argument: "captures",
                ..
            })
        ));
        layer.capture(1, Captures::Forward).unwrap();
        let x = device.upload(&to_t::<bf16>(&case.x)).unwrap();
        let mut io = layer.graph_io().unwrap();
        assert_eq!(DeviceSlice::len(&io.dy), 0, "a forward graph has no dy");
        device.upload_into(&to_t::<bf16>(&case.x), &mut io.x).unwrap();
        layer.replay().unwrap();
        let got = crate::support::download_f32(&device, &layer.graph_io().unwrap().y);
        let mut eager = MoeLayer::<bf16>::with_mode(&device, config, &case.weights, Mode::Inference).unwrap();
        let mut y = device.alloc_zeros::<bf16>(config.dim).unwrap();
        eager.forward(&x, 1, &mut y).unwrap();
        assert_eq!(bits(&got), bits(&crate::support::download_f32(&device, &y)), "y");
    }
}

/// An eager pass, a new mask or mutable gradients drop the graph (replay is then an `Err`
/// naming it); a capture refuses an allocation, an upload or a download inside it, and leaves
/// the device usable.
#[test]
fn what_drops_a_graph_and_what_a_capture_refuses() {
    for device in devices() {
        let config = small(RouterKind::Linear);
        let case = Case::new::<f32>(config, 4, 90);
        let mut layer = MoeLayer::<f32>::new(&device, config, &case.weights).unwrap();
        let no_graph =
            |layer: &mut MoeLayer<f32>| matches!(layer.replay(), Err(Error::InvalidArgument { argument: "graph", .. }));
        assert!(no_graph(&mut layer), "a new layer has no graph");
        let drops: [&dyn Fn(&mut Layer); 3] = [
            &|l| drop(run(&device, l, &case)),
            &|l| l.set_expert_mask(None).unwrap(),
            &|l| {
                l.expert_grads_mut();
            },
        ];
        for (i, drop_graph) in drops.iter().enumerate() {
            layer.capture(4, Captures::ForwardBackward).unwrap();
            layer.replay().unwrap();
            drop_graph(&mut layer);
            assert!(no_graph(&mut layer), "change {i} kept the graph");
        }
        assert!(
            layer.capture(config.max_tokens + 1, Captures::Forward).is_err(),
            "tokens past max_tokens"
        );
        let refused = |r: moe_kernels::Result<moe_kernels::Graph>| {
            matches!(
                r,
                Err(Error::InvalidArgument {
                    argument: "capture",
                    ..
                })
            )
        };
        assert!(refused(device.capture(|| device.alloc_zeros::<f32>(4).map(drop))));
        assert!(refused(device.capture(|| device.upload(&[1.0f32]).map(drop))));
        let buffer = device.upload(&[1.0f32]).unwrap();
        assert!(refused(device.capture(|| device.download(&buffer).map(drop))));
        assert!(refused(device.capture(|| device.capture(|| Ok(())).map(drop))));
        let mut into = device.alloc_zeros::<f32>(1).unwrap();
        assert!(refused(device.capture(|| device.upload_into(&[2.0], &mut into))));
        assert_eq!(
            device.download(&buffer).unwrap(),
            [1.0],
            "the device after refused captures"
        );
    }
}
