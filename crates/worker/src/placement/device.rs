//! GPU memory, as the NVIDIA driver's management library (NVML, `libnvidia-ml.so.1`)
//! reports it: the memory in use on every GPU, summed. A load on CUDA is measured as that
//! sum's growth across it (loads run one at a time; another process using the same GPUs
//! meanwhile would count too). Without the driver (no GPU) there is nothing to measure.

#![allow(unsafe_code)]

use std::ffi::c_void;

type Init = unsafe extern "C" fn() -> i32;
type Count = unsafe extern "C" fn(*mut u32) -> i32;
type Handle = unsafe extern "C" fn(u32, *mut *mut c_void) -> i32;
type MemoryInfo = unsafe extern "C" fn(*mut c_void, *mut Memory) -> i32;

/// `nvmlMemory_t`.
#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

pub struct Nvml {
    lib: libloading::Library,
}

impl Nvml {
    /// The driver's library, initialised; None where there is no NVIDIA driver.
    pub fn open() -> Option<Self> {
        // SAFETY: loading the driver's library runs its initialisers, which have no
        // preconditions; nvmlInit_v2 takes no arguments.
        unsafe {
            let lib = libloading::Library::new("libnvidia-ml.so.1").ok()?;
            let init = lib.get::<Init>(b"nvmlInit_v2\0").ok()?;
            (init() == 0).then_some(Self { lib })
        }
    }

    /// Bytes in use on every GPU, summed; None if the driver cannot say.
    pub fn used(&self) -> Option<u64> {
        // SAFETY: the signatures are NVML's (nvml.h); every pointer passed is to a live
        // local of the type the function writes.
        unsafe {
            let count = self.lib.get::<Count>(b"nvmlDeviceGetCount_v2\0").ok()?;
            let handle = self
                .lib
                .get::<Handle>(b"nvmlDeviceGetHandleByIndex_v2\0")
                .ok()?;
            let memory = self
                .lib
                .get::<MemoryInfo>(b"nvmlDeviceGetMemoryInfo\0")
                .ok()?;
            let mut n = 0u32;
            if count(&mut n) != 0 {
                return None;
            }
            let mut used = 0u64;
            for i in 0..n {
                let mut device = std::ptr::null_mut();
                let mut info = Memory::default();
                if handle(i, &mut device) != 0 || memory(device, &mut info) != 0 {
                    return None;
                }
                used += info.used;
            }
            Some(used)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_driver_there_is_nothing_to_measure() {
        // This machine has no NVIDIA driver; on one that has, the sum is a number.
        match super::Nvml::open() {
            None => {}
            Some(nvml) => assert!(nvml.used().is_some()),
        }
    }
}
