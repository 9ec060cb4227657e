//! Every validation error of the grouped GEMM ops: an `Err` naming the argument, and nothing
//! launched.
use super::common::{Rng, devices};
use super::{DeviceGroups, Problem};
use half::{bf16, f16};
use moe_kernels::ops::gemm::{
    self, ARows, DgradEpilogue, Epilogue, ExpertMask, ForwardConfig, GemmPath, GemmShape, Groups, WgradWrite,
};
use moe_kernels::{Device, DeviceBuffer, Error, Result};

#[track_caller]
fn assert_names(result: Result<()>, argument: &str) {
    match result {
        Err(Error::Shape { argument: a, .. }) | Err(Error::InvalidArgument { argument: a, .. }) => {
            assert_eq!(a, argument, "wrong argument named")
        }
        other => panic!("expected an error naming `{argument}`, got {other:?}"),
    }
}

type Buf<T> = DeviceBuffer<T>;
const NO_F32: Option<&Buf<f32>> = None;
const NO_GU: Option<&mut Buf<bf16>> = None;

/// The forward of `p` (bf16, contiguous A) with one thing changed by `edit`.
struct Fwd<'a> {
    device: &'a Device,
    a: Buf<bf16>,
    b: Buf<bf16>,
    out: Buf<bf16>,
    shape: GemmShape,
    config: ForwardConfig,
}

impl Fwd<'_> {
    fn run(&mut self, groups: &Groups<'_, Buf<i32>>) -> Result<()> {
        let Fwd {
            device,
            a,
            b,
            out,
            shape,
            config,
        } = self;
        gemm::forward(device, &*a, &*b, *shape, groups, config, NO_F32, out, NO_GU)
    }
}

#[test]
fn forward_rejects_bad_inputs() {
    let p = Problem::sized(&[3, 5], 16, 24, &mut Rng::new(1));
    for device in devices() {
        let dg = DeviceGroups::new(&device, &p);
        let zeros = |len: usize| device.alloc_zeros::<bf16>(len).unwrap();
        let fresh = || Fwd {
            device: &device,
            a: zeros(8 * 24),
            b: zeros(2 * 16 * 24),
            out: zeros(8 * 16),
            shape: p.shape,
            config: ForwardConfig::default(),
        };
        let before = device.stats();
        assert!(fresh().run(&dg.groups(&p)).is_ok(), "the unedited call must pass");
        let launches = device.stats().launches;
        assert_eq!(launches - before.launches, 1);

        let mut f = fresh();
        f.a = zeros(7 * 24);
        assert_names(f.run(&dg.groups(&p)), "a");
        let mut f = fresh();
        f.b = zeros(16 * 24);
        assert_names(f.run(&dg.groups(&p)), "b");
        let mut f = fresh();
        f.out = zeros(8 * 8);
        assert_names(f.run(&dg.groups(&p)), "out");
        let mut f = fresh();
        f.config.epilogue = Epilogue::SwiGlu; // out must then be [rows, N/2]
        assert_names(f.run(&dg.groups(&p)), "out");
        // Sizes the tensor-core tiles cannot take (GemmPath::Auto would run the decode kernel).
        let mut f = fresh();
        f.config.path = GemmPath::Tiled;
        f.shape.k = 20;
        assert_names(f.run(&dg.groups(&p)), "shape.k");
        let mut f = fresh();
        f.config.path = GemmPath::Tiled;
        f.shape.n = 12;
        assert_names(f.run(&dg.groups(&p)), "shape.n");
        let mut f = fresh();
        f.shape.experts = 0;
        assert_names(f.run(&dg.groups(&p)), "shape.experts");
        let mut f = fresh();
        f.config.a_rows = ARows::Gathered { top_k: 0 };
        assert_names(f.run(&dg.groups(&p)), "top_k");
        let short_offsets = device.upload(&[0i32, 3]).unwrap();
        let groups = Groups {
            offsets: &short_offsets,
            ..dg.groups(&p)
        };
        assert_names(fresh().run(&groups), "groups.offsets");
        let short_rows = device.upload(&[0i32; 7]).unwrap();
        let groups = Groups {
            sorted_rows: Some(&short_rows),
            ..dg.groups(&p)
        };
        assert_names(fresh().run(&groups), "groups.sorted_rows");
        let mut f = fresh();
        f.config.a_rows = ARows::Gathered { top_k: 1 };
        let groups = Groups {
            sorted_rows: None,
            ..dg.groups(&p)
        };
        assert_names(f.run(&groups), "groups.sorted_rows");

        // Odd N with SwiGLU (f32 takes any other shape); an output dtype that is neither T nor f32.
        let z32 = |len: usize| device.alloc_zeros::<f32>(len).unwrap();
        let odd = GemmShape { n: 15, ..p.shape };
        let swiglu = ForwardConfig {
            epilogue: Epilogue::SwiGlu,
            ..ForwardConfig::default()
        };
        let r = gemm::forward(
            &device,
            &z32(8 * 24),
            &z32(2 * 15 * 24),
            odd,
            &dg.groups(&p),
            &swiglu,
            NO_F32,
            &mut z32(8 * 7),
            None::<&mut Buf<f32>>,
        );
        assert_names(r, "shape.n");
        let mut out16 = device.alloc_zeros::<f16>(8 * 16).unwrap();
        let f = fresh();
        let r = gemm::forward(
            &device,
            &f.a,
            &f.b,
            p.shape,
            &dg.groups(&p),
            &f.config,
            NO_F32,
            &mut out16,
            NO_GU,
        );
        assert_names(r, "out");
        // gu without SwiGLU; row weights of the wrong length for a gather.
        let mut f = fresh();
        let mut gu = zeros(8 * 16);
        let r = gemm::forward(
            &device,
            &f.a,
            &f.b,
            p.shape,
            &dg.groups(&p),
            &f.config,
            NO_F32,
            &mut f.out,
            Some(&mut gu),
        );
        assert_names(r, "gu");
        let gathered = ForwardConfig {
            a_rows: ARows::Gathered { top_k: 1 },
            ..ForwardConfig::default()
        };
        let w = device.alloc_zeros::<f32>(5).unwrap();
        let mut f = fresh();
        let r = gemm::forward(
            &device,
            &f.a,
            &f.b,
            p.shape,
            &dg.groups(&p),
            &gathered,
            Some(&w),
            &mut f.out,
            NO_GU,
        );
        assert_names(r, "row_weights");
        assert_eq!(device.stats().launches, launches, "a rejected call launched");
    }
}

#[test]
fn backward_rejects_bad_inputs() {
    let p = Problem::sized(&[3, 5], 16, 24, &mut Rng::new(2));
    for device in devices() {
        let dg = DeviceGroups::new(&device, &p);
        let g = dg.groups(&p);
        let zeros = |len: usize| device.alloc_zeros::<bf16>(len).unwrap();
        let (dc, b, gu) = (zeros(8 * 16), zeros(2 * 16 * 24), zeros(8 * 48));
        let launches = device.stats().launches;
        let no_gu = None::<&Buf<bf16>>;
        let store = DgradEpilogue::Store;
        let swiglu = DgradEpilogue::SwiGluBackward;
        assert_names(
            gemm::dgrad(
                &device,
                &zeros(8 * 15),
                &b,
                p.shape,
                &g,
                store,
                NO_F32,
                no_gu,
                &mut zeros(8 * 24),
            ),
            "dc",
        );
        assert_names(
            gemm::dgrad(&device, &dc, &b, p.shape, &g, store, NO_F32, no_gu, &mut zeros(8 * 23)),
            "out",
        );
        assert_names(
            gemm::dgrad(&device, &dc, &b, p.shape, &g, swiglu, NO_F32, no_gu, &mut zeros(8 * 48)),
            "gu",
        );
        assert_names(
            gemm::dgrad(
                &device,
                &dc,
                &b,
                p.shape,
                &g,
                swiglu,
                NO_F32,
                Some(&zeros(5)),
                &mut zeros(8 * 48),
            ),
            "gu",
        );
        assert_names(
            gemm::dgrad(
                &device,
                &dc,
                &b,
                p.shape,
                &g,
                store,
                NO_F32,
                Some(&gu),
                &mut zeros(8 * 24),
            ),
            "gu",
        );
        let mut db = device.alloc_zeros::<f32>(2 * 16 * 24).unwrap();
        let a = zeros(8 * 24);
        let mask3 = ExpertMask::new(&device, &[true, false, true]).unwrap();
        let mask2 = ExpertMask::new(&device, &[true, false]).unwrap();
        let none = None::<&ExpertMask>;
        let contiguous = ARows::Contiguous;
        assert_names(
            gemm::wgrad(
                &device,
                &dc,
                &a,
                contiguous,
                p.shape,
                &g,
                Some(&mask3),
                WgradWrite::Replace,
                &mut db,
            ),
            "mask",
        );
        assert_names(
            gemm::wgrad(
                &device,
                &dc,
                &zeros(8),
                contiguous,
                p.shape,
                &g,
                none,
                WgradWrite::Replace,
                &mut db,
            ),
            "a",
        );
        assert_names(
            gemm::wgrad(
                &device,
                &zeros(3),
                &a,
                contiguous,
                p.shape,
                &g,
                none,
                WgradWrite::Replace,
                &mut db,
            ),
            "dc",
        );
        let mut short_db = device.alloc_zeros::<f32>(10).unwrap();
        assert_names(
            gemm::wgrad(
                &device,
                &dc,
                &a,
                contiguous,
                p.shape,
                &g,
                none,
                WgradWrite::Replace,
                &mut short_db,
            ),
            "db",
        );
        let gathered = ARows::Gathered { top_k: 1 };
        assert_names(
            gemm::wgrad(
                &device,
                &dc,
                &zeros(8 * 24 + 1),
                gathered,
                p.shape,
                &g,
                none,
                WgradWrite::Replace,
                &mut db,
            ),
            "a",
        );
        assert_names(ExpertMask::new(&device, &[]).map(|_| ()), "selected.len()");
        // Sparse mode: flags of the wrong length, a call index past MAX_WGRAD_CALL.
        let mut short_flags = device.alloc_zeros::<u32>(1).unwrap();
        let mut flags = device.alloc_zeros::<u32>(p.shape.experts).unwrap();
        for (written, call, argument) in [
            (&mut short_flags, 0, "written"),
            (&mut flags, gemm::MAX_WGRAD_CALL + 1, "call"),
        ] {
            let write = WgradWrite::Sparse { written, call };
            let result = gemm::wgrad(&device, &dc, &a, contiguous, p.shape, &g, none, write, &mut db);
            assert_names(result, argument);
        }
        // zero_unwritten: db not a whole number of experts.
        let mut ragged = device.alloc_zeros::<f32>(3 * p.shape.experts + 1).unwrap();
        assert_names(gemm::zero_unwritten(&device, &flags, &mut ragged), "db");
        assert_eq!(device.stats().launches, launches, "a rejected call launched");
        gemm::wgrad(
            &device,
            &dc,
            &a,
            contiguous,
            p.shape,
            &g,
            Some(&mask2),
            WgradWrite::Replace,
            &mut db,
        )
        .unwrap();
    }
}
