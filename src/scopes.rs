//! Error scopes closed by calls that cannot wait for them.
//!
//! A synchronous call (creating a buffer, writing through the queue, building a
//! pipeline, recording) runs inside an out-of-memory and a validation scope. Off the
//! web it waits for both and returns what they caught. In a browser nothing may
//! block: the scopes are popped at once (which closes them; only the verdict comes
//! later), and the first error they report is kept for the device and returned by
//! the next call of a context on it that checks the device
//! ([`crate::GpuContext::check_device`], which every host call does first).

use crate::Error;

/// Pops the validation scope, then the out-of-memory scope (pushed in the other
/// order around work labelled `context`), and returns `(validation, out of memory)`.
/// Off the web: waits for both. On the web: returns `(None, None)`; what the scopes
/// catch is kept for [`take_deferred`].
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn pop(
    _device: &wgpu::Device,
    _context: &'static str,
    oom: wgpu::ErrorScopeGuard,
    invalid: wgpu::ErrorScopeGuard,
) -> (Option<wgpu::Error>, Option<wgpu::Error>) {
    let invalid = pollster::block_on(invalid.pop());
    let oom = pollster::block_on(oom.pop());
    (invalid, oom)
}

#[cfg(target_arch = "wasm32")]
pub(crate) fn pop(
    device: &wgpu::Device,
    context: &'static str,
    oom: wgpu::ErrorScopeGuard,
    invalid: wgpu::ErrorScopeGuard,
) -> (Option<wgpu::Error>, Option<wgpu::Error>) {
    let (invalid, oom) = (invalid.pop(), oom.pop());
    let device = device.clone();
    wasm_bindgen_futures::spawn_local(async move {
        let (invalid, oom) = (invalid.await, oom.await);
        if let Some(e) = to_error(context, invalid, oom) {
            web::keep(device, e);
        }
    });
    (None, None)
}

/// Pops both scopes at once and waits for their verdicts without blocking:
/// `(validation, out of memory)`.
pub(crate) async fn pop_async(
    oom: wgpu::ErrorScopeGuard,
    invalid: wgpu::ErrorScopeGuard,
) -> (Option<wgpu::Error>, Option<wgpu::Error>) {
    let (invalid, oom) = (invalid.pop(), oom.pop());
    (invalid.await, oom.await)
}

/// The crate's error for what the scopes of work labelled `context` caught: running
/// out of memory first, as [`crate::GpuContext`]'s guarded calls report it.
pub(crate) fn to_error(
    context: &'static str,
    invalid: Option<wgpu::Error>,
    oom: Option<wgpu::Error>,
) -> Option<Error> {
    if let Some(e) = oom {
        return Some(Error::OutOfMemory {
            context,
            message: e.to_string(),
        });
    }
    invalid.map(|e| Error::Gpu {
        context,
        message: e.to_string(),
    })
}

/// The error a synchronous call on `device` caught since the last call that took it
/// (web only; elsewhere calls return their own errors and this is always `None`).
pub(crate) fn take_deferred(device: &wgpu::Device) -> Option<Error> {
    #[cfg(target_arch = "wasm32")]
    return web::take(device);
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = device;
        None
    }
}

/// Lets the verdicts of scopes popped by synchronous calls arrive: on the web, one
/// turn of the browser's microtask queue (their tasks are woken in the order the
/// scopes were popped, before a scope popped later); elsewhere nothing to wait for.
pub(crate) async fn settle() {
    #[cfg(target_arch = "wasm32")]
    {
        let tick = js_sys::Promise::resolve(&js_sys::wasm_bindgen::JsValue::NULL);
        let _ = wasm_bindgen_futures::JsFuture::from(tick).await;
    }
}

#[cfg(target_arch = "wasm32")]
mod web {
    use std::cell::RefCell;

    use crate::Error;

    thread_local! {
        /// The first error caught on each device and not yet taken. A page runs on
        /// one thread, so one list serves every context.
        static DEFERRED: RefCell<Vec<(wgpu::Device, Error)>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn keep(device: wgpu::Device, error: Error) {
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            if !d.iter().any(|(kept, _)| *kept == device) {
                d.push((device, error));
            }
        });
    }

    pub(super) fn take(device: &wgpu::Device) -> Option<Error> {
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            let i = d.iter().position(|(kept, _)| kept == device)?;
            Some(d.swap_remove(i).1)
        })
    }
}
