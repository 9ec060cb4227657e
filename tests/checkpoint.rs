//! Hugging Face checkpoints (issue 20): tiny checkpoints written in each naming scheme load into
//! layers that match the reference and, bitwise, the layer built from the same host weights;
//! config.json maps onto MoeConfig; wrong or missing tensors and fields are errors naming them.
#![cfg(feature = "checkpoint")]
mod common;
#[path = "layers/support.rs"]
mod support;

use common::devices;
use half::bf16;
use moe_kernels::checkpoint::tiny::{self, Scheme};
use moe_kernels::checkpoint::{Checkpoint, moe_config};
use moe_kernels::layers::{HostWeights, Mode, MoeConfig, MoeLayer, RouterKind};
use moe_kernels::ops::FloatElement;
use moe_kernels::{Device, Error};
use safetensors::Dtype;
use std::path::PathBuf;
use support::{Case, check_against_reference, run};

/// A fresh directory for one test's checkpoint.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("moe-kernels-checkpoint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `scheme`'s config and `blocks` cases rounded to `T`, written as `dtype`; the gate bias only
/// where the scheme stores one.
fn write_case<T: FloatElement>(scheme: Scheme, dtype: Dtype, blocks: usize, tokens: usize) -> (PathBuf, Vec<Case>) {
    let json = scheme.config_json();
    let config = moe_config(&json, 12).unwrap();
    let cases: Vec<Case> = (0..blocks)
        .map(|b| {
            let mut case = Case::new::<T>(config, tokens, 70 + b as u64);
            if scheme != Scheme::Fused {
                case.weights.gate.retain(|(n, _)| *n != "b");
            }
            // What the file holds (the f32 biases stay f32).
            if dtype == Dtype::BF16 {
                case.weights = case.weights.rounded::<bf16>(&config);
            }
            case
        })
        .collect();
    let dir = scratch_dir(&format!("{scheme:?}-{dtype:?}-{}", T::NAME));
    let weights: Vec<HostWeights> = cases.iter().map(|c| c.weights.clone()).collect();
    tiny::write(&dir, scheme, &json, &config, &weights, dtype).unwrap();
    (dir, cases)
}

fn load_and_check<T: FloatElement>(device: &Device, scheme: Scheme, dtype: Dtype) {
    let (dir, cases) = write_case::<T>(scheme, dtype, 2, 9);
    let checkpoint = Checkpoint::open(&dir).unwrap();
    assert_eq!(checkpoint.moe_layers(), scheme.moe_layers(2), "{scheme:?}: MoE layers");
    for (layer, case) in checkpoint.moe_layers().into_iter().zip(&cases) {
        let what = format!("{scheme:?} layer {layer} from {dtype:?} into {}", T::NAME);
        let mut loaded = checkpoint.layer::<T>(device, layer, 12, Mode::Training).unwrap();
        assert_eq!(*loaded.config(), case.config, "{what}: config");
        let got = run(device, &mut loaded, case);
        check_against_reference::<T>(&what, case, &got, None);
        // Bitwise the layer built from the host weights.
        let mut from_host = MoeLayer::<T>::new(device, case.config, &case.weights).unwrap();
        let want = run(device, &mut from_host, case);
        let as_bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(as_bits(&got.y), as_bits(&want.y), "{what}: y bitwise");
        assert_eq!(as_bits(&got.dx), as_bits(&want.dx), "{what}: dx bitwise");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_scheme_loads_a_layer_that_matches_the_reference() {
    for device in devices() {
        for scheme in Scheme::ALL {
            load_and_check::<bf16>(&device, scheme, Dtype::BF16);
        }
        // Converted on load: an f32 file into bf16, a bf16 file into f32.
        load_and_check::<bf16>(&device, Scheme::Mixtral, Dtype::F32);
        load_and_check::<f32>(&device, Scheme::DeepseekV3, Dtype::BF16);
    }
}

#[test]
fn config_json_maps_onto_moe_config() {
    let mixtral = moe_config(&Scheme::Mixtral.config_json(), 8).unwrap();
    assert_eq!(
        (mixtral.router, mixtral.experts, mixtral.k, mixtral.dim, mixtral.hidden),
        (RouterKind::Linear, 4, 2, 16, 16)
    );
    assert!(mixtral.normalize_topk, "Mixtral renormalizes its top-k");
    let qwen = moe_config(&Scheme::Qwen3Moe.config_json(), 8).unwrap();
    assert_eq!((qwen.experts, qwen.hidden, qwen.normalize_topk), (6, 8, true));
    let fused = moe_config(&Scheme::Fused.config_json(), 8).unwrap();
    assert!(!fused.normalize_topk);
    let deepseek = moe_config(&Scheme::DeepseekV3.config_json(), 8).unwrap();
    assert_eq!(
        deepseek,
        MoeConfig {
            router: RouterKind::Sigmoid {
                groups: 4,
                topk_groups: 2
            },
            experts: 8,
            k: 3,
            normalize_topk: false,
            route_scale: 2.5,
            dim: 16,
            hidden: 8,
            shared_experts: 2,
            max_tokens: 8,
            ..MoeConfig::default()
        }
    );
    // DeepSeek-V3's defaults when the fields are left out.
    let mut json = Scheme::DeepseekV3.config_json();
    for field in [
        "norm_topk_prob",
        "routed_scaling_factor",
        "n_shared_experts",
        "scoring_func",
    ] {
        json.as_object_mut().unwrap().remove(field);
    }
    let defaults = moe_config(&json, 8).unwrap();
    assert_eq!(
        (defaults.normalize_topk, defaults.route_scale, defaults.shared_experts),
        (true, 2.5, 1)
    );
    assert!(matches!(defaults.router, RouterKind::Sigmoid { .. }));
}

fn checkpoint_name<T>(result: moe_kernels::Result<T>) -> String {
    match result {
        Err(Error::Checkpoint { name, .. }) => name,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("accepted a bad checkpoint"),
    }
}

#[test]
fn bad_config_fields_are_named() {
    let mut json = Scheme::Qwen3Moe.config_json();
    json.as_object_mut().unwrap().remove("num_experts_per_tok");
    assert_eq!(
        checkpoint_name(moe_config(&json, 8)),
        "config.json: num_experts_per_tok"
    );
    let mut json = Scheme::Mixtral.config_json();
    json["hidden_size"] = "sixteen".into();
    assert_eq!(checkpoint_name(moe_config(&json, 8)), "config.json: hidden_size");
    let mut json = Scheme::DeepseekV3.config_json();
    json["scoring_func"] = "softplus".into();
    assert_eq!(checkpoint_name(moe_config(&json, 8)), "config.json: scoring_func");
    // A value the layer refuses names the MoeConfig field.
    let mut json = Scheme::Mixtral.config_json();
    json["num_experts_per_tok"] = 9.into();
    assert!(matches!(
        moe_config(&json, 8),
        Err(Error::InvalidArgument { argument: "k", .. })
    ));
}

/// Rewrites the checkpoint of `scheme` with `edit` applied to its tensors, and returns the
/// error loading its first MoE layer gives.
fn load_edited(device: &Device, scheme: Scheme, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<f32>)>)) -> String {
    let json = scheme.config_json();
    let config = moe_config(&json, 4).unwrap();
    let mut weights = HostWeights::random(&config, 3);
    weights.gate.retain(|(n, _)| *n != "b");
    let mut tensors = scheme.tensors(&config, &weights, 0);
    edit(&mut tensors);
    let dir = scratch_dir(&format!("edited-{scheme:?}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = (tensors.into_iter())
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes.iter().map(|(n, s, b)| {
        (
            n.as_str(),
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let name = checkpoint_name(checkpoint.layer::<f32>(device, 0, 4, Mode::Inference));
    let _ = std::fs::remove_dir_all(&dir);
    name
}

#[test]
fn wrong_or_missing_tensors_are_named() {
    for device in devices() {
        let expert = "model.layers.0.block_sparse_moe.experts.1.w3.weight";
        let without =
            |name: &'static str| move |t: &mut Vec<(String, Vec<usize>, Vec<f32>)>| t.retain(|(n, _, _)| n != name);
        assert_eq!(load_edited(&device, Scheme::Mixtral, without(expert)), expert);
        let reshape = |t: &mut Vec<(String, Vec<usize>, Vec<f32>)>| {
            let tensor = t.iter_mut().find(|(n, _, _)| n == expert).unwrap();
            tensor.1 = vec![tensor.1[0] * tensor.1[1]];
        };
        assert_eq!(load_edited(&device, Scheme::Mixtral, reshape), expert);
        let correction = "model.layers.0.mlp.gate.e_score_correction_bias";
        assert_eq!(
            load_edited(&device, Scheme::DeepseekV3, without(correction)),
            correction
        );
        let shared = "model.layers.0.mlp.shared_experts.down_proj.weight";
        assert_eq!(load_edited(&device, Scheme::DeepseekV3, without(shared)), shared);
        let down = "model.layers.0.mlp.experts.down_proj";
        assert_eq!(load_edited(&device, Scheme::Fused, without(down)), down);
        let gate = "model.layers.0.mlp.gate.weight";
        assert_eq!(load_edited(&device, Scheme::Qwen3Moe, without(gate)), gate);

        // A dense layer, an integer tensor, a missing directory.
        let (dir, _) = write_case::<f32>(Scheme::DeepseekV3, Dtype::F32, 1, 4);
        let checkpoint = Checkpoint::open(&dir).unwrap();
        let dense = checkpoint.layer::<f32>(&device, 0, 4, Mode::Inference);
        assert_eq!(checkpoint_name(dense), "model.layers.0.mlp.gate.weight");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(checkpoint_name(Checkpoint::open(scratch_dir("missing"))).contains("missing"));
    }
}

#[test]
fn integer_tensors_are_refused_by_name() {
    let json = Scheme::Fused.config_json();
    let config = moe_config(&json, 4).unwrap();
    let dir = scratch_dir("integer");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let weights = HostWeights::random(&config, 9);
    let tensors = Scheme::Fused.tensors(&config, &weights, 0);
    let bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = (tensors.into_iter())
        .map(|(n, s, v)| {
            let dtype = if n.ends_with("gate.weight") {
                Dtype::I32
            } else {
                Dtype::F32
            };
            (n, s, dtype, v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
        .collect();
    let views = bytes.iter().map(|(n, s, d, b)| {
        (
            n.as_str(),
            safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let device = Device::emulator().unwrap();
    let got = checkpoint.layer::<f32>(&device, 0, 4, Mode::Inference);
    assert_eq!(checkpoint_name(got), "model.layers.0.mlp.gate.weight");
    let _ = std::fs::remove_dir_all(&dir);
}

/// ESFT deltas: the tuned experts (and gate) of one layer, exported and applied onto the base.
mod esft_delta {
    use super::{checkpoint_name, devices, scratch_dir};
    use half::bf16;
    use moe_kernels::checkpoint::esft::{apply_tuned, export_tuned};
    use moe_kernels::layers::{HostWeights, LayerWeights, MoeConfig, MoeLayer};
    use moe_kernels::{Device, DeviceBuffer};
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    use std::collections::HashMap;
    use std::path::Path;

    const PREFIX: &str = "model.layers.3.mlp.";

    fn config() -> MoeConfig {
        MoeConfig {
            experts: 6,
            k: 2,
            dim: 16,
            hidden: 24,
            max_tokens: 8,
            ..MoeConfig::default()
        }
    }

    fn bits(device: &Device, buffer: &DeviceBuffer<bf16>) -> Vec<u16> {
        device.download(buffer).unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// Every tensor of `weights`, as bits.
    fn all_bits(device: &Device, weights: &LayerWeights<bf16>) -> Vec<(&'static str, Vec<u32>)> {
        (weights.names().into_iter())
            .map(|name| match weights.tensor(name) {
                Ok(t) => (name, bits(device, t).into_iter().map(u32::from).collect()),
                Err(_) => (
                    name,
                    device
                        .download(weights.tensor_f32(name).unwrap())
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect(),
                ),
            })
            .collect()
    }

    type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;
    /// An edit of a file's tensors and metadata.
    type Edit = Box<dyn FnOnce(&mut Tensors, &mut HashMap<String, String>)>;

    /// `source` rewritten into `target` after `edit` of its tensors and metadata.
    fn rewrite(source: &Path, target: &Path, edit: impl FnOnce(&mut Tensors, &mut HashMap<String, String>)) {
        let bytes = std::fs::read(source).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut metadata = header.metadata().clone().unwrap();
        let mut tensors: Tensors = (file.tensors().into_iter())
            .map(|(name, view)| (name, view.dtype(), view.shape().to_vec(), view.data().to_vec()))
            .collect();
        edit(&mut tensors, &mut metadata);
        let views: Vec<(String, TensorView<'_>)> = (tensors.iter())
            .map(|(n, dtype, shape, data)| (n.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, Some(metadata), target).unwrap();
    }

    #[test]
    fn export_then_apply_gives_back_the_tuned_weights_bitwise() {
        let config = config();
        let (e, d, h) = (config.experts, config.dim, config.hidden);
        let dir = scratch_dir("esft-roundtrip");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tuned.safetensors");
        let (base, tuned) = (HostWeights::random(&config, 1), HostWeights::random(&config, 2));
        for device in devices() {
            let tuned_layer = MoeLayer::<bf16>::new(&device, config, &tuned).unwrap();
            let weights = tuned_layer.weights();
            let exported = export_tuned(&device, &config, weights, PREFIX, &[1, 4], true, &path).unwrap();
            let mut layer = MoeLayer::<bf16>::new(&device, config, &base).unwrap();
            let base_bits = all_bits(&device, layer.weights());
            let applied = apply_tuned(&device, &config, layer.weights_mut().unwrap(), &path).unwrap();
            assert_eq!(applied, exported);
            assert!(applied.tensors.contains(&format!("{PREFIX}experts.4.down_proj.weight")));

            let tuned_bits = all_bits(&device, weights);
            let got = all_bits(&device, layer.weights());
            for (((name, got), (_, tuned)), (_, base)) in got.iter().zip(&tuned_bits).zip(&base_bits) {
                let per_expert = match *name {
                    "experts.w1" => 2 * h * d,
                    "experts.w2" => d * h,
                    _ => 0,
                };
                for (i, value) in got.iter().enumerate() {
                    let tuned_here = per_expert == 0 || [1, 4].contains(&(i / per_expert));
                    let want = if tuned_here { tuned[i] } else { base[i] };
                    assert_eq!(*value, want, "{name}[{i}]");
                }
            }
            // 2 experts' three projections and the gate (bf16) with its f32 bias, of the whole layer.
            let tuned_bytes = 2 * 3 * h * d * 2 + e * d * 2 + e * 4;
            assert_eq!(applied.tuned_bytes, tuned_bytes as u64);
            let full = (e * 2 * h * d + e * d * h + e * d) * 2 + e * 4;
            assert!((applied.storage_ratio(layer.weights()) - tuned_bytes as f64 / full as f64).abs() < 1e-12);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_files_are_errors_naming_the_tensor() {
        let config = config();
        let dir = scratch_dir("esft-wrong");
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.safetensors");
        let bad = dir.join("bad.safetensors");
        let base = HostWeights::random(&config, 1);
        let down = format!("{PREFIX}experts.2.down_proj.weight");
        for device in devices() {
            let tuned = MoeLayer::<bf16>::random(&device, config, 2).unwrap();
            export_tuned(&device, &config, tuned.weights(), PREFIX, &[0, 2], false, &good).unwrap();
            let mut layer = MoeLayer::<bf16>::new(&device, config, &base).unwrap();
            let before = all_bits(&device, layer.weights());
            let cases: Vec<(String, Edit)> = vec![
                (
                    down.clone(),
                    Box::new(|t: &mut Tensors, _: &mut _| t.retain(|x| !x.0.ends_with("2.down_proj.weight"))),
                ),
                (
                    down.clone(),
                    Box::new(|t: &mut Tensors, _: &mut _| {
                        let x = t.iter_mut().find(|x| x.0.ends_with("2.down_proj.weight")).unwrap();
                        x.2 = vec![x.2[1], x.2[0]];
                    }),
                ),
                (
                    down.clone(),
                    Box::new(|t: &mut Tensors, _: &mut _| {
                        let x = t.iter_mut().find(|x| x.0.ends_with("2.down_proj.weight")).unwrap();
                        x.1 = Dtype::F16;
                    }),
                ),
                (
                    format!("{PREFIX}experts.3.up_proj.weight"),
                    Box::new(|t: &mut Tensors, _: &mut _| {
                        let stray = t[0].clone();
                        t.push((format!("{PREFIX}experts.3.up_proj.weight"), stray.1, stray.2, stray.3));
                    }),
                ),
                (
                    "metadata `format`".into(),
                    Box::new(|_: &mut Tensors, m: &mut HashMap<String, String>| {
                        m.remove("format");
                    }),
                ),
                (
                    "metadata `experts`".into(),
                    Box::new(|_: &mut Tensors, m: &mut HashMap<String, String>| {
                        m.insert("experts".into(), "[0, 6]".into());
                    }),
                ),
            ];
            for (want, edit) in cases {
                rewrite(&good, &bad, edit);
                let name = checkpoint_name(apply_tuned(&device, &config, layer.weights_mut().unwrap(), &bad));
                assert!(name.contains(&want), "expected an error naming {want}, got {name}");
                assert_eq!(
                    all_bits(&device, layer.weights()),
                    before,
                    "a refused file changes nothing"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
