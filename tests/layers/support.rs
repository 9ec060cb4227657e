//! What the layer tests share: small configs, a layer run on the device, its reference, and
//! finite-difference checks.
#![allow(dead_code)]
use crate::common::{Rng, Tolerance, assert_close};
use moe_kernels::layers::{HostWeights, MoeConfig, MoeLayer, RouterKind};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::gate::GateForm;
use moe_kernels::reference::layers::{self as reference, MoeForward};
use moe_kernels::{Device, DeviceBuffer, DeviceSlice, Error};

/// The argument an `Err` names (panics on success or another kind of error).
pub fn argument_of(result: Result<impl Sized, Error>) -> &'static str {
    match result {
        Err(Error::InvalidArgument { argument, .. }) | Err(Error::Shape { argument, .. }) => argument,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("accepted a bad input"),
    }
}

/// A small config: d 32, h 32, E 6, k 2, up to 24 tokens.
pub fn small(router: RouterKind) -> MoeConfig {
    MoeConfig {
        router,
        experts: 6,
        k: 2,
        dim: 32,
        hidden: 32,
        max_tokens: 24,
        ..MoeConfig::default()
    }
}

/// Every router kind the layers offer, with a name for messages.
pub fn router_kinds() -> Vec<(&'static str, RouterKind)> {
    let quadratic = |form, rank| RouterKind::Quadratic { form, rank };
    vec![
        ("linear", RouterKind::Linear),
        ("lowrank", quadratic(GateForm::LowRank, 2)),
        ("symmetric", quadratic(GateForm::Symmetric, 3)),
        ("attention", quadratic(GateForm::Attention, 4)),
        ("full", quadratic(GateForm::Full, 0)),
        (
            "sigmoid",
            RouterKind::Sigmoid {
                groups: 3,
                topk_groups: 2,
            },
        ),
    ]
}

pub fn round_to<T: FloatElement>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

pub fn to_t<T: FloatElement>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

pub fn to_f32<T: FloatElement>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn store_of<T: FloatElement>() -> impl Fn(f64) -> f32 {
    |v| T::from_f32(v as f32).to_f32()
}

pub fn download_f32<T: FloatElement>(device: &Device, buffer: &impl DeviceSlice<T>) -> Vec<f32> {
    to_f32(&device.download(buffer).unwrap())
}

/// Inputs of one test case: weights already rounded to T, x and dy (rounded to T).
pub struct Case {
    pub config: MoeConfig,
    pub weights: HostWeights,
    pub tokens: usize,
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
}

impl Case {
    pub fn new<T: FloatElement>(config: MoeConfig, tokens: usize, seed: u64) -> Self {
        let weights = HostWeights::random(&config, seed).rounded::<T>(&config);
        let mut rng = Rng::new(seed ^ 0x5eed);
        let x = round_to::<T>(&rng.normals(tokens * config.dim, 1.0));
        let dy = round_to::<T>(&rng.normals(tokens * config.dim, 1.0));
        Self {
            config,
            weights,
            tokens,
            x,
            dy,
        }
    }

    pub fn reference<T: FloatElement>(&self) -> MoeForward {
        reference::moe_forward(
            &self.config,
            &self.weights,
            &self.x,
            self.tokens,
            None,
            &store_of::<T>(),
        )
    }

    /// The total loss `<y, dy> + aux + z` of the reference at these weights and x, and the ids.
    pub fn loss(&self, weights: &HostWeights, x: &[f32]) -> (f64, Vec<i32>) {
        let f = reference::moe_forward(&self.config, weights, x, self.tokens, None, &|v| v as f32);
        let dot: f64 = f.y.iter().zip(&self.dy).map(|(y, &g)| y * g as f64).sum();
        (dot + f.aux_loss + f.z_loss, f.ids)
    }
}

/// What a device layer produced for one case.
pub struct Run {
    pub y: Vec<f32>,
    pub ids: Vec<i32>,
    pub dx: Vec<f32>,
    pub gate: Vec<(&'static str, Vec<f32>)>,
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
    pub shared_w1: Vec<f32>,
    pub shared_w2: Vec<f32>,
    /// Which experts' routed gradients the backward wrote (`w1` and `w2` of the others hold
    /// whatever they held: see `ExpertGrads`, and [`dense`]).
    pub written: Vec<bool>,
    pub aux: f32,
    pub z: f32,
}

/// Forward and backward of `layer` on the case's x and dy, everything downloaded.
pub fn run<T: FloatElement>(device: &Device, layer: &mut MoeLayer<T>, case: &Case) -> Run {
    let x = device.upload(&to_t::<T>(&case.x)).unwrap();
    let dy = device.upload(&to_t::<T>(&case.dy)).unwrap();
    let mut y = device.alloc_zeros::<T>(case.x.len()).unwrap();
    let mut dx = device.alloc_zeros::<T>(case.x.len()).unwrap();
    layer.forward(&x, case.tokens, &mut y).unwrap();
    layer.backward(&x, &dy, &mut dx).unwrap();
    let (ids, _) = layer.routing().unwrap();
    let ids = device.download(&ids).unwrap();
    let losses = layer.losses().unwrap();
    let grads = layer.expert_grads();
    let opt = |b: &Option<DeviceBuffer<f32>>| b.as_ref().map_or(vec![], |b| device.download(b).unwrap());
    let written = device
        .download(grads.written())
        .unwrap()
        .iter()
        .map(|&f| f != 0)
        .collect();
    Run {
        y: download_f32(device, &y),
        ids,
        dx: download_f32(device, &dx),
        gate: layer
            .router_grads()
            .tensors()
            .iter()
            .map(|(name, b)| (*name, device.download(b).unwrap()))
            .collect(),
        w1: device.download(&grads.w1).unwrap(),
        w2: device.download(&grads.w2).unwrap(),
        shared_w1: opt(&grads.shared_w1),
        shared_w2: opt(&grads.shared_w2),
        written,
        aux: losses.aux,
        z: losses.z,
    }
}

/// The tolerance of a layer's outputs stored as T: a few roundings deep, reductions over d and h.
pub fn layer_tolerance<T: FloatElement>(config: &MoeConfig) -> Tolerance {
    let base = Tolerance::of::<T>().over(config.dim.max(config.hidden));
    if T::NAME == "f32" {
        base.scaled(4.0)
    } else {
        base.scaled(3.0)
    }
}

/// A routed weight gradient `[E, ..]` as the dense gradient: zeros for the experts not `written`.
pub fn dense(gradient: &[f32], written: &[bool]) -> Vec<f32> {
    let mut v = gradient.to_vec();
    let per_expert = v.len() / written.len();
    for (chunk, _) in v.chunks_mut(per_expert).zip(written).filter(|(_, w)| !**w) {
        chunk.fill(0.0);
    }
    v
}

/// Forward and backward of `run` against the reference of `case` (ids exact).
pub fn check_against_reference<T: FloatElement>(what: &str, case: &Case, run: &Run, selected: Option<&[bool]>) {
    let store = store_of::<T>();
    let f = case.reference::<T>();
    assert_eq!(run.ids, f.ids, "{what}: ids");
    let tol = layer_tolerance::<T>(&case.config);
    assert_close(&format!("{what}: y"), &run.y, &f.y, tol);
    assert_close(
        &format!("{what}: aux"),
        &[run.aux],
        &[f.aux_loss],
        Tolerance::F32.scaled(10.0),
    );
    assert_close(
        &format!("{what}: z-loss"),
        &[run.z],
        &[f.z_loss],
        Tolerance::F32.scaled(10.0),
    );
    let g = reference::moe_backward(
        &case.config,
        &case.weights,
        &case.x,
        &f,
        &case.dy,
        false,
        selected,
        &store,
    );
    let grad_tol = tol.over(case.tokens * case.config.k);
    let written: Vec<bool> = (0..case.config.experts)
        .map(|e| f.map.offsets[e + 1] > f.map.offsets[e] && selected.is_none_or(|s| s[e]))
        .collect();
    assert_eq!(
        run.written, written,
        "{what}: experts written (those with rows, selected)"
    );
    assert_close(&format!("{what}: dx"), &run.dx, &g.dx, tol);
    for ((name, got), (ref_name, want)) in run.gate.iter().zip(&g.gate) {
        assert_eq!(name, ref_name);
        assert_close(&format!("{what}: d gate.{name}"), got, want, grad_tol);
    }
    let (w1, w2) = (dense(&run.w1, &run.written), dense(&run.w2, &run.written));
    assert_close(&format!("{what}: dW1"), &w1, &g.w1, grad_tol);
    assert_close(&format!("{what}: dW2"), &w2, &g.w2, grad_tol);
    assert_close(&format!("{what}: d shared W1"), &run.shared_w1, &g.shared_w1, grad_tol);
    assert_close(&format!("{what}: d shared W2"), &run.shared_w2, &g.shared_w2, grad_tol);
}

/// `samples` coordinates of `analytic` against central differences of `loss` (which returns
/// the loss and the routing ids: a coordinate whose perturbation changes the routing is
/// skipped, the loss being discontinuous there). Panics unless at least one coordinate was
/// checked and every checked one agrees.
pub fn check_finite_differences(
    what: &str,
    analytic: &[f32],
    samples: usize,
    seed: u64,
    mut loss: impl FnMut(usize, f32) -> (f64, Vec<i32>),
    base_ids: &[i32],
) {
    const EPS: f32 = 4e-3;
    let mut rng = Rng::new(seed);
    let mut checked = 0;
    for _ in 0..samples {
        let i = rng.below(analytic.len());
        let (plus, ids_plus) = loss(i, EPS);
        let (minus, ids_minus) = loss(i, -EPS);
        if ids_plus != base_ids || ids_minus != base_ids {
            continue;
        }
        checked += 1;
        let numeric = (plus - minus) / (2.0 * EPS as f64);
        let got = analytic[i] as f64;
        let tol = 2e-3 + 2e-2 * numeric.abs();
        assert!(
            (got - numeric).abs() <= tol,
            "{what}[{i}]: analytic {got} vs finite difference {numeric}"
        );
    }
    assert!(checked > 0, "{what}: every sampled coordinate changed the routing");
}
