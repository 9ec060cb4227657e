//! A routed layer's weights on the device: [`LayerWeights`], built from buffers the caller
//! already holds ([`DeviceWeights`], taken over without a copy) or uploaded from
//! [`HostWeights`], and read or stepped in place by name.
use super::MoeConfig;
use super::params::{Experts, RouterWeights};
use super::weights::{HostWeights, gate_name};
use crate::ops::FloatElement;
use crate::{Device, DeviceBuffer, Element, Error, Result};

/// Every tensor of a routed layer as device buffers, the fields of [`HostWeights`] on the device
/// (shapes in [`MoeConfig::weight_shapes`]). A cudarc `CudaSlice` becomes a [`DeviceBuffer`]
/// with `DeviceBuffer::from`, which moves it: no copy.
pub struct DeviceWeights<T: Element> {
    /// Gate tensors stored as `T`, by short name (`w`; `u`, `v`, `b`, `wq`, `k`, `a` of the
    /// quadratic forms; `codes`).
    pub gate: Vec<(&'static str, DeviceBuffer<T>)>,
    /// Gate tensors the gate keeps in f32 whatever `T`: the linear gate's `b`, the quadratic
    /// forms' `c`. Optional: Mixtral's router has no `b`.
    pub gate_f32: Vec<(&'static str, DeviceBuffer<f32>)>,
    /// The sigmoid router's selection bias (`[E]`, f32); `None` for the other routers.
    pub selection_bias: Option<DeviceBuffer<f32>>,
    /// `[E, 2h, d]`: each expert's gate rows, then its up rows.
    pub w1: DeviceBuffer<T>,
    /// `[E, d, h]`.
    pub w2: DeviceBuffer<T>,
    /// The shared FFN's `w1 [2nh, d]` and `w2 [d, nh]`, with shared experts.
    pub shared: Option<(DeviceBuffer<T>, DeviceBuffer<T>)>,
}

/// A routed layer's weights on one device, checked against its [`MoeConfig`]: what a
/// [`MoeLayer`](super::MoeLayer) owns, reads by name and gives back.
///
/// Names and shapes are those of [`MoeConfig::weight_shapes`]: `gate.w`, `gate.b`, ...,
/// `gate.selection_bias`, `experts.w1`, `experts.w2`, `shared.w1`, `shared.w2`. Tensors are
/// stored as `T` except the f32 ones ([`tensor_f32`](Self::tensor_f32): the linear gate's `b`,
/// the quadratic forms' `c`, the selection bias).
pub struct LayerWeights<T: FloatElement> {
    pub(crate) router: RouterWeights<T>,
    pub(crate) experts: Experts<T>,
}

fn unknown(name: &str, names: Vec<&'static str>, dtype: &str) -> Error {
    Error::InvalidArgument {
        argument: "name",
        value: name.into(),
        expected: format!("a tensor this layer stores as {dtype}: one of {names:?}"),
    }
}

impl<T: FloatElement> LayerWeights<T> {
    /// Takes over `weights` (no copy), checked against `config`: every tensor the config needs
    /// present with its length, nothing it does not; an error names the tensor (`gate.w`,
    /// `experts.w1`, ...).
    pub fn new(config: &MoeConfig, weights: DeviceWeights<T>) -> Result<Self> {
        let experts = Experts {
            w1: weights.w1,
            w2: weights.w2,
            shared: weights.shared,
        };
        experts.validate(config)?;
        Ok(Self {
            router: RouterWeights::new(config, weights.gate, weights.gate_f32, weights.selection_bias)?,
            experts,
        })
    }

    /// `host` uploaded to `device` and rounded to `T` (f32 tensors kept f32).
    pub fn upload(device: &Device, config: &MoeConfig, host: &HostWeights) -> Result<Self> {
        Ok(Self {
            router: RouterWeights::upload(device, config, host)?,
            experts: super::params::Experts::upload(device, config, host)?,
        })
    }

    /// The buffers back, as they are now (after any in-place step).
    pub fn into_device(self) -> DeviceWeights<T> {
        DeviceWeights {
            gate: self.router.stored,
            gate_f32: self.router.stored_f32,
            selection_bias: self.router.bias,
            w1: self.experts.w1,
            w2: self.experts.w2,
            shared: self.experts.shared,
        }
    }

    /// The checks of [`new`](Self::new) (run again before every pass: a buffer handed out by
    /// [`tensor_mut`](Self::tensor_mut) may have been replaced).
    pub(crate) fn validate(&self, config: &MoeConfig) -> Result<()> {
        self.experts.validate(config)?;
        self.router.validate(config)
    }

    /// `Err` naming the first tensor that does not live on `device`'s kind.
    pub(crate) fn check_device(&self, device: &Device) -> Result<()> {
        check_kinds(self.stored(), self.stored_f32(), device)
    }

    fn stored(&self) -> Vec<(&'static str, &DeviceBuffer<T>)> {
        let mut all = self.router.stored_named();
        all.push(("experts.w1", &self.experts.w1));
        all.push(("experts.w2", &self.experts.w2));
        if let Some((w1, w2)) = &self.experts.shared {
            all.push(("shared.w1", w1));
            all.push(("shared.w2", w2));
        }
        all
    }

    fn stored_f32(&self) -> Vec<(&'static str, &DeviceBuffer<f32>)> {
        self.router.stored_f32_named()
    }

    /// Every tensor held, by full name, in [`MoeConfig::weight_shapes`] order of kind: those
    /// stored as `T`, then the f32 ones.
    pub fn names(&self) -> Vec<&'static str> {
        let t = self.stored().into_iter().map(|(n, _)| n);
        t.chain(self.stored_f32().into_iter().map(|(n, _)| n)).collect()
    }

    /// The tensor `name` stored as `T` (`experts.w1`, `gate.w`, ...).
    pub fn tensor(&self, name: &str) -> Result<&DeviceBuffer<T>> {
        find(self.stored(), name, T::NAME)
    }

    /// The tensor `name` stored as `T`, to update in place (an optimizer step). Keep its
    /// length: the next pass checks it and refuses a buffer of another length.
    pub fn tensor_mut(&mut self, name: &str) -> Result<&mut DeviceBuffer<T>> {
        let names: Vec<&'static str> = self.stored().into_iter().map(|(n, _)| n).collect();
        let found = match name {
            "experts.w1" => Some(&mut self.experts.w1),
            "experts.w2" => Some(&mut self.experts.w2),
            "shared.w1" => self.experts.shared.as_mut().map(|(w1, _)| w1),
            "shared.w2" => self.experts.shared.as_mut().map(|(_, w2)| w2),
            _ => self.router.tensor_mut(name).ok(),
        };
        found.ok_or_else(|| unknown(name, names, T::NAME))
    }

    /// The f32 tensor `name` (`gate.b` of the linear gate, `gate.c`, `gate.selection_bias`).
    pub fn tensor_f32(&self, name: &str) -> Result<&DeviceBuffer<f32>> {
        self.router.tensor_f32(name)
    }

    /// The f32 tensor `name`, to update in place (same length).
    pub fn tensor_f32_mut(&mut self, name: &str) -> Result<&mut DeviceBuffer<f32>> {
        self.router.tensor_f32_mut(name)
    }

    /// The router's tensors (`gate.*`).
    pub fn router(&self) -> &RouterWeights<T> {
        &self.router
    }

    /// The router's tensors, to update in place.
    pub fn router_mut(&mut self) -> &mut RouterWeights<T> {
        &mut self.router
    }
}

/// The buffer named `name` among `all`, or an error listing the names.
fn find<'a, B>(all: Vec<(&'static str, &'a B)>, name: &str, dtype: &str) -> Result<&'a B> {
    match all.iter().position(|(n, _)| *n == name) {
        Some(i) => Ok(all[i].1),
        None => Err(unknown(name, all.iter().map(|(n, _)| *n).collect(), dtype)),
    }
}

impl<T: FloatElement> RouterWeights<T> {
    fn stored_named(&self) -> Vec<(&'static str, &DeviceBuffer<T>)> {
        self.stored.iter().map(|(n, b)| (gate_name(n), b)).collect()
    }

    fn stored_f32_named(&self) -> Vec<(&'static str, &DeviceBuffer<f32>)> {
        let gate = self.stored_f32.iter().map(|(n, b)| (gate_name(n), b));
        gate.chain(self.bias.iter().map(|b| ("gate.selection_bias", b)))
            .collect()
    }

    /// Every tensor held, by full name (`gate.w`, ...): those stored as `T`, then the f32 ones.
    pub fn names(&self) -> Vec<&'static str> {
        let t = self.stored_named().into_iter().map(|(n, _)| n);
        t.chain(self.stored_f32_named().into_iter().map(|(n, _)| n)).collect()
    }

    /// The gate tensor `name` stored as `T` (`gate.w`, `gate.u`, ...).
    pub fn tensor(&self, name: &str) -> Result<&DeviceBuffer<T>> {
        find(self.stored_named(), name, T::NAME)
    }

    /// The gate tensor `name` stored as `T`, to update in place (same length).
    pub fn tensor_mut(&mut self, name: &str) -> Result<&mut DeviceBuffer<T>> {
        let names: Vec<&'static str> = self.stored_named().into_iter().map(|(n, _)| n).collect();
        let found = (self.stored.iter_mut())
            .find(|(n, _)| gate_name(n) == name)
            .map(|(_, b)| b);
        found.ok_or_else(|| unknown(name, names, T::NAME))
    }

    /// The f32 tensor `name` (`gate.b` of the linear gate, `gate.c`, `gate.selection_bias`).
    pub fn tensor_f32(&self, name: &str) -> Result<&DeviceBuffer<f32>> {
        find(self.stored_f32_named(), name, "f32")
    }

    /// The f32 tensor `name`, to update in place (same length).
    pub fn tensor_f32_mut(&mut self, name: &str) -> Result<&mut DeviceBuffer<f32>> {
        let names: Vec<&'static str> = self.stored_f32_named().into_iter().map(|(n, _)| n).collect();
        let found = match name {
            "gate.selection_bias" => self.bias.as_mut(),
            _ => (self.stored_f32.iter_mut())
                .find(|(n, _)| gate_name(n) == name)
                .map(|(_, b)| b),
        };
        found.ok_or_else(|| unknown(name, names, "f32"))
    }

    /// `Err` naming the first tensor that does not live on `device`'s kind.
    pub(crate) fn check_device(&self, device: &Device) -> Result<()> {
        check_kinds(self.stored_named(), self.stored_f32_named(), device)
    }
}

fn check_kinds<T: Element>(
    stored: Vec<(&'static str, &DeviceBuffer<T>)>,
    stored_f32: Vec<(&'static str, &DeviceBuffer<f32>)>,
    device: &Device,
) -> Result<()> {
    let kinds = stored.into_iter().map(|(n, b)| (n, b.kind()));
    for (name, kind) in kinds.chain(stored_f32.into_iter().map(|(n, b)| (n, b.kind()))) {
        if kind != device.kind() {
            return Err(Error::WrongDevice {
                argument: name,
                expected: device.kind().name(),
                found: kind.name(),
            });
        }
    }
    Ok(())
}
