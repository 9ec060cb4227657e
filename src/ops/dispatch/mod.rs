//! Dispatch (math §4): from the router's ids `[T, k]` to rows grouped by expert, and back.
//!
//! - [`routing_map`]: `counts`, `offsets`, `sorted_rows`, `inverse` and two device counters
//!   ([`RoutingMap`]), with optional per-expert padding, capacity and a local expert range;
//! - the same map in one launch fewer, its counting pass fused into the router's selection
//!   ([`CountedMap`]: `router::select_counted`, then [`place_counted`]);
//! - [`permute`] (gather) and [`combine`] (weighted, deterministic un-permute), and their
//!   backward passes [`permute_backward`] and [`combine_backward`].
//!
//! Nothing here waits for the device and every output has a size the host knows from `T`, `k`
//! and the [`MapConfig`] (`*_len` helpers), so a whole forward and backward pass can be captured
//! in a CUDA graph.
//!
//! **Out-of-range ids.** Ids live on the device, so an op cannot reject them without a host
//! sync. An id outside `[0, E)` is treated as dropped: its slot gets `inverse = -1`, it is laid
//! out nowhere, and, unless it is [`NO_EXPERT`](crate::ops::router::NO_EXPERT) (the router's
//! id for a non-finite row, routed nowhere on purpose), it is counted in
//! `status[STATUS_INVALID_IDS]`. No kernel ever indexes with it. [`combine`] gives a NaN output
//! row for a token with a slot not laid out whose weight is NaN (the router's mark of a
//! non-finite row); other slots not laid out add nothing.
//! Likewise the row movers treat `sorted_rows` / `inverse` entries outside their valid range as
//! `-1` (padding or dropped), so no launch reads or writes out of bounds whatever they hold.
//!
//! **Alignment.** Every buffer may be a view at any element: the row movers use 16-byte
//! accesses only when d is a multiple of 16 bytes and every row operand starts 16-byte aligned,
//! else they move one element at a time; the map's buffers are i32 accessed one at a time.
mod map;
mod rows;

pub(crate) use map::{BLOCK_TICKETS, MapParams, no_count_args};
pub use map::{CountedMap, RoutingMap, live_rows, place_counted, routing_map};
pub use rows::{combine, combine_backward, permute, permute_backward};

use crate::{Error, Result};
use std::ops::Range;

/// The largest expert count E.
pub const MAX_EXPERTS: usize = 1024;
/// The largest k (experts per token).
pub const MAX_TOP_K: usize = 32;
/// The largest group alignment.
pub const MAX_ALIGN: usize = 1024;
/// [`MapPath::Auto`] builds maps of at most this many slots (`T·k`) in one single-block launch.
pub const SMALL_MAP_MAX_SLOTS: usize = 4096;
/// Slots per block of the tiled path under [`MapPath::Auto`].
pub const DEFAULT_TILE_SLOTS: usize = 4096;
/// Slots per tile must be a multiple of this (the map kernels' block size).
pub const TILE_SLOTS_MULTIPLE: usize = 256;
/// The largest tile.
pub const MAX_TILE_SLOTS: usize = 1 << 20;
/// Index in `status` of the number of slots dropped by capacity.
pub const STATUS_CAPACITY_DROPPED: usize = 0;
/// Index in `status` of the number of ids outside `[0, E)`, not counting
/// [`NO_EXPERT`](crate::ops::router::NO_EXPERT).
pub const STATUS_INVALID_IDS: usize = 1;
/// Length of the `status` buffer.
pub const STATUS_LEN: usize = 2;

/// Expert capacity (Switch Transformer): each expert keeps at most
/// `C = max(ceil(factor · T·k / E), min_capacity)` slots. Priority: every first choice
/// (`j = 0`) before any second choice, and so on; within one choice rank, lower token first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Capacity {
    /// A finite factor >= 0 (1.0 by default: room for a perfectly balanced load).
    pub factor: f64,
    pub min_capacity: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            factor: 1.0,
            min_capacity: 0,
        }
    }
}

impl Capacity {
    pub fn validate(&self) -> Result<()> {
        if self.factor.is_finite() && self.factor >= 0.0 {
            return Ok(());
        }
        Err(Error::InvalidArgument {
            argument: "capacity.factor",
            value: self.factor.to_string(),
            expected: "a finite factor >= 0".into(),
        })
    }

    /// `C` for `tokens · k` slots over `num_experts` experts (E counts every expert, local or
    /// not), at most `T·k` (no expert can hold more).
    pub fn slots_per_expert(&self, tokens: usize, k: usize, num_experts: usize) -> usize {
        let slots = tokens.saturating_mul(k);
        let scaled = (self.factor * slots as f64 / num_experts as f64).ceil();
        // `as` saturates: a huge factor means "no limit", which T·k expresses.
        (scaled as usize).max(self.min_capacity).min(slots)
    }
}

/// Which map kernels run. `Auto` is right outside tests and benches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MapPath {
    /// One block when `T·k <= SMALL_MAP_MAX_SLOTS`, else tiles of `DEFAULT_TILE_SLOTS`.
    #[default]
    Auto,
    /// The whole map in one block: 1 launch.
    SingleBlock,
    /// Tiles of `tile_slots` slots (a multiple of `TILE_SLOTS_MULTIPLE`): 2 launches, 4 with capacity.
    Tiled { tile_slots: usize },
}

/// How ids become a routing map. The default has no experts: set `num_experts` (or use
/// [`MapConfig::new`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MapConfig {
    /// E: ids in `[0, E)` are experts (1..=`MAX_EXPERTS`).
    pub num_experts: usize,
    /// The experts dispatched here, `[e_begin, e_end)` (expert parallelism); `None`: all E.
    /// Other experts' slots are skipped (inverse -1, no rows, no padding, not counted as dropped);
    /// `counts` and `offsets` cover local experts only, local expert `e_begin + i` at index `i`.
    pub local_experts: Option<Range<usize>>,
    /// Each group is padded with `-1` rows up to a multiple of `align` (1 = no padding; at most
    /// `MAX_ALIGN`). An empty group stays empty.
    pub align: usize,
    pub capacity: Option<Capacity>,
    pub path: MapPath,
}

impl Default for MapConfig {
    fn default() -> Self {
        Self {
            num_experts: 0,
            local_experts: None,
            align: 1,
            capacity: None,
            path: MapPath::Auto,
        }
    }
}

impl MapConfig {
    /// All of `num_experts` experts, no padding, no capacity.
    pub fn new(num_experts: usize) -> Self {
        Self {
            num_experts,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        super::check_range("num_experts", self.num_experts, 1..=MAX_EXPERTS)?;
        super::check_range("align", self.align, 1..=MAX_ALIGN)?;
        let range = self.local_range();
        if range.start >= range.end || range.end > self.num_experts {
            return Err(Error::InvalidArgument {
                argument: "local_experts",
                value: format!("{range:?}"),
                expected: format!("a non-empty range within 0..{}", self.num_experts),
            });
        }
        if let Some(capacity) = &self.capacity {
            capacity.validate()?;
        }
        let tile = match self.path {
            MapPath::Tiled { tile_slots } => tile_slots,
            _ => TILE_SLOTS_MULTIPLE,
        };
        if tile == 0 || tile % TILE_SLOTS_MULTIPLE != 0 || tile > MAX_TILE_SLOTS {
            return Err(Error::InvalidArgument {
                argument: "path.tile_slots",
                value: tile.to_string(),
                expected: format!("a multiple of {TILE_SLOTS_MULTIPLE} up to {MAX_TILE_SLOTS}"),
            });
        }
        Ok(())
    }

    /// `[e_begin, e_end)`.
    pub fn local_range(&self) -> Range<usize> {
        self.local_experts.clone().unwrap_or(0..self.num_experts)
    }

    /// L = e_end - e_begin: the length of `counts` (and `offsets` is L + 1).
    pub fn local_count(&self) -> usize {
        self.local_range().len()
    }

    /// `C`, when capacity is on.
    pub fn capacity_per_expert(&self, tokens: usize, k: usize) -> Option<usize> {
        self.capacity.map(|c| c.slots_per_expert(tokens, k, self.num_experts))
    }

    /// The length of `sorted_rows` (and of the permuted rows): the most rows any ids can
    /// produce, `min(T·k, L·C) + L·(align − 1)`. Rows after `offsets[L]` hold -1. `Err` for a
    /// config [`validate`](Self::validate) refuses or a count that overflows `usize`.
    pub fn sorted_rows_len(&self, tokens: usize, k: usize) -> Result<usize> {
        self.validate()?;
        let local = self.local_count();
        let slots = super::elements("tokens", tokens, k)?;
        let kept = self
            .capacity_per_expert(tokens, k)
            .map_or(slots, |c| slots.min(local.saturating_mul(c)));
        // align <= MAX_ALIGN and L <= MAX_EXPERTS (validated), so the padding is small.
        kept.checked_add(local * (self.align - 1))
            .ok_or_else(|| Error::InvalidArgument {
                argument: "tokens",
                value: tokens.to_string(),
                expected: format!("a padded row count that fits in usize (k = {k})"),
            })
    }

    /// The tile size of the tiled path, or `None` for the single-block path.
    pub fn tile_slots(&self, tokens: usize, k: usize) -> Option<usize> {
        match self.path {
            MapPath::Auto if tokens.saturating_mul(k) <= SMALL_MAP_MAX_SLOTS => None,
            MapPath::Auto => Some(DEFAULT_TILE_SLOTS),
            MapPath::SingleBlock => None,
            MapPath::Tiled { tile_slots } => Some(tile_slots),
        }
    }

    /// The i32 workspace [`routing_map`] needs (0 on the single-block path); `Err` for a config
    /// [`validate`](Self::validate) refuses.
    pub fn workspace_len(&self, tokens: usize, k: usize) -> Result<usize> {
        self.validate()?;
        self.tile_slots(tokens, k)
            .map_or(Ok(0), |tile| self.tiled_workspace_len(tile, tokens, k))
    }

    /// The tile size of a counted map ([`CountedMap`]), which is always tiled: `tile_slots` under
    /// [`MapPath::Tiled`], else [`DEFAULT_TILE_SLOTS`].
    pub fn counted_tile_slots(&self) -> usize {
        match self.path {
            MapPath::Tiled { tile_slots } => tile_slots,
            MapPath::Auto | MapPath::SingleBlock => DEFAULT_TILE_SLOTS,
        }
    }

    /// The i32 workspace a [`CountedMap`] needs; `Err` for a config [`validate`](Self::validate)
    /// refuses.
    pub fn counted_workspace_len(&self, tokens: usize, k: usize) -> Result<usize> {
        self.validate()?;
        self.tiled_workspace_len(self.counted_tile_slots(), tokens, k)
    }

    /// Per tile of `tile` (> 0, validated) slots, L + 1 counts, after the header.
    fn tiled_workspace_len(&self, tile: usize, tokens: usize, k: usize) -> Result<usize> {
        let tiles = super::elements("tokens", tokens, k)?.div_ceil(tile).max(1);
        let counts = super::elements("tokens", tiles, self.local_count() + 1)?;
        counts
            .checked_add(map::WORKSPACE_HEADER)
            .ok_or_else(|| Error::InvalidArgument {
                argument: "tokens",
                value: tokens.to_string(),
                expected: "a workspace length that fits in usize".into(),
            })
    }
}
