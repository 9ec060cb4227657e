//! A bad emulator setting in the environment reaches the caller of `Device::emulator()` and
//! `Device::best()` as the error naming it, not as a generic "no device". Its own test binary,
//! with one test, because it sets environment variables (no other thread reads them here).
use moe_kernels::{Device, DeviceKind, Error};

/// Runs `check` with `name=value` set, then removes it.
fn with_env(name: &str, value: &str, check: impl FnOnce()) {
    // SAFETY: this binary's only test runs on one thread; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var(name, value) };
    check();
    // SAFETY: as above.
    unsafe { std::env::remove_var(name) };
}

fn assert_names(error: &Error, name: &str, value: &str) {
    let text = error.to_string();
    assert!(
        text.contains(&format!("{name}={value}")),
        "{name}={value} not in: {text}"
    );
}

#[test]
fn bad_emulator_settings_are_reported_by_emulator_and_best() {
    for (name, value) in [
        ("MOE_EMU_WORKERS", "abc"),
        ("MOE_EMU_WORKERS", "0"),
        ("MOE_EMU_SCHEDULE", "bogus"),
        ("MOE_EMU_SEED", "-1"),
        ("MOE_EMU_STACK_KIB", "lots"),
    ] {
        with_env(name, value, || {
            let emulator = Device::emulator().expect_err("a bad setting must be refused");
            assert!(matches!(emulator, Error::Environment { .. }), "{emulator:?}");
            assert_names(&emulator, name, value);
            match Device::best() {
                // With a usable GPU, best() never consults the emulator's settings.
                Ok(device) => assert_eq!(device.kind(), DeviceKind::Cuda),
                Err(best) => {
                    let Error::NoDevice { emulator, cuda } = &best else {
                        panic!("expected NoDevice with both causes, got {best:?}");
                    };
                    assert_names(emulator, name, value);
                    assert!(!cuda.to_string().is_empty());
                    assert_names(&best, name, value);
                }
            }
        });
    }
    Device::emulator().expect("valid again once the variables are gone");
}
