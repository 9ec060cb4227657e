//! Self-tests of Hopper's asynchronous data movement (`kernels/selftest_async.cu`): mbarrier
//! phases over many stages with bulk copies in and out, and TMA boxes of 2 to 5 dimensions
//! at the tensor's edges in every swizzle mode, loaded and stored back. Expected outputs are
//! replayed on the host from the formulas above the kernels. They run on the emulator and on
//! sm_90 GPUs; [`hopper_capable`] says where.
use super::{Check, Report, Rng};
use crate::device::{Device, Element, KernelArgs, LaunchConfig, Swizzle, TensorMapSpec};
use crate::{Error, Result};

/// Whether `device` runs sm_90 instructions: the emulator, or a GPU of compute capability 9.x.
pub fn hopper_capable(device: &Device) -> bool {
    device.runs_sm90a()
}

pub(crate) fn require_hopper(device: &Device, kernel: &str) -> Result<()> {
    if hopper_capable(device) {
        return Ok(());
    }
    Err(Error::InvalidArgument {
        argument: "device",
        value: device.description(),
        expected: format!("the emulator or an sm_90 GPU: `{kernel}` uses sm_90 instructions"),
    })
}

/// `selftest_mbarrier_pipeline` for several consumer counts, stage counts and rounds.
pub fn mbarrier_pipeline(device: &Device) -> Result<Check> {
    require_hopper(device, "selftest_mbarrier_pipeline")?;
    let mut report = Report::new("mbarrier_pipeline");
    let mut rng = Rng::new(15);
    for (consumers, stages, rounds) in [(32usize, 3usize, 20usize), (64, 1, 7), (96, 8, 40), (4, 2, 9)] {
        let src = rng.vec(rounds * consumers, Rng::next_u32);
        let src_dev = device.upload(&src)?;
        let mut out = device.alloc_zeros::<u32>(consumers)?;
        let shared = (4 * consumers * (stages + 1) + 16) as u32;
        device.launch(
            "selftest_mbarrier_pipeline",
            LaunchConfig::linear(1, 32 + consumers as u32, shared),
            KernelArgs::new(device)
                .input("src", &src_dev)
                .scalar(rounds as i32)
                .scalar(stages as i32)
                .output("out", &mut out),
        )?;
        report.case(format!("{consumers} consumers, {stages} stages, {rounds} rounds"));
        let expected = pipeline_expected(&src, consumers, rounds);
        report.exact("", &device.download(&out)?, &expected);
    }
    Ok(report.finish())
}

/// acc_i = fold over rounds r of acc_i * 31 + src[r * consumers + i] (u32, wrapping).
pub(crate) fn pipeline_expected(src: &[u32], consumers: usize, rounds: usize) -> Vec<u32> {
    (0..consumers)
        .map(|i| (0..rounds).fold(0u32, |acc, r| acc.wrapping_mul(31).wrapping_add(src[r * consumers + i])))
        .collect()
}

/// One TMA box: the tensor, the box, the swizzle and where it is loaded from and stored to.
pub struct BoxCase {
    pub dims: Vec<u64>,
    pub box_dims: Vec<u32>,
    pub swizzle: Swizzle,
    pub load: Vec<i32>,
    pub store: Vec<i32>,
}

/// A dense tensor of `dims` elements of `esize` bytes whose rows (and every higher stride) are
/// padded to 16 bytes, and one more 16 bytes between rows so the strides matter.
pub fn padded_strides(dims: &[u64], esize: u64) -> Vec<u64> {
    let mut strides = vec![];
    let mut stride = (dims[0] * esize).div_ceil(16) * 16 + 16;
    for &n in &dims[1..] {
        strides.push(stride);
        stride *= n;
    }
    strides
}

/// The elements a tensor map over `dims` and `strides` reaches (the buffer it needs).
pub fn reach_elements(dims: &[u64], strides: &[u64], esize: u64) -> usize {
    let bytes = dims[0] * esize + strides.iter().zip(&dims[1..]).map(|(&s, &n)| (n - 1) * s).sum::<u64>();
    (bytes / esize) as usize
}

/// Where the byte at offset `o` of a tile aligned to its swizzle's repeat lands
/// (`kernels/include/swizzle.cuh`): the 16-byte chunk index, bits 4-6, XOR the 128-byte row
/// index, bits 7-9, masked to the mode's width.
pub fn swizzled_offset(o: usize, swizzle: Swizzle) -> usize {
    let mask = (1usize << swizzle as u32) - 1;
    o ^ (((o >> 7) & mask) << 4)
}

/// The box's elements in shared-memory order (dimension 0 fastest), each with its element
/// offset in the tensor at `origin`, or None when outside the tensor.
pub fn box_elements(case: &BoxCase, origin: &[i32], strides: &[u64], esize: u64) -> Vec<Option<usize>> {
    let count: usize = case.box_dims.iter().map(|&b| b as usize).product();
    (0..count)
        .map(|e| {
            let (mut rest, mut offset, mut inside) = (e, 0i64, true);
            for (d, &b) in case.box_dims.iter().enumerate() {
                let g = i64::from(origin[d]) + (rest % b as usize) as i64;
                rest /= b as usize;
                inside &= g >= 0 && (g as u64) < case.dims[d];
                offset += g * if d == 0 { 1 } else { (strides[d - 1] / esize) as i64 };
            }
            inside.then_some(offset as usize)
        })
        .collect()
}

/// `selftest_tma_roundtrip_{2..5}d` on boxes inside, across and past the tensor's edges, in
/// every swizzle mode (with the inner box row as wide as the swizzle span).
pub fn tma_roundtrip(device: &Device) -> Result<Check> {
    require_hopper(device, "selftest_tma_roundtrip_2d")?;
    let mut report = Report::new("tma_roundtrip");
    let mut rng = Rng::new(90);
    for (swizzle, inner) in [
        (Swizzle::None, 24),
        (Swizzle::B32, 16),
        (Swizzle::B64, 32),
        (Swizzle::B128, 64),
    ] {
        for (load, store) in [
            ([8, 4], [0, 0]),
            ([-5, -3], [72 - inner / 2, 37]),
            ([72 - inner / 2, 35], [-3, -6]),
        ] {
            let case = BoxCase {
                dims: vec![72, 40],
                box_dims: vec![inner as u32, 8],
                swizzle,
                load: load.to_vec(),
                store: store.to_vec(),
            };
            roundtrip_case::<u16>(device, &mut report, &mut rng, &case)?;
        }
    }
    let higher = [
        BoxCase {
            dims: vec![12, 5, 6],
            box_dims: vec![8, 3, 4],
            swizzle: Swizzle::B32,
            load: vec![-2, 3, 4],
            store: vec![6, -1, 3],
        },
        BoxCase {
            dims: vec![16, 3, 4, 5],
            box_dims: vec![8, 2, 3, 2],
            swizzle: Swizzle::None,
            load: vec![10, 2, -1, 4],
            store: vec![-4, 1, 2, 0],
        },
        BoxCase {
            dims: vec![20, 3, 2, 3, 4],
            box_dims: vec![16, 2, 2, 2, 3],
            swizzle: Swizzle::B32,
            load: vec![6, 2, 1, -1, 2],
            store: vec![0, 0, 0, 0, 0],
        },
    ];
    roundtrip_case::<u32>(device, &mut report, &mut rng, &higher[0])?;
    for case in &higher[1..] {
        roundtrip_case::<u16>(device, &mut report, &mut rng, case)?;
    }
    Ok(report.finish())
}

/// Elements the round trip moves: random bits, never all ones (the emulator's poison).
trait BoxElement: Element + PartialEq + std::fmt::Debug + Default {
    fn draw(rng: &mut Rng) -> Self;
}
impl BoxElement for u16 {
    fn draw(rng: &mut Rng) -> Self {
        (rng.next_u32() % 0xffff) as u16
    }
}
impl BoxElement for u32 {
    fn draw(rng: &mut Rng) -> Self {
        rng.next_u32() % 0xffff_ffff
    }
}

fn roundtrip_case<T: BoxElement>(device: &Device, report: &mut Report, rng: &mut Rng, case: &BoxCase) -> Result<()> {
    let rank = case.dims.len();
    let esize = size_of::<T>() as u64;
    let strides = padded_strides(&case.dims, esize);
    let len = reach_elements(&case.dims, &strides, esize);
    let src = rng.vec(len, T::draw);
    let dst_before = rng.vec(len, T::draw);
    let src_dev = device.upload(&src)?;
    let mut dst = device.upload(&dst_before)?;
    let coords: Vec<i32> = case.load.iter().chain(&case.store).copied().collect();
    let coords_dev = device.upload(&coords)?;
    let spec = TensorMapSpec {
        dims: &case.dims,
        strides: &strides,
        box_dims: &case.box_dims,
        swizzle: case.swizzle,
    };
    let loaded: Vec<T> = box_elements(case, &case.load, &strides, esize)
        .iter()
        .map(|at| at.map_or_else(T::default, |i| src[i]))
        .collect();
    let box_bytes = loaded.len() * esize as usize;
    let mut tile = device.alloc_zeros::<u8>(box_bytes)?;
    let kernel = [
        "selftest_tma_roundtrip_2d",
        "selftest_tma_roundtrip_3d",
        "selftest_tma_roundtrip_4d",
        "selftest_tma_roundtrip_5d",
    ][rank - 2];
    device.launch(
        kernel,
        LaunchConfig::linear(1, 64, box_bytes as u32 + 1024),
        KernelArgs::new(device)
            .tensor_map("src", &src_dev, &spec)
            .tensor_map_mut("dst", &mut dst, &spec)
            .input("coords", &coords_dev)
            .scalar(box_bytes as u32)
            .output("tile_out", &mut tile),
    )?;
    report.case(format!(
        "{rank}d {:?} box {:?} swizzle {:?} from {:?} to {:?}",
        case.dims, case.box_dims, case.swizzle, case.load, case.store
    ));
    let mut expected_tile = vec![0u8; box_bytes];
    for (e, value) in loaded.iter().enumerate() {
        let at = swizzled_offset(e * esize as usize, case.swizzle);
        expected_tile[at..at + esize as usize].copy_from_slice(bytemuck::bytes_of(value));
    }
    report.exact("shared tile", &device.download(&tile)?, &expected_tile);
    let mut expected_dst = dst_before;
    for (value, at) in loaded.iter().zip(box_elements(case, &case.store, &strides, esize)) {
        if let Some(i) = at {
            expected_dst[i] = *value;
        }
    }
    report.exact("stored tensor", &device.download(&dst)?, &expected_dst);
    Ok(())
}
