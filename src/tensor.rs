//! Where a tensor lives on the GPU: a whole buffer, or a range of one (frameworks
//! sub-allocate tensors from large buffers).

use std::num::NonZeroU64;

/// A tensor's bytes in a GPU buffer: from `offset`, at most `size` bytes (the rest
/// of the buffer when `None`).
///
/// Every call that takes a tensor takes `impl Into<TensorBuffer>`, so a whole
/// buffer (`&buffer`), a slice (`buffer.slice(offset..)`) or a binding
/// (`wgpu::BufferBinding`) all work. The offset must be a multiple of the device's
/// `min_storage_buffer_offset_alignment` (and of 16, for the kernels' vec4 loads);
/// anything else is [`crate::Error::MisalignedOffset`] before anything is recorded.
///
/// wgpu checks usages per buffer, not per range, and refuses a buffer bound both
/// writable and read-only in one dispatch: a tensor a call writes must not share
/// its buffer with a tensor the call reads, even at another offset
/// ([`crate::Error::AliasedBuffers`]). Tensors that are only read may share one, and
/// so may written ones whose ranges do not overlap (`dx`, `dgamma` and `dbeta` of a
/// backward in one arena).
///
/// ```no_run
/// # fn demo(arena: &wgpu::Buffer) {
/// use wgpu_batchnorm::TensorBuffer;
/// let whole = TensorBuffer::from(arena);
/// let at_1_mib = TensorBuffer::from(arena.slice(1 << 20..));
/// let ranged = TensorBuffer::new(arena, 4096).with_size(1 << 16);
/// # }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TensorBuffer<'a> {
    buffer: &'a wgpu::Buffer,
    offset: u64,
    size: Option<u64>,
}

impl<'a> TensorBuffer<'a> {
    /// The bytes of `buffer` from `offset` to its end.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64) -> Self {
        Self {
            buffer,
            offset,
            size: None,
        }
    }

    /// This range, ending `size` bytes after its offset.
    pub fn with_size(self, size: u64) -> Self {
        Self {
            size: Some(size),
            ..self
        }
    }

    /// The buffer.
    pub fn buffer(&self) -> &'a wgpu::Buffer {
        self.buffer
    }

    /// Offset of the first byte in the buffer.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes available from the offset: the given size, else the rest of the buffer.
    pub fn size(&self) -> u64 {
        self.size
            .unwrap_or_else(|| self.buffer.size().saturating_sub(self.offset))
    }

    /// The binding of its first `bytes` bytes (at least 4, wgpu's minimum).
    pub(crate) fn binding(&self, bytes: u64) -> wgpu::BufferBinding<'a> {
        wgpu::BufferBinding {
            buffer: self.buffer,
            offset: self.offset,
            size: NonZeroU64::new(bytes.max(4)),
        }
    }
}

impl<'a> From<&'a wgpu::Buffer> for TensorBuffer<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Self::new(buffer, 0)
    }
}

impl<'a> From<wgpu::BufferSlice<'a>> for TensorBuffer<'a> {
    fn from(slice: wgpu::BufferSlice<'a>) -> Self {
        Self::new(slice.buffer(), slice.offset()).with_size(slice.size())
    }
}

impl<'a> From<wgpu::BufferBinding<'a>> for TensorBuffer<'a> {
    fn from(b: wgpu::BufferBinding<'a>) -> Self {
        let t = Self::new(b.buffer, b.offset);
        match b.size {
            Some(size) => t.with_size(size.get()),
            None => t,
        }
    }
}
