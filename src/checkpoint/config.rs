//! `config.json` → [`MoeConfig`].
use super::problem;
use crate::Result;
use crate::layers::{MoeConfig, RouterKind};
use serde_json::Value;

/// The first of `fields` present in `json` (a config names the same quantity differently per
/// model family).
fn first<'a>(json: &'a Value, fields: &[&str]) -> Option<(&'a Value, String)> {
    fields.iter().find_map(|f| {
        json.get(*f)
            .filter(|v| !v.is_null())
            .map(|v| (v, format!("config.json: {f}")))
    })
}

fn count(json: &Value, fields: &[&str]) -> Result<Option<usize>> {
    let Some((value, name)) = first(json, fields) else {
        return Ok(None);
    };
    let n = value
        .as_u64()
        .ok_or_else(|| problem(&name, format!("{value}: expected a count")))?;
    usize::try_from(n)
        .map(Some)
        .map_err(|_| problem(name, format!("{n}: too large")))
}

fn required(json: &Value, fields: &[&str]) -> Result<usize> {
    count(json, fields)?.ok_or_else(|| problem(format!("config.json: {}", fields.join(" | ")), "missing"))
}

fn flag(json: &Value, field: &str, default: bool) -> Result<bool> {
    match first(json, &[field]) {
        None => Ok(default),
        Some((value, name)) => value
            .as_bool()
            .ok_or_else(|| problem(name, format!("{value}: expected true or false"))),
    }
}

/// The routed layer a Hugging Face `config.json` describes, with work buffers for `max_tokens`:
///
/// | `MoeConfig` | `config.json` |
/// |---|---|
/// | `dim` | `hidden_size` |
/// | `experts` | `num_local_experts` (Mixtral), `num_experts` (Qwen3-MoE), `n_routed_experts` (DeepSeek) |
/// | `k` | `num_experts_per_tok` |
/// | `hidden` | `moe_intermediate_size`, else `intermediate_size` (Mixtral) |
/// | `normalize_topk` | `norm_topk_prob` (default: true for Mixtral, which always renormalizes, and DeepSeek-V3; false otherwise) |
/// | `route_scale` | `routed_scaling_factor` (default 1; 2.5 for DeepSeek-V3) |
/// | `router` | `Sigmoid { groups: n_group, topk_groups: topk_group }` when `scoring_func` is `"sigmoid"` or `model_type` is `deepseek_v3`, else `Linear` (softmax) |
/// | `shared_experts` | `n_shared_experts` (default 0; 1 for DeepSeek-V3) |
///
/// The router losses are left off (`aux_alpha`, `z_loss` 0): set them for training, mindful
/// that Mixtral's `router_aux_loss_coef` is k times smaller than `aux_alpha` (see
/// [`MoeConfig::aux_alpha`]). Missing or malformed fields are an error naming them.
pub fn moe_config(json: &Value, max_tokens: usize) -> Result<MoeConfig> {
    let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
    let deepseek_v3 = model_type == "deepseek_v3";
    let sigmoid = match first(json, &["scoring_func"]) {
        Some((value, name)) => match value.as_str() {
            Some("sigmoid") => true,
            Some("softmax") => false,
            _ => return Err(problem(name, format!("{value}: expected \"softmax\" or \"sigmoid\""))),
        },
        None => deepseek_v3,
    };
    let router = if sigmoid {
        let groups = count(json, &["n_group"])?.unwrap_or(if deepseek_v3 { 8 } else { 1 });
        let topk_groups = count(json, &["topk_group"])?.unwrap_or(if deepseek_v3 { 4 } else { 1 });
        RouterKind::Sigmoid { groups, topk_groups }
    } else {
        RouterKind::Linear
    };
    let route_scale = match first(json, &["routed_scaling_factor"]) {
        Some((value, name)) => value
            .as_f64()
            .ok_or_else(|| problem(name, format!("{value}: expected a number")))? as f32,
        None if deepseek_v3 => 2.5,
        None => 1.0,
    };
    let mixtral = model_type == "mixtral";
    let config = MoeConfig {
        router,
        experts: required(json, &["num_local_experts", "num_experts", "n_routed_experts"])?,
        k: required(json, &["num_experts_per_tok"])?,
        normalize_topk: mixtral || flag(json, "norm_topk_prob", deepseek_v3)?,
        route_scale,
        dim: required(json, &["hidden_size"])?,
        hidden: required(json, &["moe_intermediate_size", "intermediate_size"])?,
        shared_experts: count(json, &["n_shared_experts"])?.unwrap_or(if deepseek_v3 { 1 } else { 0 }),
        capacity_factor: None,
        aux_alpha: 0.0,
        z_loss: 0.0,
        max_tokens,
    };
    config.validate()?;
    Ok(config)
}
