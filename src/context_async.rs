//! The context's waits as futures: the only waits there are on the web, where
//! nothing may block, and the same calls elsewhere (where they poll the device, so
//! that an executor such as `pollster` can drive them).

use crate::{Error, GpuContext, Result};

impl GpuContext {
    /// Runs `f` (which creates, writes or submits on the device) inside error scopes
    /// and awaits their verdict: [`Self::guarded`]'s errors, on every target. The
    /// verdicts of scopes that synchronous calls inside `f` popped without waiting
    /// (on the web) arrive first and are returned too.
    pub(crate) async fn guarded_async<T>(
        &self,
        context: &'static str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        self.check_device()?;
        let device = self.device();
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = f();
        let (invalid, oom) = crate::scopes::pop_async(oom, invalid).await;
        if invalid.is_some() || oom.is_some() {
            // A destroyed device reports its loss at the next poll.
            let _ = device.poll(wgpu::PollType::Poll);
        }
        crate::scopes::settle().await;
        self.check_device()?;
        match crate::scopes::to_error(context, invalid, oom) {
            Some(e) => Err(e),
            None => result,
        }
    }

    /// Submits the encoder and resolves once the GPU has finished it: the form of
    /// [`Self::submit_and_wait`] for the web (available everywhere).
    pub async fn submit_async(&self, encoder: wgpu::CommandEncoder) -> Result<()> {
        self.check_device()?;
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        let index = self.queue().submit([encoder.finish()]);
        self.queue().on_submitted_work_done(move || {
            let _ = sender.send(());
        });
        self.poll_native(Some(index))?;
        receiver.receive().await.ok_or_else(|| {
            self.check_device()
                .err()
                .unwrap_or_else(|| Error::Readback("submission callback dropped".into()))
        })?;
        self.check_device()
    }

    /// Copies the first `len` values of type `T` in `buffer` to the host, as
    /// [`Self::read_buffer`] (same requirements and errors) without blocking: the
    /// form for the web (available everywhere).
    pub async fn read_buffer_async<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        len: usize,
    ) -> Result<Vec<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .map_or(u64::MAX, |b| b as u64);
        if len == 0 {
            return Ok(Vec::new());
        }
        if !buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::BufferUsage {
                name: "read_buffer",
                needed: wgpu::BufferUsages::COPY_SRC,
                got: buffer.usage(),
            });
        }
        // Copies move whole 4-byte words (e.g. an odd number of f16).
        let words = bytes.saturating_add(3) / 4 * 4;
        if words > buffer.size() {
            return Err(Error::BufferTooSmall {
                name: "read_buffer",
                needed: words,
                got: buffer.size(),
            });
        }
        let device = self.device();
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        let staging = self
            .guarded_async("reading a buffer back", || {
                let staging = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bn.readback"),
                    size: words,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("bn.readback"),
                });
                encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, words);
                self.queue().submit([encoder.finish()]);
                // Mapping waits for the copy: one round trip, no separate wait.
                staging.map_async(wgpu::MapMode::Read, .., move |r| {
                    let _ = sender.send(r);
                });
                Ok(staging)
            })
            .await;
        let staging = staging?;
        self.poll_native(None)?;
        let mapped = receiver
            .receive()
            .await
            .ok_or_else(|| Error::Readback("map callback dropped".into()))?;
        self.check_device()?;
        mapped.map_err(|e| Error::Readback(e.to_string()))?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Readback(e.to_string()))?;
        let out = bytemuck::cast_slice::<u8, T>(&view[..bytes as usize]).to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Off the web, runs the device until the submission `index` (or all work) is
    /// done: there callbacks run inside polls. The browser runs the device by itself.
    fn poll_native(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let waited = self.device().poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            });
            self.check_device()?;
            waited.map_err(|e| Error::Readback(e.to_string()))?;
        }
        #[cfg(target_arch = "wasm32")]
        let _ = index;
        Ok(())
    }
}
