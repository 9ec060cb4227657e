//! The routing map: a stable counting sort of slots by expert on the device
//! (`kernels/dispatch.cu`, `kernels/include/dispatch_map.cuh`).
use super::{MAX_TOP_K, MapConfig, STATUS_LEN};
use crate::device::{KernelArgs, LaunchConfig};
use crate::ops::check_len;
use crate::{Device, DeviceBuffer, DeviceSlice, DeviceSliceMut, Error, Result};

/// Threads of every map kernel (`MAP_THREADS` in dispatch_map.cuh).
const MAP_THREADS: u32 = 256;
const MAP_WARPS: usize = MAP_THREADS as usize / 32;
/// Ints before the per-tile counts in the workspace (`MAP_WORKSPACE_HEADER`).
pub(super) const WORKSPACE_HEADER: usize = 8;
/// Tickets of a fused scoring kernel's token blocks in that header (`MAP_BLOCK_TICKETS`).
pub(crate) const BLOCK_TICKETS: usize = 4;
/// `SlotOrder` in dispatch_map.cuh.
const SOURCE_ORDER: i32 = 0;
const PRIORITY_ORDER: i32 = 1;

/// The routing map's buffers, all i32 on the device (lengths from [`MapConfig`]; L = local experts):
///
/// | field | length | holds |
/// |---|---|---|
/// | `counts` | L | slots kept per local expert |
/// | `offsets` | L + 1 | exclusive prefix of counts, each padded up to `align`; `offsets[L]` = rows in use |
/// | `sorted_rows` | `config.sorted_rows_len(T, k)` | per row its source slot `t·k + j`, by expert then slot; -1 for padding and after `offsets[L]` |
/// | `inverse` | T·k | the row of each slot; -1 if dropped, another rank's, or an invalid id |
/// | `status` | `STATUS_LEN` | `[STATUS_CAPACITY_DROPPED]`, `[STATUS_INVALID_IDS]` |
pub struct RoutingMap<B> {
    pub counts: B,
    pub offsets: B,
    pub sorted_rows: B,
    pub inverse: B,
    pub status: B,
}

impl RoutingMap<DeviceBuffer<i32>> {
    /// Zeroed buffers of the right lengths for `tokens` x `k` ids under `config`.
    /// `Err`, allocating nothing, for what [`routing_map`] would refuse: an invalid config or
    /// `k`, or more than 2^31 - 1 slots or rows.
    pub fn alloc(device: &Device, tokens: usize, k: usize, config: &MapConfig) -> Result<Self> {
        let (slots, sorted_len) = map_lengths(config, tokens, k)?;
        let local = config.local_count();
        Ok(Self {
            counts: device.alloc_zeros(local)?,
            offsets: device.alloc_zeros(local + 1)?,
            sorted_rows: device.alloc_zeros(sorted_len)?,
            inverse: device.alloc_zeros(slots)?,
            status: device.alloc_zeros(STATUS_LEN)?,
        })
    }
}

/// Builds the routing map of `ids` (`[tokens, k]`, i32) into `map`, on the device, without a
/// host sync. Launches: 1 when `config.tile_slots(T, k)` is `None` (single block), else 2, or 4
/// with capacity (a priority pass marks the kept slots first); plus one memset of `workspace`
/// (`config.workspace_len(T, k)` i32s; may be empty on the single-block path).
///
/// ```
/// use moe_kernels::Device;
/// use moe_kernels::ops::dispatch::{self, MapConfig, RoutingMap};
///
/// # fn main() -> moe_kernels::Result<()> {
/// let device = Device::emulator()?;
/// let (tokens, k) = (3, 2);
/// let config = MapConfig { align: 2, ..MapConfig::new(3) }; // 3 experts, groups padded to 2 rows
/// let ids = device.upload(&[2i32, 0, /**/ 0, 1, /**/ 2, 0])?; // slot t·k + j
/// let mut map = RoutingMap::alloc(&device, tokens, k, &config)?;
/// let mut workspace = device.alloc_zeros::<i32>(config.workspace_len(tokens, k)?)?;
/// dispatch::routing_map(&device, &ids, tokens, k, &config, &mut map, &mut workspace)?;
/// assert_eq!(device.download(&map.counts)?, [3, 1, 2]);
/// assert_eq!(device.download(&map.offsets)?, [0, 4, 6, 8]);
/// // Expert 0 gets slots 1, 2, 5 (then a padding row), expert 1 slot 3, expert 2 slots 0, 4.
/// let rows = device.download(&map.sorted_rows)?;
/// assert_eq!(rows[..8], [1, 2, 5, -1, 3, -1, 0, 4]);
/// assert_eq!(device.download(&map.inverse)?, [6, 0, 1, 4, 7, 2]);
/// # Ok(())
/// # }
/// ```
pub fn routing_map<B: DeviceSliceMut<i32>>(
    device: &Device,
    ids: &impl DeviceSlice<i32>,
    tokens: usize,
    k: usize,
    config: &MapConfig,
    map: &mut RoutingMap<B>,
    workspace: &mut impl DeviceSliceMut<i32>,
) -> Result<()> {
    let shape = Shape::checked(config, tokens, k, map)?;
    check_len("ids", ids, tokens * k, || format!("[T, k] = [{tokens}, {k}]"))?;
    let workspace_len = config.workspace_len(tokens, k)?;
    check_len("workspace", workspace, workspace_len, || {
        "[config.workspace_len(T, k)]".into()
    })?;
    let local = config.local_count();
    let buckets = local + 1;
    match config.tile_slots(tokens, k) {
        None => {
            let shared = ((MAP_WARPS + 1) * buckets + local) * size_of::<i32>();
            let args = KernelArgs::new(device)
                .input("ids", ids)
                .scalar(shape.tokens)
                .scalar(shape.k)
                .scalar(shape.num_experts)
                .scalar(shape.expert_begin)
                .scalar(shape.local)
                .scalar(shape.align)
                .scalar(shape.capacity)
                .scalar(shape.sorted_len)
                .output("counts", &mut map.counts)
                .output("offsets", &mut map.offsets)
                .output("sorted_rows", &mut map.sorted_rows)
                .output("inverse", &mut map.inverse)
                .output("status", &mut map.status);
            device.launch(
                "dispatch_map_small",
                LaunchConfig::linear(1, MAP_THREADS, shared as u32),
                args,
            )
        }
        Some(tile) => {
            device.fill_zeros(workspace)?;
            let tiles = crate::ops::grid_blocks("tokens", tokens * k, tile)?;
            let tiled = Tiled {
                shape,
                tile: tile as i32,
                tiles,
                buckets,
            };
            if shape.capacity >= 0 {
                tiled.count(device, ids, PRIORITY_ORDER, false, map, workspace)?;
                tiled.rank(device, ids, PRIORITY_ORDER, false, map, workspace)?;
            }
            let filter = shape.capacity >= 0;
            tiled.count(device, ids, SOURCE_ORDER, filter, map, workspace)?;
            tiled.rank(device, ids, SOURCE_ORDER, filter, map, workspace)
        }
    }
}

/// A routing map whose counting pass runs inside the kernel that writes the ids
/// ([`router::select_counted`](crate::ops::router::select_counted)); [`place_counted`] then ranks
/// and places the slots. The outputs are bit-for-bit those of [`routing_map`] with the same
/// config (the same stable order), in 2 launches counting the selection, where selection +
/// [`routing_map`] takes 3 past [`SMALL_MAP_MAX_SLOTS`](super::SMALL_MAP_MAX_SLOTS) slots. The map
/// is always tiled ([`MapConfig::counted_tile_slots`]). No capacity: its priority pass must see
/// every id before any slot is counted, so a config with capacity is refused (use
/// [`routing_map`]).
///
/// The workspace carries the per-tile counts from the count to the placement, which clears each
/// tile's as it reads them: a completed map leaves the workspace all zeros (its tickets reset
/// themselves), as does every [`routing_map`] and [`gate::route`](crate::ops::gate::route) at
/// decode. The count needs it zeroed: it clears it first (one memset) unless `zeroed` says it
/// already is.
pub struct CountedMap<'a, B, W> {
    pub config: &'a MapConfig,
    pub map: &'a mut RoutingMap<B>,
    /// `config.counted_workspace_len(T, k)` i32s: the per-tile counts, from the count to the placement.
    pub workspace: &'a mut W,
    /// The caller vouches that `workspace` is all zeros: fresh from `alloc_zeros`, or left so by
    /// a completed map (the count and the placement of every tile, or any `routing_map`) with no
    /// failed launch since. The count then skips its memset. A wrong claim gives a wrong map,
    /// whose writes stay inside its buffers.
    pub zeroed: bool,
}

impl<B: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>> CountedMap<'_, B, W> {
    /// Checks the map for `tokens` x `k` ids of `experts` experts, before a step launches
    /// anything.
    pub(crate) fn check(&self, experts: usize, tokens: usize, k: usize) -> Result<()> {
        self.checked(experts, tokens, k).map(|_| ())
    }

    /// Checks the map for `tokens` x `k` ids of `experts` experts and returns the kernels' shape.
    fn checked(&self, experts: usize, tokens: usize, k: usize) -> Result<Shape> {
        let config = self.config;
        if config.capacity.is_some() {
            return Err(Error::InvalidArgument {
                argument: "config.capacity",
                value: format!("{:?}", config.capacity),
                expected: "None: a counted map has no capacity pass (routing_map has one)".into(),
            });
        }
        if config.num_experts != experts {
            return Err(Error::InvalidArgument {
                argument: "config.num_experts",
                value: config.num_experts.to_string(),
                expected: format!("the router's E = {experts}"),
            });
        }
        let shape = Shape::checked(config, tokens, k, self.map)?;
        let workspace_len = config.counted_workspace_len(tokens, k)?;
        check_len("workspace", self.workspace, workspace_len, || {
            "[config.counted_workspace_len(T, k)]".into()
        })?;
        Ok(shape)
    }

    /// For the selection kernel: checks the map for `tokens` x `k` ids of `experts` experts,
    /// zeroes the workspace (unless `zeroed`) and appends the count's parameters to `args` (`map_workspace,
    /// tile_slots, expert_begin, local_experts, align, counts, offsets, status`), then those of
    /// `params`. Returns them with the dynamic shared bytes the count (and the placement) needs.
    pub(crate) fn count_args<'k>(
        &'k mut self,
        device: &Device,
        experts: usize,
        tokens: usize,
        k: usize,
        args: KernelArgs<'k>,
        params: MapParams,
    ) -> Result<(KernelArgs<'k>, u32)> {
        let shape = self.checked(experts, tokens, k)?;
        if !self.zeroed {
            device.fill_zeros(self.workspace)?;
        }
        let map = &mut *self.map;
        let args = args
            .output("map_workspace", &mut *self.workspace)
            .scalar(self.config.counted_tile_slots() as i32)
            .scalar(shape.expert_begin)
            .scalar(shape.local)
            .scalar(shape.align)
            .output("counts", &mut map.counts)
            .output("offsets", &mut map.offsets)
            .output("status", &mut map.status);
        let count_shared = (shape.local + 1) as usize * size_of::<i32>();
        Ok(match params {
            MapParams::CountThenPlacement { place: true } => {
                let args = args
                    .scalar(shape.sorted_len)
                    .output("sorted_rows", &mut map.sorted_rows)
                    .output("inverse", &mut map.inverse);
                (args, (MAP_WARPS * count_shared) as u32)
            }
            MapParams::CountThenPlacement { place: false } => {
                (args.scalar(0i32).scalar(0u64).scalar(0u64), count_shared as u32)
            }
            MapParams::Count | MapParams::CountOrNull => (args, count_shared as u32),
        })
    }
}

/// The map parameters of a selection kernel, after its `nonfinite_rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapParams {
    /// The count's, only with a map (`router_select_counted_e<N>_f32`; `router_select_e<N>_f32`
    /// has none).
    Count,
    /// The count's, or null pointers and zeros without a map (`gate_route_<form>_<dtype>_e<N>`).
    CountOrNull,
    /// The count's (a map is required), then the placement's: `sorted_len, sorted_rows, inverse`,
    /// or with `place` false 0 and null pointers (`gate_decode_route_linear_<dtype>_e<N>`).
    CountThenPlacement { place: bool },
}

/// The count's parameters (in [`CountedMap::count_args`]'s order) of a kernel whose count is
/// optional, for no count: null pointers and zeros, a null `map_workspace` saying so.
pub(crate) fn no_count_args(args: KernelArgs<'_>) -> KernelArgs<'_> {
    let args = args.scalar(0u64); // map_workspace
    let args = (0..4).fold(args, |args, _| args.scalar(0i32)); // tile_slots, expert_begin, local_experts, align
    (0..3).fold(args, |args, _| args.scalar(0u64)) // counts, offsets, status
}

/// Completes a [`CountedMap`] whose count ran with these `ids` (`[tokens, k]`): ranks and places
/// every slot, clearing the per-tile counts it reads (the workspace is left zeroed: the next count
/// may set `zeroed`). One launch, no host sync. Called after another count (other ids or shapes),
/// or none, or a second time after one count, the map is wrong but every write stays inside its
/// buffers.
pub fn place_counted<B: DeviceSliceMut<i32>, W: DeviceSliceMut<i32>>(
    device: &Device,
    ids: &impl DeviceSlice<i32>,
    tokens: usize,
    k: usize,
    counted: &mut CountedMap<'_, B, W>,
) -> Result<()> {
    let shape = counted.checked(counted.config.num_experts, tokens, k)?;
    check_len("ids", ids, tokens * k, || format!("[T, k] = [{tokens}, {k}]"))?;
    let tile = counted.config.counted_tile_slots();
    let tiled = Tiled {
        shape,
        tile: tile as i32,
        tiles: crate::ops::grid_blocks("tokens", tokens * k, tile)?,
        buckets: counted.config.local_count() + 1,
    };
    tiled.rank(device, ids, SOURCE_ORDER, false, counted.map, counted.workspace)
}

/// The rows of a contiguous `[tokens, ·]` operand that were routed somewhere: `rows[t] = t`, or
/// -1 when token t was routed nowhere (its ids are
/// [`NO_EXPERT`](crate::ops::router::NO_EXPERT): a non-finite row). Passed as the
/// `sorted_rows` of a GEMM over all tokens with `ARows::Gathered { top_k: 1 }` (the shared
/// experts), it makes such tokens padding, so they add nothing to a weight gradient.
/// `ids: [T, k]`, `rows: [T]`. One launch, no host sync.
pub fn live_rows(
    device: &Device,
    ids: &impl DeviceSlice<i32>,
    tokens: usize,
    k: usize,
    rows: &mut impl DeviceSliceMut<i32>,
) -> Result<()> {
    crate::ops::check_range("k", k, 1..=MAX_TOP_K)?;
    let slots = crate::ops::elements("ids", tokens, k)?;
    crate::ops::check_range("tokens", slots, 0..=i32::MAX as usize)?;
    check_len("ids", ids, slots, || format!("[T, k] = [{tokens}, {k}]"))?;
    check_len("rows", rows, tokens, || format!("[T] = [{tokens}]"))?;
    if tokens == 0 {
        return Ok(());
    }
    const THREADS: usize = 256;
    let blocks = crate::ops::grid_blocks("tokens", tokens, THREADS)?.min(4096);
    // SAFETY: dispatch_live_rows(ids, tokens, k, rows) in kernels/dispatch.cu.
    let args = KernelArgs::new(device)
        .input("ids", ids)
        .scalar(tokens as i32)
        .scalar(k as i32)
        .output("rows", rows);
    device.launch(
        "dispatch_live_rows",
        LaunchConfig::linear(blocks, THREADS as u32, 0),
        args,
    )
}

/// `(T·k, config.sorted_rows_len(T, k))` after checking `config` and `k`, and that both counts
/// fit the kernels' i32 indices.
fn map_lengths(config: &MapConfig, tokens: usize, k: usize) -> Result<(usize, usize)> {
    config.validate()?;
    crate::ops::check_range("k", k, 1..=MAX_TOP_K.min(config.num_experts))?;
    let slots = crate::ops::elements("ids", tokens, k)?;
    let sorted_len = config.sorted_rows_len(tokens, k)?;
    if slots > i32::MAX as usize || sorted_len > i32::MAX as usize {
        return Err(Error::InvalidArgument {
            argument: "tokens",
            value: tokens.to_string(),
            expected: format!("T·k and the padded row count below 2^31 (k = {k})"),
        });
    }
    Ok((slots, sorted_len))
}

/// The kernels' view of the problem (their scalar parameters).
#[derive(Clone, Copy)]
struct Shape {
    tokens: i32,
    k: i32,
    num_experts: i32,
    expert_begin: i32,
    local: i32,
    align: i32,
    /// -1: no capacity.
    capacity: i32,
    sorted_len: i32,
}

impl Shape {
    /// Checks `config`, `k` and the lengths of `map`'s buffers for `tokens` x `k` slots.
    fn checked<B: DeviceSlice<i32>>(config: &MapConfig, tokens: usize, k: usize, map: &RoutingMap<B>) -> Result<Self> {
        let (slots, sorted_len) = map_lengths(config, tokens, k)?;
        let local = config.local_count();
        check_len("counts", &map.counts, local, || format!("[L] = [{local}]"))?;
        check_len("offsets", &map.offsets, local + 1, || {
            format!("[L + 1] = [{}]", local + 1)
        })?;
        check_len("sorted_rows", &map.sorted_rows, sorted_len, || {
            "[config.sorted_rows_len(T, k)]".into()
        })?;
        check_len("inverse", &map.inverse, slots, || format!("[T·k] = [{slots}]"))?;
        check_len("status", &map.status, STATUS_LEN, || format!("[{STATUS_LEN}]"))?;
        Ok(Self {
            tokens: tokens as i32,
            k: k as i32,
            num_experts: config.num_experts as i32,
            expert_begin: config.local_range().start as i32,
            local: local as i32,
            align: config.align as i32,
            capacity: config.capacity_per_expert(tokens, k).map_or(-1, |c| c as i32),
            sorted_len: sorted_len as i32,
        })
    }
}

/// One pass of the tiled path: `dispatch_map_count` then `dispatch_map_rank` in one slot order.
struct Tiled {
    shape: Shape,
    tile: i32,
    tiles: u32,
    buckets: usize,
}

impl Tiled {
    fn config(&self, shared_ints: usize) -> LaunchConfig {
        LaunchConfig::linear(self.tiles, MAP_THREADS, (shared_ints * size_of::<i32>()) as u32)
    }

    /// `filter`: skip the slots the priority pass dropped (their flag in `inverse`).
    fn count<B: DeviceSliceMut<i32>>(
        &self,
        device: &Device,
        ids: &impl DeviceSlice<i32>,
        order: i32,
        filter: bool,
        map: &mut RoutingMap<B>,
        workspace: &mut impl DeviceSliceMut<i32>,
    ) -> Result<()> {
        let s = self.shape;
        let args = KernelArgs::new(device)
            .input("ids", ids)
            .scalar(s.tokens)
            .scalar(s.k)
            .scalar(s.num_experts)
            .scalar(s.expert_begin)
            .scalar(s.local)
            .scalar(s.align)
            .scalar(s.capacity)
            .scalar(order)
            .scalar(self.tile)
            .input_or_null("inverse", filter.then_some(&map.inverse))
            .output("workspace", workspace)
            .output("counts", &mut map.counts)
            .output("offsets", &mut map.offsets)
            .output("status", &mut map.status);
        device.launch("dispatch_map_count", self.config(self.buckets), args)
    }

    fn rank<B: DeviceSliceMut<i32>>(
        &self,
        device: &Device,
        ids: &impl DeviceSlice<i32>,
        order: i32,
        filter: bool,
        map: &mut RoutingMap<B>,
        workspace: &mut impl DeviceSliceMut<i32>,
    ) -> Result<()> {
        let s = self.shape;
        let args = KernelArgs::new(device)
            .input("ids", ids)
            .scalar(s.tokens)
            .scalar(s.k)
            .scalar(s.num_experts)
            .scalar(s.expert_begin)
            .scalar(s.local)
            .scalar(s.capacity)
            .scalar(order)
            .scalar(self.tile)
            .scalar(filter as i32)
            .scalar(s.sorted_len)
            .output("workspace", workspace)
            .input("counts", &map.counts)
            .input("offsets", &map.offsets)
            .output("sorted_rows", &mut map.sorted_rows)
            .output("inverse", &mut map.inverse);
        device.launch("dispatch_map_rank", self.config(MAP_WARPS * self.buckets), args)
    }
}
