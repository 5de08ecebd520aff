//! A peer announcing a huge frame makes the readers fail before they allocate for it: this binary
//! counts the largest single allocation while each reader meets a 4 GiB length field.
//!
//! One test function only: the allocator's record is process-wide.

use gatevm_abi::{read_frame, GuestMsg, ProtoError, MAX_FRAME_LEN};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Recording;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; it only records sizes.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::SeqCst);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::SeqCst);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Recording = Recording;

/// A 4 GiB length field followed by a little of a body.
fn huge_header() -> Vec<u8> {
    let mut v = u32::MAX.to_be_bytes().to_vec();
    v.extend_from_slice(&[0, 0, 0, 1, 0x11, 1, 2, 3]);
    v
}

/// Runs `f`, returning the largest allocation it (or anything at the same time) asked for.
fn largest_during(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::SeqCst);
    f();
    LARGEST.load(Ordering::SeqCst)
}

#[test]
fn huge_length_fields_are_refused_before_allocating() {
    let input = huge_header();
    let limit = 2 * MAX_FRAME_LEN;

    let largest = largest_during(|| {
        let r = read_frame::<GuestMsg, _>(&mut &input[..]);
        assert!(matches!(r, Err(ProtoError::TooLarge(_))), "{r:?}");
    });
    assert!(largest < limit, "sync reader allocated {largest} bytes");

    #[cfg(feature = "tokio")]
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let largest = largest_during(|| {
            let r = rt.block_on(gatevm_abi::asyncio::read_frame::<GuestMsg, _>(
                &mut &input[..],
            ));
            assert!(matches!(r, Err(ProtoError::TooLarge(_))), "{r:?}");
        });
        assert!(largest < limit, "async reader allocated {largest} bytes");
        let largest = largest_during(|| {
            let mut reader = gatevm_abi::asyncio::FrameReader::new(&input[..]);
            let r = rt.block_on(reader.read_frame::<GuestMsg>());
            assert!(matches!(r, Err(ProtoError::TooLarge(_))), "{r:?}");
        });
        assert!(largest < limit, "FrameReader allocated {largest} bytes");
    }

    // The largest frame that is allowed does get read (the bound is not just "allocate nothing").
    let mut ok = ((MAX_FRAME_LEN) as u32).to_be_bytes().to_vec();
    ok.extend_from_slice(&[0, 0, 0, 1, 0x11]);
    ok.resize(4 + MAX_FRAME_LEN, 7);
    let r = read_frame::<GuestMsg, _>(&mut &ok[..]);
    assert!(matches!(r, Ok(Some(_))), "{r:?}");
}
