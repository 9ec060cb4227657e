//! Bad inputs: every validation error names its argument, and nothing is launched.
use super::common::devices;
use moe_kernels::ops::dispatch::{self, Capacity, MapConfig, MapPath, RoutingMap};
use moe_kernels::{DeviceBuffer, Error};

pub fn argument_of(e: Error) -> &'static str {
    match e {
        Error::Shape { argument, .. } | Error::InvalidArgument { argument, .. } => argument,
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn bad_map_inputs_are_errors_naming_the_argument() {
    for device in devices() {
        let (tokens, k) = (10, 2);
        let good = MapConfig::new(4);
        let ids = device.upload(&vec![0i32; tokens * k]).unwrap();
        let run = |config: &MapConfig, ids: &DeviceBuffer<i32>, tokens: usize, k: usize| {
            // `alloc` refuses a bad k as `routing_map` does; the map of a valid k is never reached.
            let map_k = if (1..=good.num_experts).contains(&k) { k } else { 1 };
            let mut map = RoutingMap::alloc(&device, tokens, map_k, &good).unwrap();
            let mut ws = device
                .alloc_zeros::<i32>(good.workspace_len(tokens, map_k).unwrap())
                .unwrap();
            let launches = device.stats().launches;
            let e = dispatch::routing_map(&device, ids, tokens, k, config, &mut map, &mut ws).unwrap_err();
            assert_eq!(device.stats().launches, launches, "launched despite {e}");
            argument_of(e)
        };
        let with = |f: &dyn Fn(&mut MapConfig)| {
            let mut c = good.clone();
            f(&mut c);
            c
        };
        assert_eq!(run(&with(&|c| c.num_experts = 0), &ids, tokens, k), "num_experts");
        assert_eq!(run(&with(&|c| c.num_experts = 1025), &ids, tokens, k), "num_experts");
        assert_eq!(run(&with(&|c| c.align = 0), &ids, tokens, k), "align");
        assert_eq!(
            run(&with(&|c| c.local_experts = Some(2..2)), &ids, tokens, k),
            "local_experts"
        );
        assert_eq!(
            run(&with(&|c| c.local_experts = Some(1..5)), &ids, tokens, k),
            "local_experts"
        );
        let negative = Capacity {
            factor: -0.5,
            ..Capacity::default()
        };
        assert_eq!(
            run(&with(&|c| c.capacity = Some(negative)), &ids, tokens, k),
            "capacity.factor"
        );
        assert!(Capacity::default().validate().is_ok());
        assert_eq!(argument_of(MapConfig::default().validate().unwrap_err()), "num_experts");
        let nan = Capacity {
            factor: f64::NAN,
            min_capacity: 0,
        };
        assert_eq!(
            run(&with(&|c| c.capacity = Some(nan)), &ids, tokens, k),
            "capacity.factor"
        );
        assert_eq!(
            run(&with(&|c| c.path = MapPath::Tiled { tile_slots: 100 }), &ids, tokens, k),
            "path.tile_slots"
        );
        assert_eq!(run(&good, &ids, tokens, 5), "k"); // k > E
        assert_eq!(run(&good, &ids, tokens, 0), "k");
        assert_eq!(run(&good, &ids, tokens + 1, k), "ids");
        // Output buffers of the wrong length, one at a time (the map was sized for `good`).
        let padded = with(&|c| c.align = 4);
        assert_eq!(run(&padded, &ids, tokens, k), "sorted_rows");
        let local = with(&|c| c.local_experts = Some(0..3));
        assert_eq!(run(&local, &ids, tokens, k), "counts");
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        let mut ws = device
            .alloc_zeros::<i32>(good.workspace_len(tokens, k).unwrap())
            .unwrap();
        map.inverse = device.alloc_zeros(3).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "inverse");
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        map.offsets = device.alloc_zeros(4).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "offsets");
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        map.status = device.alloc_zeros(1).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "status");
        let tiled = with(&|c| c.path = MapPath::Tiled { tile_slots: 256 });
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        let e = dispatch::routing_map(&device, &ids, tokens, k, &tiled, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "workspace");
        // T·k beyond i32: refused before any buffer is looked at.
        let mut map = RoutingMap::alloc(&device, tokens, k, &good).unwrap();
        let e = dispatch::routing_map(&device, &ids, 1 << 30, k, &good, &mut map, &mut ws).unwrap_err();
        assert_eq!(argument_of(e), "tokens");
    }
}

#[test]
fn bad_row_inputs_are_errors_naming_the_argument() {
    let (tokens, k, d) = (5, 2, 8);
    for device in devices() {
        let f = |n: usize| device.alloc_zeros::<f32>(n).unwrap();
        let i = |n: usize| device.alloc_zeros::<i32>(n).unwrap();
        let (x, sorted, inverse, w) = (f(tokens * d), i(12), i(tokens * k), f(tokens * k));
        let launches = device.stats().launches;
        let permute = |x: &DeviceBuffer<f32>, inverse: &DeviceBuffer<i32>, xp_len: usize, k: usize, d: usize| {
            let mut xp = f(xp_len);
            argument_of(dispatch::permute(&device, x, &sorted, inverse, tokens, k, d, &mut xp).unwrap_err())
        };
        assert_eq!(permute(&x, &inverse, 12 * d, 0, d), "k");
        assert_eq!(permute(&x, &inverse, 12 * d, 33, d), "k");
        assert_eq!(permute(&x, &inverse, 0, k, 0), "d");
        assert_eq!(permute(&f(3), &inverse, 12 * d, k, d), "x");
        assert_eq!(permute(&x, &i(3), 12 * d, k, d), "inverse");
        assert_eq!(permute(&x, &inverse, 11 * d, k, d), "xp");
        let combine =
            |inverse: &DeviceBuffer<i32>, w: &DeviceBuffer<f32>, r: &DeviceBuffer<f32>, y_len: usize, yp_len: usize| {
                let (mut y, yp) = (f(y_len), f(yp_len));
                argument_of(
                    dispatch::combine(&device, &yp, inverse, Some(w), Some(r), tokens, k, d, &mut y).unwrap_err(),
                )
            };
        assert_eq!(combine(&i(3), &w, &x, tokens * d, 12 * d), "inverse");
        assert_eq!(combine(&inverse, &f(3), &x, tokens * d, 12 * d), "weights");
        assert_eq!(combine(&inverse, &w, &f(3), tokens * d, 12 * d), "residual");
        assert_eq!(combine(&inverse, &w, &x, 3, 12 * d), "y");
        assert_eq!(combine(&inverse, &w, &x, tokens * d, 12 * d + 1), "yp");
        let mut dx = f(3);
        let e = dispatch::permute_backward(&device, &f(12 * d), &inverse, tokens, k, d, &mut dx).unwrap_err();
        assert_eq!(argument_of(e), "dx");
        let bwd = |dy_len: usize, yp: Option<&DeviceBuffer<f32>>, dyp_len: usize, dw_len: Option<usize>| {
            let (dy, mut dyp) = (f(dy_len), f(dyp_len));
            let mut dw = dw_len.map(f);
            argument_of(
                dispatch::combine_backward(
                    &device,
                    &dy,
                    yp,
                    &sorted,
                    &inverse,
                    Some(&w),
                    tokens,
                    k,
                    d,
                    &mut dyp,
                    dw.as_mut(),
                )
                .unwrap_err(),
            )
        };
        let yp = f(12 * d);
        assert_eq!(bwd(3, Some(&yp), 12 * d, Some(tokens * k)), "dy");
        assert_eq!(bwd(tokens * d, Some(&yp), 3, Some(tokens * k)), "dyp");
        assert_eq!(bwd(tokens * d, Some(&f(3)), 12 * d, Some(tokens * k)), "yp");
        assert_eq!(bwd(tokens * d, None, 12 * d, Some(tokens * k)), "yp");
        assert_eq!(bwd(tokens * d, Some(&yp), 12 * d, Some(3)), "dw");
        assert_eq!(device.stats().launches, launches, "a rejected call launched");
    }
}
