//! The parameters of a routed pass: a router's gate tensors ([`Router`]) and their gradients
//! ([`RouterGrads`]), the experts ([`Experts`]) and theirs ([`ExpertGrads`]), uploaded once from
//! [`HostWeights`].
use super::weights::{HostWeights, gate_tensor_is_f32, gate_tensor_lens};
use super::{Mode, MoeConfig, RouterKind};
use crate::ops::gate::{GateForm, GateGrads, GateWeights};
use crate::ops::{FloatElement, gemm};
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// A host tensor as a `T` device buffer (one upload).
fn upload_as<T: FloatElement>(device: &Device, values: &[f32]) -> Result<DeviceBuffer<T>> {
    device.upload(&values.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>())
}

fn check_host(argument: &'static str, values: &[f32], expected: usize) -> Result<()> {
    if values.len() == expected {
        return Ok(());
    }
    Err(Error::Shape {
        argument,
        expected: format!("{expected} elements"),
        got: format!("{} elements", values.len()),
    })
}

/// One router: its gate tensors (`ops::gate` layouts, f32 where the gate keeps f32) and the
/// optional selection bias.
pub(crate) struct Router<T: FloatElement> {
    form: GateForm,
    stored: Vec<(&'static str, DeviceBuffer<T>)>,
    stored_f32: Vec<(&'static str, DeviceBuffer<f32>)>,
    pub(crate) bias: Option<DeviceBuffer<f32>>,
}

impl<T: FloatElement> Router<T> {
    pub(crate) fn upload(device: &Device, config: &MoeConfig, host: &HostWeights) -> Result<Self> {
        let form = config.gate_form();
        let (mut stored, mut stored_f32) = (vec![], vec![]);
        for (name, len) in gate_tensor_lens(config) {
            let values = host.gate_tensor(name);
            check_host("weights.gate", values, len)?;
            if gate_tensor_is_f32(form, name) {
                stored_f32.push((name, device.upload(values)?));
            } else {
                stored.push((name, upload_as::<T>(device, values)?));
            }
        }
        let bias = if config.has_router_bias() {
            check_host("weights.router_bias", &host.router_bias, config.experts)?;
            Some(device.upload(&host.router_bias)?)
        } else {
            None
        };
        Ok(Self {
            form,
            stored,
            stored_f32,
            bias,
        })
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

/// Gradients of one router's gate tensors (f32, each shaped like its tensor, named as in
/// [`HostWeights::gate`]). The selection bias has none (math §2).
pub struct RouterGrads {
    form: GateForm,
    tensors: Vec<(&'static str, DeviceBuffer<f32>)>,
}

impl RouterGrads {
    /// Empty in [`Mode::Inference`].
    pub(crate) fn alloc(device: &Device, config: &MoeConfig, mode: Mode) -> Result<Self> {
        // A codebook router has no gradient (its codes pick experts discretely, with weight 1).
        let tensors = gate_tensor_lens(config)
            .into_iter()
            .filter(|_| config.router != RouterKind::Codebook && mode == Mode::Training)
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
        let (e, d, h, hs) = (config.experts, config.dim, config.hidden, config.shared_hidden());
        check_host("weights.w1", &host.w1, e * 2 * h * d)?;
        check_host("weights.w2", &host.w2, e * d * h)?;
        check_host("weights.shared_w1", &host.shared_w1, 2 * hs * d)?;
        check_host("weights.shared_w2", &host.shared_w2, d * hs)?;
        let shared = if hs > 0 {
            Some((upload_as(device, &host.shared_w1)?, upload_as(device, &host.shared_w2)?))
        } else {
            None
        };
        Ok(Self {
            w1: upload_as(device, &host.w1)?,
            w2: upload_as(device, &host.w2)?,
            shared,
        })
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
