//! VqMoe: both paths, the mix and the VQ losses against the reference; finite differences of
//! the parameters whose gradients are true gradients (the straight-through estimator gives x and
//! the codes a surrogate gradient by design, checked against the reference instead).
use crate::common::{Tolerance, assert_close, devices};
use crate::support::*;
use half::bf16;
use moe_kernels::layers::{MoeConfig, RouterKind, VqMoe, VqWeights};
use moe_kernels::ops::FloatElement;
use moe_kernels::reference::layers as reference;
use moe_kernels::{Device, DeviceBuffer, Error};

pub struct VqRun {
    pub y: Vec<f32>,
    pub dx: Vec<f32>,
    pub codes: Vec<i32>,
    pub router: Vec<f32>,
    pub mix: Vec<f32>,
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
    pub codebook: Vec<f32>,
    pub losses: Vec<f32>,
}

pub fn run_vq<T: FloatElement>(device: &Device, layer: &mut VqMoe<T>, case: &Case) -> VqRun {
    let x = device.upload(&to_t::<T>(&case.x)).unwrap();
    let dy = device.upload(&to_t::<T>(&case.dy)).unwrap();
    let mut y = device.alloc_zeros::<T>(case.x.len()).unwrap();
    let mut dx = device.alloc_zeros::<T>(case.x.len()).unwrap();
    let before = device.stats();
    layer.forward(&x, case.tokens, &mut y).unwrap();
    layer.backward(&x, &dy, &mut dx).unwrap();
    assert_eq!(
        device.stats().host_syncs,
        before.host_syncs,
        "VQ-MoE synced with the host"
    );
    let get = |b: &DeviceBuffer<f32>| device.download(b).unwrap();
    let (aux, z) = layer.router_losses();
    let mut losses = get(layer.vq_losses());
    losses.extend(get(aux));
    losses.extend(get(z));
    VqRun {
        y: download_f32(device, &y),
        dx: download_f32(device, &dx),
        codes: device.download(&layer.codes().unwrap()).unwrap(),
        router: get(&layer.router_grads().tensors()[0].1),
        mix: get(&layer.mix_grads().tensors()[0].1),
        w1: get(&layer.expert_grads().w1),
        w2: get(&layer.expert_grads().w2),
        codebook: get(layer.codebook_grad()),
        losses,
    }
}

pub fn vq_case<T: FloatElement>(config: MoeConfig, tokens: usize, seed: u64) -> (Case, VqWeights) {
    let weights = VqWeights::random(&config, seed).rounded::<T>(&config);
    let case = Case {
        weights: weights.moe.clone(),
        ..Case::new::<T>(config, tokens, seed)
    };
    (case, weights)
}

pub fn check_vq<T: FloatElement>(what: &str, case: &Case, weights: &VqWeights, run: &VqRun) {
    let store = store_of::<T>();
    let f = reference::vq_forward(&case.config, weights, &case.x, case.tokens, &store);
    let g = reference::vq_backward(&case.config, weights, &case.x, &f, &case.dy, &store);
    assert_eq!(run.codes, f.codes, "{what}: codes");
    let tol = layer_tolerance::<T>(&case.config).scaled(2.0);
    let grad_tol = tol.over(case.tokens * case.config.k);
    assert_close(&format!("{what}: y"), &run.y, &f.y, tol);
    assert_close(&format!("{what}: dx"), &run.dx, &g.dx, tol);
    assert_close(&format!("{what}: router dw"), &run.router, &g.router[0].1, grad_tol);
    assert_close(&format!("{what}: mix dw"), &run.mix, &g.mix[0].1, grad_tol);
    assert_close(&format!("{what}: dW1"), &run.w1, &g.w1, grad_tol);
    assert_close(&format!("{what}: dW2"), &run.w2, &g.w2, grad_tol);
    assert_close(&format!("{what}: dC"), &run.codebook, &g.codebook, grad_tol);
    let want = [
        f.vq_losses[0],
        f.vq_losses[1],
        f.continuous.aux_loss,
        f.continuous.z_loss,
    ];
    assert_close(
        &format!("{what}: losses"),
        &run.losses,
        &want,
        Tolerance::F32.scaled(20.0),
    );
}

pub fn config() -> MoeConfig {
    MoeConfig {
        shared_experts: 1,
        aux_alpha: 0.02,
        z_loss: 1e-3,
        ..small(RouterKind::Linear)
    }
}

#[test]
fn both_paths_the_mix_and_the_losses_match_the_reference() {
    for device in devices() {
        let (case, weights) = vq_case::<f32>(config(), 18, 120);
        let mut layer = VqMoe::<f32>::new(&device, config(), &weights).unwrap();
        let run = run_vq(&device, &mut layer, &case);
        check_vq::<f32>("f32", &case, &weights, &run);
        let again = run_vq(&device, &mut layer, &case);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            (bits(&run.y), bits(&run.dx)),
            (bits(&again.y), bits(&again.dx)),
            "repeat"
        );
        assert_eq!(bits(&run.codebook), bits(&again.codebook), "repeat dC");

        let (case, weights) = vq_case::<bf16>(config(), 21, 121);
        let mut layer = VqMoe::<bf16>::new(&device, config(), &weights).unwrap();
        let run = run_vq(&device, &mut layer, &case);
        check_vq::<bf16>("bf16", &case, &weights, &run);
    }
}

#[test]
fn vq_weight_gradients_match_finite_differences() {
    for device in devices() {
        let (case, weights) = vq_case::<f32>(config(), 12, 130);
        let mut layer = VqMoe::<f32>::new(&device, config(), &weights).unwrap();
        let run = run_vq(&device, &mut layer, &case);
        let loss = |w: &VqWeights| {
            let f = reference::vq_forward(&case.config, w, &case.x, case.tokens, &|v| v as f32);
            let dot: f64 = f.y.iter().zip(&case.dy).map(|(y, &g)| y * g as f64).sum();
            let total = dot + f.vq_losses[0] + f.vq_losses[1] + f.continuous.aux_loss + f.continuous.z_loss;
            let ids = [f.continuous.ids.clone(), f.codes.clone()].concat();
            (total, ids)
        };
        let (_, base_ids) = loss(&weights);
        let edited = |edit: &dyn Fn(&mut VqWeights)| {
            let mut w = weights.clone();
            edit(&mut w);
            loss(&w)
        };
        let w1 = |j: usize, eps: f32| edited(&|w: &mut VqWeights| w.moe.w1[j] += eps);
        check_finite_differences("VQ W1", &run.w1, 5, 131, w1, &base_ids);
        let w2 = |j: usize, eps: f32| edited(&|w: &mut VqWeights| w.moe.w2[j] += eps);
        check_finite_differences("VQ W2", &run.w2, 5, 132, w2, &base_ids);
        let router = |j: usize, eps: f32| edited(&|w: &mut VqWeights| w.moe.gate[0].1[j] += eps);
        check_finite_differences("VQ router w", &run.router, 5, 133, router, &base_ids);
        let mix = |j: usize, eps: f32| edited(&|w: &mut VqWeights| w.mix_w[j] += eps);
        check_finite_differences("VQ mix w", &run.mix, 5, 134, mix, &base_ids);
    }
}

#[test]
fn bad_vq_inputs_are_rejected() {
    for device in devices() {
        let mut weights = VqWeights::random(&config(), 1);
        weights.codebook.pop();
        assert!(matches!(
            VqMoe::<f32>::new(&device, config(), &weights),
            Err(Error::Shape {
                argument: "weights.codebook",
                ..
            })
        ));
        let mut layer = VqMoe::<f32>::random(&device, config(), 2).unwrap();
        let x = device.alloc_zeros::<f32>(4 * config().dim).unwrap();
        let mut y = device.alloc_zeros::<f32>(4 * config().dim).unwrap();
        assert!(matches!(
            layer.backward(&x, &x, &mut y),
            Err(Error::InvalidArgument {
                argument: "backward",
                ..
            })
        ));
        assert!(matches!(
            layer.forward(&x, 5, &mut y),
            Err(Error::Shape { argument: "x", .. })
        ));
    }
}
