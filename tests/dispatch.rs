//! Dispatch (math §4) on every device against the CPU reference: routing maps exactly
//! (both map paths, the counted map, capacity, padding, local ranges, invalid ids), permute / combine and their
//! backward passes within math §9 tolerances, determinism, launch counts, no host syncs, bad
//! inputs, and 64-bit row offsets.
#[path = "dispatch/bad_inputs.rs"]
mod bad_inputs;
mod common;
#[path = "dispatch/counted.rs"]
mod counted;
#[path = "dispatch/map.rs"]
mod map;
#[path = "dispatch/memory.rs"]
mod memory;
#[path = "dispatch/offsets_64bit.rs"]
mod offsets_64bit;
#[path = "dispatch/rows.rs"]
mod rows;
#[path = "dispatch/unaligned.rs"]
mod unaligned;

use common::{Rng, devices};
use moe_kernels::ops::dispatch::{self, MapConfig, RoutingMap};
use moe_kernels::reference::dispatch as reference;
use moe_kernels::{Device, DeviceBuffer};

/// The map the device builds, downloaded, after checking that building it took the documented
/// number of launches (1 single-block, 2 tiled, 4 tiled with capacity), never synced the host,
/// and left its workspace zeroed (each placement clears the tile counts it reads), as a counted
/// map's next count may assume (`CountedMap::zeroed`).
fn device_map(device: &Device, ids: &[i32], tokens: usize, k: usize, config: &MapConfig) -> reference::RoutingMap {
    let ids_d = device.upload(ids).unwrap();
    let mut map = RoutingMap::alloc(device, tokens, k, config).unwrap();
    let mut workspace = device
        .alloc_zeros::<i32>(config.workspace_len(tokens, k).unwrap())
        .unwrap();
    let before = device.stats();
    dispatch::routing_map(device, &ids_d, tokens, k, config, &mut map, &mut workspace).unwrap();
    let after = device.stats();
    assert_eq!(after.host_syncs, before.host_syncs, "routing_map synced the host");
    let expected_launches = match (config.tile_slots(tokens, k), config.capacity) {
        (None, _) => 1,
        (Some(_), None) => 2,
        (Some(_), Some(_)) => 4,
    };
    assert_eq!(
        after.launches - before.launches,
        expected_launches,
        "launches of routing_map"
    );
    let workspace = device.download(&workspace).unwrap();
    assert!(
        workspace.iter().all(|&v| v == 0),
        "the workspace after routing_map: {workspace:?}"
    );
    download_map(device, &map)
}

/// A map on the device, downloaded.
fn download_map(device: &Device, map: &RoutingMap<DeviceBuffer<i32>>) -> reference::RoutingMap {
    let status = device.download(&map.status).unwrap();
    reference::RoutingMap {
        counts: device.download(&map.counts).unwrap(),
        offsets: device.download(&map.offsets).unwrap(),
        sorted_rows: device.download(&map.sorted_rows).unwrap(),
        inverse: device.download(&map.inverse).unwrap(),
        status: [status[0], status[1]],
    }
}

#[track_caller]
fn check_map(device: &Device, ids: &[i32], tokens: usize, k: usize, config: &MapConfig) -> reference::RoutingMap {
    let got = device_map(device, ids, tokens, k, config);
    let want = reference::routing_map(ids, tokens, k, config);
    assert_eq!(got, want, "{} T={tokens} k={k} {config:?}", device.description());
    got
}

/// Distinct experts per token (what a router produces), uniformly random.
fn random_ids(rng: &mut Rng, tokens: usize, k: usize, experts: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut row: Vec<i32> = vec![];
        while row.len() < k {
            let e = rng.below(experts) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids.extend(row);
    }
    ids
}

/// The device, and on the emulator the same device under a shuffled schedule too.
fn with_shuffled_schedule(device: &Device) -> Vec<Device> {
    let mut variants = vec![device.clone()];
    #[cfg(feature = "emulator")]
    if let Device::Emulator(emu) = device {
        use moe_kernels::device::Schedule;
        variants.push(Device::Emulator(emu.with_schedule(Schedule::Random { seed: 99 })));
    }
    variants
}

#[test]
fn every_device_is_tested() {
    assert!(!devices().is_empty(), "no device to run the dispatch tests on");
}
