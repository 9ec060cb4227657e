//! Every public sizing helper, allocation helper and a representative op of each family,
//! called with extreme sizes (0, 1, around 2^31, 2^62, 2^63, `usize::MAX`): each returns `Ok`
//! or `Err`, never panics (a panic fails the property), and an `Ok` size is the exact count,
//! computed here independently.
use moe_kernels::Device;
use moe_kernels::layers::{MoeConfig, MoeLayer};
use moe_kernels::ops::codebook::{self, CodeOrder, CodebookShape, NearestConfig};
use moe_kernels::ops::dispatch::{self, Capacity, MapConfig, MapPath, RoutingMap};
use moe_kernels::ops::gate::{self, GateForm, GateShape};
use moe_kernels::ops::gemm::{self, Epilogue, GemmShape};
use moe_kernels::ops::{esft, mix, router};
use proptest::prelude::*;

const EXTREMES: [usize; 10] = [
    0,
    1,
    2,
    (1 << 31) - 1,
    1 << 31,
    (1 << 31) + 1,
    1 << 62,
    1 << 63,
    usize::MAX - 1,
    usize::MAX,
];

/// An extreme value or a small one (so valid and invalid cases both come up).
fn size() -> impl Strategy<Value = usize> {
    prop_oneof![prop::sample::select(EXTREMES.to_vec()), 0usize..40]
}

/// Like [`size`], without the values near 2^31 that a valid config could turn into a real
/// multi-GiB allocation (which this machine, or AddressSanitizer, may refuse by aborting):
/// what the allocation helpers get.
fn alloc_size() -> impl Strategy<Value = usize> {
    let huge: Vec<usize> = EXTREMES.iter().copied().filter(|v| !(3..1 << 62).contains(v)).collect();
    prop_oneof![prop::sample::select(huge), 0usize..40]
}

/// The product in order, `None` when a partial product overflows `usize` (`E·N·K` with
/// `E·N` past `usize::MAX` is refused even when K = 0).
fn product(values: &[usize]) -> Option<usize> {
    values.iter().try_fold(1usize, |acc, &v| acc.checked_mul(v))
}

/// `Ok(v)` must be `expected`; `Err` only when `expected` does not fit.
fn exact(result: moe_kernels::Result<usize>, expected: Option<usize>) -> Result<(), TestCaseError> {
    match (result, expected) {
        (Ok(v), Some(e)) => prop_assert_eq!(v, e),
        (Ok(v), None) => prop_assert!(false, "Ok({v}) for a count that overflows usize"),
        (Err(_), None) => {}
        (Err(e), Some(x)) => prop_assert!(false, "Err({e}) for a count {x} that fits"),
    }
    Ok(())
}

fn emulator() -> Device {
    Device::emulator().expect("the emulator is compiled in")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn shape_helpers_are_exact_or_err(a in size(), b in size(), c in size(), r in size()) {
        let g = GateShape { tokens: a, dim: b, experts: c, rank: r };
        exact(g.x_len(), product(&[a, b]))?;
        exact(g.z_len(), product(&[a, c]))?;
        let _ = g.validate();
        for form in [GateForm::Linear, GateForm::LowRank, GateForm::Symmetric, GateForm::Attention, GateForm::Full] {
            let _ = gate::backward_workspace_len(form, &g);
        }
        let cb = CodebookShape { tokens: a, dim: b, codes: c };
        exact(cb.x_len(), product(&[a, b]))?;
        exact(cb.codebook_len(), product(&[c, b]))?;
        let _ = cb.validate();
        let _ = codebook::losses_workspace_len::<f32>(&cb);
        let _ = codebook::losses_workspace_len::<half::bf16>(&cb);
        let nearest = NearestConfig { k: r, num_experts: 1, splits: Some(r) };
        for config in [nearest, NearestConfig::default()] {
            let ws = config.workspace_len(&cb);
            prop_assert!(ws.is_err() || config.validate(&cb).is_ok());
            let _ = (config.launches(&cb), NearestConfig::max_splits(&cb));
        }
        let gemm = GemmShape { experts: a, n: b, k: c };
        exact(gemm.weight_len(), product(&[a, b, c]))?;
        exact(gemm::forward_out_len(&gemm, r, Epilogue::Store), product(&[r, b]))?;
        exact(gemm::forward_out_len(&gemm, r, Epilogue::SwiGlu), product(&[r, b / 2]))?;
        exact(mix::rows_len(a, b), product(&[a, b]))?;
        let rc = router::RouterConfig { experts: a, k: b, ..router::RouterConfig::default() };
        exact(router::selection_len(&rc, c), product(&[c, b]))?;
        let _ = router::expert_statistics_workspace_len(&rc, c);
        let _ = rc.validate();
    }

    #[test]
    fn map_sizes_are_exact_or_err(
        experts in size(), align in size(), tile in size(), tokens in size(), k in size(),
        local in (size(), size()), factor in prop::sample::select(vec![0.0, 0.5, 1.0, 1e300, f64::MAX]),
        min_capacity in size(),
    ) {
        let mut config = MapConfig::new(experts);
        config.align = align;
        config.path = MapPath::Tiled { tile_slots: tile };
        config.local_experts = Some(local.0..local.1);
        config.capacity = Some(Capacity { factor, min_capacity });
        for (capacity, path) in [(config.capacity, config.path), (None, MapPath::Auto), (None, MapPath::SingleBlock)] {
            let c = MapConfig { capacity, path, ..config.clone() };
            let valid = c.validate().is_ok();
            let rows = c.sorted_rows_len(tokens, k);
            prop_assert!(valid || rows.is_err(), "an invalid config was sized");
            if let (Ok(rows), None) = (&rows, capacity) {
                let padding = c.local_count() as u128 * (align as u128 - 1);
                prop_assert_eq!(*rows as u128, tokens as u128 * k as u128 + padding);
            }
            prop_assert!(valid || c.workspace_len(tokens, k).is_err());
            prop_assert!(valid || c.counted_workspace_len(tokens, k).is_err());
            let _ = (c.capacity_per_expert(tokens, k), c.tile_slots(tokens, k), c.counted_tile_slots());
        }
        let _ = Capacity { factor, min_capacity }.slots_per_expert(tokens, k, experts);
    }

    #[test]
    fn allocation_helpers_refuse_what_cannot_fit(
        tokens in alloc_size(), k in alloc_size(), experts in prop::sample::select(vec![0, 1, 8, 1024, 1025, usize::MAX]),
        len in alloc_size(),
    ) {
        let device = emulator();
        let config = MapConfig::new(experts);
        if let Ok(map) = RoutingMap::alloc(&device, tokens, k, &config) {
            prop_assert_eq!(map.inverse.len(), tokens * k);
            prop_assert_eq!(map.sorted_rows.len(), config.sorted_rows_len(tokens, k).unwrap());
        }
        let _ = CodeOrder::alloc(&device, tokens, experts);
        let _ = (esft::EsftScores::new(&device, experts, k), esft::EsftSelection::new(&device, experts));
        let rc = router::RouterConfig { experts: experts.clamp(1, 8), k: 1, ..router::RouterConfig::default() };
        for sequence_length in [None, Some(len), Some(tokens)] {
            let aux = router::AuxLossConfig { alpha: 0.01, sequence_length };
            if let Ok(workspace) = router::AuxLossWorkspace::new(&device, &rc, &aux, tokens) {
                prop_assert!(aux.validate(tokens).is_ok());
                prop_assert_eq!(workspace.counts().len() % rc.experts, 0);
            }
        }
        match device.alloc_zeros::<f32>(len) {
            Ok(buffer) => prop_assert_eq!(buffer.len(), len),
            Err(_) => prop_assert!(len >= 1 << 62, "refused {} elements", len),
        }
    }

    #[test]
    fn ops_refuse_extreme_sizes_with_small_buffers(tokens in size(), k in size(), d in size(), experts in size()) {
        let device = emulator();
        let ids = device.alloc_zeros::<i32>(8).unwrap();
        let config = MapConfig::new(experts.min(64));
        let mut map = RoutingMap::alloc(&device, 2, 4, &MapConfig::new(8)).unwrap();
        // 8 slots take the single-block path, which needs no workspace.
        let mut ws = device.alloc_zeros::<i32>(0).unwrap();
        let mapped = dispatch::routing_map(&device, &ids, tokens, k, &config, &mut map, &mut ws);
        // Any (T, k) with T·k = 8 fits the map's 8 slots (no padding at align 1).
        prop_assert_eq!(mapped.is_ok(), tokens.checked_mul(k) == Some(8) && experts == 8);

        let logits = device.alloc_zeros::<f32>(4).unwrap();
        let rows = device.alloc_zeros::<f32>(8).unwrap();
        let mut y = device.alloc_zeros::<f32>(8).unwrap();
        let mixed = mix::forward(&device, &logits, &rows, &rows, d, &mut y);
        prop_assert_eq!(mixed.is_ok(), d == 4);

        let rc = router::RouterConfig { experts, k, ..router::RouterConfig::default() };
        let (mut sel_ids, mut weights) = (device.alloc_zeros::<i32>(8).unwrap(), device.alloc_zeros::<f32>(8).unwrap());
        let mut nonfinite = device.alloc_zeros::<u32>(1).unwrap();
        let no_bias = None::<&moe_kernels::DeviceBuffer<f32>>;
        let _ = router::select(&device, &rc, &logits, no_bias, &mut sel_ids, &mut weights, &mut nonfinite);

        let moe = MoeConfig { experts, k, dim: d, hidden: tokens, max_tokens: tokens, ..MoeConfig::default() };
        prop_assert!(MoeLayer::<f32>::saved_bytes_per_token_formula(&moe).is_ok() == moe.validate().is_ok());
        let _ = moe.shared_hidden();
    }

    #[test]
    fn a_layer_refuses_extreme_configs_and_token_counts(
        experts in size(), k in size(), dim in size(), hidden in size(), shared in size(), max_tokens in size(), tokens in size(),
    ) {
        let device = emulator();
        let config = MoeConfig { experts, k, dim, hidden, shared_experts: shared, max_tokens, ..MoeConfig::default() };
        if config.validate().is_ok() {
            // A valid config of these sizes may be far too big to allocate here: only check
            // that its size formula is defined.
            prop_assert!(MoeLayer::<f32>::saved_bytes_per_token_formula(&config).is_ok());
            return Ok(());
        }
        let small = MoeConfig { max_tokens: 4, dim: 8, hidden: 8, ..MoeConfig::default() };
        let weights = moe_kernels::layers::HostWeights::random(&small, 1);
        prop_assert!(MoeLayer::<f32>::new(&device, config, &weights).is_err());
        let mut layer = MoeLayer::<f32>::new(&device, small, &weights).unwrap();
        let x = device.alloc_zeros::<f32>(32).unwrap();
        let mut y = device.alloc_zeros::<f32>(32).unwrap();
        let forward = layer.forward(&x, tokens, &mut y);
        prop_assert_eq!(forward.is_ok(), tokens == 4);
    }
}
