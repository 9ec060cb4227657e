//! The parameters of a routed pass: a router's gate tensors ([`RouterWeights`]) and their gradients
//! ([`RouterGrads`]), the experts ([`Experts`]) and theirs ([`ExpertGrads`]), uploaded once from
//! [`HostWeights`] or taken over from device buffers ([`DeviceWeights`](super::DeviceWeights)).
use super::weights::{HostWeights, gate_name, gate_tensor_is_f32, gate_tensor_is_optional, gate_tensor_lens};
use super::{Mode, MoeConfig, RouterKind};
use crate::ops::gate::{GateForm, GateGrads, GateWeights};
use crate::ops::{FloatElement, gemm};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Element, Error, Result};

/// A host tensor as a `T` device buffer (one upload); an empty one is absent.
fn upload_present<T: FloatElement>(device: &Device, values: &[f32]) -> Result<Option<DeviceBuffer<T>>> {
    if values.is_empty() {
        return Ok(None);
    }
    device.upload_from_f32(values).map(Some)
}

/// `Err` naming `argument` unless `buffer` holds `expected` elements (`None`: the tensor is
/// missing).
pub(crate) fn check_tensor<T: Element>(
    argument: &'static str,
    buffer: Option<&DeviceBuffer<T>>,
    expected: usize,
) -> Result<()> {
    let got = match buffer {
        Some(b) if b.len() == expected => return Ok(()),
        Some(b) => format!("{} elements", b.len()),
        None => "no tensor".into(),
    };
    Err(Error::Shape {
        argument,
        expected: format!("{expected} elements of {}", T::NAME),
        got,
    })
}

fn unexpected(argument: &'static str, value: impl Into<String>, expected: impl Into<String>) -> Error {
    Error::InvalidArgument {
        argument,
        value: value.into(),
        expected: expected.into(),
    }
}

/// One router's tensors on the device, checked against a [`MoeConfig`]: its gate tensors
/// (`ops::gate` layouts, f32 where the gate keeps f32) and the sigmoid router's selection bias.
/// A [`LayerWeights`](super::LayerWeights) holds one; a
/// [`ChainOfExperts`](super::ChainOfExperts) one per iteration; a [`VqMoe`](super::VqMoe)'s
/// mixing gate is one. Read and stepped by name like the layer's weights (`gate.w`, `gate.b`,
/// ..., `gate.selection_bias`).
pub struct RouterWeights<T: FloatElement> {
    form: GateForm,
    pub(crate) stored: Vec<(&'static str, DeviceBuffer<T>)>,
    pub(crate) stored_f32: Vec<(&'static str, DeviceBuffer<f32>)>,
    pub(crate) bias: Option<DeviceBuffer<f32>>,
}

impl<T: FloatElement> RouterWeights<T> {
    /// `host`'s gate tensors and selection bias uploaded to `device`, rounded to `T` (the gate's
    /// f32 tensors kept f32); its expert tensors are not read.
    pub fn upload(device: &Device, config: &MoeConfig, host: &HostWeights) -> Result<Self> {
        let form = config.gate_form();
        let (mut stored, mut stored_f32) = (vec![], vec![]);
        for (name, values) in &host.gate {
            if gate_tensor_is_f32(form, name) {
                stored_f32.extend(upload_present(device, values)?.map(|b| (*name, b)));
            } else {
                stored.extend(upload_present(device, values)?.map(|b| (*name, b)));
            }
        }
        let bias = upload_present(device, &host.router_bias)?;
        Self::new(config, stored, stored_f32, bias)
    }

    /// A router holding these buffers, taken over without a copy (short names as in
    /// [`DeviceWeights::gate`](super::DeviceWeights::gate); `stored_f32` those the gate keeps in
    /// f32), checked against `config`: every required tensor present, once, with its length, and
    /// nothing else; an error names the tensor (`gate.w`, `gate.selection_bias`, ...).
    pub fn new(
        config: &MoeConfig,
        stored: Vec<(&'static str, DeviceBuffer<T>)>,
        stored_f32: Vec<(&'static str, DeviceBuffer<f32>)>,
        bias: Option<DeviceBuffer<f32>>,
    ) -> Result<Self> {
        let router = Self {
            form: config.gate_form(),
            stored,
            stored_f32,
            bias,
        };
        router.validate(config)?;
        Ok(router)
    }

    /// The checks of [`new`](Self::new), also run before every pass: a tensor handed out
    /// mutably may have been replaced.
    pub(crate) fn validate(&self, config: &MoeConfig) -> Result<()> {
        let expected = gate_tensor_lens(config);
        let names: Vec<&str> = expected.iter().map(|(n, _)| *n).collect();
        let given =
            (self.stored.iter().map(|(n, _)| (*n, false))).chain(self.stored_f32.iter().map(|(n, _)| (*n, true)));
        for (name, in_f32) in given {
            if !names.contains(&name) {
                return Err(unexpected(
                    "gate",
                    format!("a tensor `{name}`"),
                    format!("the {:?} router's tensors {names:?}", config.router),
                ));
            }
            if gate_tensor_is_f32(self.form, name) != in_f32 {
                let (got, want) = if in_f32 { ("f32", T::NAME) } else { (T::NAME, "f32") };
                return Err(unexpected(
                    gate_name(name),
                    format!("stored as {got}"),
                    format!("stored as {want}"),
                ));
            }
        }
        for (name, len) in expected {
            let count = names_given(self, name);
            if count > 1 {
                return Err(unexpected(
                    gate_name(name),
                    format!("given {count} times"),
                    "one tensor",
                ));
            }
            if gate_tensor_is_f32(self.form, name) {
                let tensor = self.stored_f32.iter().find(|(n, _)| *n == name).map(|(_, b)| b);
                if tensor.is_some() || !gate_tensor_is_optional(name) {
                    check_tensor(gate_name(name), tensor, len)?;
                }
            } else {
                let tensor = self.stored.iter().find(|(n, _)| *n == name).map(|(_, b)| b);
                if tensor.is_some() || !gate_tensor_is_optional(name) {
                    check_tensor(gate_name(name), tensor, len)?;
                }
            }
        }
        match (config.has_router_bias(), &self.bias) {
            (true, bias) => check_tensor("gate.selection_bias", bias.as_ref(), config.experts),
            (false, None) => Ok(()),
            (false, Some(_)) => Err(unexpected(
                "gate.selection_bias",
                "a tensor",
                "none: only the sigmoid router keeps a selection bias",
            )),
        }
    }

    /// Whether the gate holds the tensor `name` (short name).
    pub(crate) fn has(&self, name: &str) -> bool {
        names_given(self, name) > 0
    }

    /// The codes of a codebook router (`[E, d]`).
    pub(crate) fn codebook(&self) -> Option<&DeviceBuffer<T>> {
        self.stored.iter().find(|(n, _)| *n == "codes").map(|(_, b)| b)
    }

    /// The gate tensors as `ops::gate` takes them.
    pub(crate) fn weights(&self) -> GateWeights<'_, T> {
        let t = |name: &str| -> Option<&dyn DeviceSlice<T>> {
            self.stored
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| b as &dyn DeviceSlice<T>)
        };
        let f = |name: &str| -> Option<&dyn DeviceSlice<f32>> {
            self.stored_f32
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, b)| b as &dyn DeviceSlice<f32>)
        };
        let needed = "every gate tensor is uploaded at construction";
        match self.form {
            GateForm::Linear => GateWeights::Linear {
                w: t("w").expect(needed),
                b: f("b"),
            },
            GateForm::LowRank => GateWeights::LowRank {
                u: t("u").expect(needed),
                v: t("v").expect(needed),
                b: t("b"),
                c: f("c"),
            },
            GateForm::Symmetric => GateWeights::Symmetric {
                u: t("u").expect(needed),
                b: t("b"),
                c: f("c"),
            },
            GateForm::Attention => GateWeights::Attention {
                wq: t("wq").expect(needed),
                k: t("k").expect(needed),
            },
            GateForm::Full => GateWeights::Full {
                a: t("a").expect(needed),
                b: t("b"),
                c: f("c"),
            },
        }
    }
}

/// How many of the router's tensors are called `name`.
fn names_given<T: FloatElement>(router: &RouterWeights<T>, name: &str) -> usize {
    let stored = router.stored.iter().filter(|(n, _)| *n == name).count();
    stored + router.stored_f32.iter().filter(|(n, _)| *n == name).count()
}

/// Gradients of one router's gate tensors (f32, each shaped like its tensor, named as in
/// [`HostWeights::gate`]). The selection bias has none (math §2).
pub struct RouterGrads {
    form: GateForm,
    tensors: Vec<(&'static str, DeviceBuffer<f32>)>,
}

impl RouterGrads {
    /// Empty in [`Mode::Inference`]; every tensor of `config`'s gate (for a router built from
    /// complete weights, such as [`HostWeights::random`]'s).
    pub(crate) fn alloc(device: &Device, config: &MoeConfig, mode: Mode) -> Result<Self> {
        Self::alloc_where(device, config, mode, |_| true)
    }

    /// [`alloc`](Self::alloc) for the tensors `router` holds (its optional ones may be absent).
    pub(crate) fn alloc_for<T: FloatElement>(
        device: &Device,
        config: &MoeConfig,
        router: &RouterWeights<T>,
        mode: Mode,
    ) -> Result<Self> {
        Self::alloc_where(device, config, mode, |name| router.has(name))
    }

    fn alloc_where(device: &Device, config: &MoeConfig, mode: Mode, present: impl Fn(&str) -> bool) -> Result<Self> {
        // A codebook router has no gradient (its codes pick experts discretely, with weight 1).
        let tensors = gate_tensor_lens(config)
            .into_iter()
            .filter(|(name, _)| config.router != RouterKind::Codebook && mode == Mode::Training && present(name))
            .map(|(name, len)| Ok((name, device.alloc_zeros(len)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            form: config.gate_form(),
            tensors,
        })
    }

    /// Every gradient, by tensor name (none for a codebook router).
    pub fn tensors(&self) -> &[(&'static str, DeviceBuffer<f32>)] {
        &self.tensors
    }

    pub(crate) fn as_gate_grads(&mut self) -> GateGrads<'_> {
        let mut by_name: Vec<(&'static str, Option<&mut dyn DeviceSliceMut<f32>>)> = self
            .tensors
            .iter_mut()
            .map(|(n, b)| (*n, Some(b as &mut dyn DeviceSliceMut<f32>)))
            .collect();
        let mut take = |name: &str| by_name.iter_mut().find(|(n, _)| *n == name).and_then(|(_, b)| b.take());
        let needed = "every gate gradient is allocated at construction";
        match self.form {
            GateForm::Linear => GateGrads::Linear {
                w: take("w").expect(needed),
                b: take("b"),
            },
            GateForm::LowRank => GateGrads::LowRank {
                u: take("u").expect(needed),
                v: take("v").expect(needed),
                b: take("b"),
                c: take("c"),
            },
            GateForm::Symmetric => GateGrads::Symmetric {
                u: take("u").expect(needed),
                b: take("b"),
                c: take("c"),
            },
            GateForm::Attention => GateGrads::Attention {
                wq: take("wq").expect(needed),
                k: take("k").expect(needed),
            },
            GateForm::Full => GateGrads::Full {
                a: take("a").expect(needed),
                b: take("b"),
                c: take("c"),
            },
        }
    }
}

/// The routed experts (`W1 [E, 2h, d]`, `W2 [E, d, h]`) and the shared FFN (`[1, 2nh, d]`,
/// `[1, d, nh]`).
pub(crate) struct Experts<T: FloatElement> {
    pub(super) w1: DeviceBuffer<T>,
    pub(super) w2: DeviceBuffer<T>,
    pub(super) shared: Option<(DeviceBuffer<T>, DeviceBuffer<T>)>,
}

impl<T: FloatElement> Experts<T> {
    pub(crate) fn upload(device: &Device, config: &MoeConfig, host: &HostWeights) -> Result<Self> {
        let upload = |values: &[f32]| upload_present::<T>(device, values);
        let (w1, w2) = (upload(&host.w1)?, upload(&host.w2)?);
        let shared = (upload(&host.shared_w1)?, upload(&host.shared_w2)?);
        let missing = |name| Error::Shape {
            argument: name,
            expected: "a tensor".into(),
            got: "no tensor".into(),
        };
        let experts = Self {
            w1: w1.ok_or_else(|| missing("experts.w1"))?,
            w2: w2.ok_or_else(|| missing("experts.w2"))?,
            shared: match shared {
                (None, None) => None,
                (w1, w2) => Some((
                    w1.ok_or_else(|| missing("shared.w1"))?,
                    w2.ok_or_else(|| missing("shared.w2"))?,
                )),
            },
        };
        experts.validate(config)?;
        Ok(experts)
    }

    /// Each tensor's length for `config`, by name (`experts.w1`, ..., `shared.w2`); the shared
    /// FFN present exactly when the config has shared experts.
    pub(crate) fn validate(&self, config: &MoeConfig) -> Result<()> {
        let (e, d, h, hs) = (config.experts, config.dim, config.hidden, config.shared_hidden());
        check_tensor("experts.w1", Some(&self.w1), e * 2 * h * d)?;
        check_tensor("experts.w2", Some(&self.w2), e * d * h)?;
        match (&self.shared, hs > 0) {
            (Some((w1, w2)), true) => {
                check_tensor("shared.w1", Some(w1), 2 * hs * d)?;
                check_tensor("shared.w2", Some(w2), d * hs)
            }
            (None, true) => check_tensor::<T>("shared.w1", None, 2 * hs * d),
            (None, false) => Ok(()),
            (Some(_), false) => Err(unexpected(
                "shared.w1",
                "a tensor",
                "none: the config has no shared experts",
            )),
        }
    }
}

/// Expert weight gradients, f32: `w1 [E, 2h, d]`, `w2 [E, d, h]`, and the shared FFN's
/// (`None` without shared experts).
///
/// **Only the experts that got rows are written.** A backward computes and writes the routed
/// gradient of an expert only if some token of the pass reached it (and, under an expert mask,
/// only if the mask selects it): at decode a handful of experts get rows, and writing the other
/// experts' zeros would cost more than the whole pass. [`written`](Self::written) says on the
/// device which experts hold this pass's gradient; the others hold whatever they held (zeros
/// before the first backward). Call [`zero_unwritten`](Self::zero_unwritten) for the dense
/// gradient, or read `written` in the optimizer. The shared experts' gradients are always
/// written whole.
pub struct ExpertGrads {
    pub w1: DeviceBuffer<f32>,
    pub w2: DeviceBuffer<f32>,
    pub shared_w1: Option<DeviceBuffer<f32>>,
    pub shared_w2: Option<DeviceBuffer<f32>>,
    /// `[E]` u32: nonzero where w1 and w2 hold the last backward's gradient.
    pub(crate) written: DeviceBuffer<u32>,
}

impl ExpertGrads {
    /// Empty buffers in [`Mode::Inference`].
    pub(crate) fn alloc(device: &Device, config: &MoeConfig, mode: Mode) -> Result<Self> {
        let (e, d, h, hs) = (config.experts, config.dim, config.hidden, config.shared_hidden());
        let training = mode == Mode::Training;
        let routed = |len: usize| device.alloc_zeros(if training { len } else { 0 });
        let shared = |len: usize| -> Result<Option<DeviceBuffer<f32>>> {
            if hs > 0 && training {
                device.alloc_zeros(len).map(Some)
            } else {
                Ok(None)
            }
        };
        Ok(Self {
            w1: routed(e * 2 * h * d)?,
            w2: routed(e * d * h)?,
            shared_w1: shared(2 * hs * d)?,
            shared_w2: shared(d * hs)?,
            written: device.alloc_zeros(if training { e } else { 0 })?,
        })
    }

    /// `[E]` u32, on the device: nonzero exactly where `w1[e]` and `w2[e]` hold the last
    /// backward's gradient (the expert got rows, and the mask, if any, selects it).
    pub fn written(&self) -> &DeviceBuffer<u32> {
        &self.written
    }

    /// Zeroes `w1[e]` and `w2[e]` of every expert the last backward did not write, making them
    /// the dense gradient (an unwritten expert's gradient is zero, or frozen under a mask: use
    /// it only without one, or when frozen experts may read as zero). Two launches, no host sync.
    pub fn zero_unwritten(&mut self, device: &Device) -> Result<()> {
        gemm::zero_unwritten(device, &self.written, &mut self.w1)?;
        gemm::zero_unwritten(device, &self.written, &mut self.w2)
    }
}
