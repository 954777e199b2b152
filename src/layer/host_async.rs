//! The host convenience calls as futures: the only form on the web, where nothing
//! may block, and available everywhere (an executor such as `pollster` drives them
//! off the web, and the blocking namesakes are these under `pollster`).

use super::{BatchNorm, GradBuffers, SavedStats};
use crate::{
    BatchNormState, Element, ForwardOutput, GpuContext, GradMask, Gradients, Result,
    SavedStatsHost, Shape, TensorBuffer, TrainOutput,
};

impl SavedStats {
    /// [`Self::to_host`] without blocking.
    pub async fn to_host_async(&self, ctx: &GpuContext) -> Result<SavedStatsHost> {
        let p = self.stride();
        let c = self.channels;
        let all: Vec<f32> = ctx.read_buffer_async(&self.buffer, 4 * p).await?;
        let mean = all[..c].to_vec();
        let mean_lo = (0..c)
            .map(|i| ((all[2 * p + i] as f64 + all[3 * p + i] as f64) - mean[i] as f64) as f32)
            .collect();
        Ok(SavedStatsHost {
            mean,
            invstd: all[p..p + c].to_vec(),
            mean_lo,
        })
    }
}

impl BatchNorm {
    /// [`Self::state`] without blocking.
    pub async fn state_async(&self) -> Result<BatchNormState> {
        let (c, p) = (self.config.num_features, self.stride());
        let affine: Vec<f32> = self.ctx.read_buffer_async(&self.affine, 2 * p).await?;
        let running: Vec<u32> = self.ctx.read_buffer_async(&self.running, 2 * p + 1).await?;
        let f = |v: &[u32]| v.iter().map(|&b| f32::from_bits(b)).collect::<Vec<f32>>();
        let mut state = BatchNormState {
            gamma: affine[..c].to_vec(),
            beta: affine[p..p + c].to_vec(),
            running_mean: f(&running[..c]),
            running_var: f(&running[p..p + c]),
            num_batches_tracked: running[2 * p] as u64,
        };
        if !self.config.affine {
            state.gamma.clear();
            state.beta.clear();
        }
        if !self.config.track_running_stats {
            state.running_mean.clear();
            state.running_var.clear();
            state.num_batches_tracked = 0;
        }
        Ok(state)
    }

    /// [`Self::affine`] without blocking.
    pub async fn affine_async(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        crate::optimizer::require_affine(self)?;
        let (c, p) = (self.config.num_features, self.stride());
        let all: Vec<f32> = self.ctx.read_buffer_async(&self.affine, 2 * p).await?;
        Ok((all[..c].to_vec(), all[p..p + c].to_vec()))
    }

    /// [`Self::forward_train_host`] without blocking.
    pub async fn forward_train_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
    ) -> Result<TrainOutput<T>> {
        self.train_host_async(shape, x, None).await
    }

    /// [`Self::forward_train_add_host`] without blocking.
    pub async fn forward_train_add_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: &[T],
    ) -> Result<TrainOutput<T>> {
        self.train_host_async(shape, x, Some(z)).await
    }

    pub(super) async fn train_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: Option<&[T]>,
    ) -> Result<TrainOutput<T>> {
        let shape = &shape.clone().with_dtype(T::DTYPE);
        let ctx = self.ctx.clone();
        let (xb, zb) = self.upload_inputs(shape, x, z, true)?;
        let yb = ctx.storage_buffer("bn.y", shape.bytes())?;
        let saved = SavedStats::new(&ctx, self.config.num_features)?;
        run_async(&ctx, "forward_train", |enc| {
            let z = zb.as_ref().map(TensorBuffer::from);
            self.plan_train(shape, (&xb).into(), z, (&yb).into(), &saved)?
                .record_into(enc);
            Ok(())
        })
        .await?;
        Ok(TrainOutput {
            y: ctx.read_buffer_async(&yb, shape.numel()).await?,
            saved: saved.to_host_async(&ctx).await?,
        })
    }

    /// [`Self::forward_eval_host`] without blocking.
    pub async fn forward_eval_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
    ) -> Result<ForwardOutput<T>> {
        self.eval_host_async(shape, x, None).await
    }

    /// [`Self::forward_eval_add_host`] without blocking.
    pub async fn forward_eval_add_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: &[T],
    ) -> Result<ForwardOutput<T>> {
        self.eval_host_async(shape, x, Some(z)).await
    }

    pub(super) async fn eval_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        z: Option<&[T]>,
    ) -> Result<ForwardOutput<T>> {
        let shape = &shape.clone().with_dtype(T::DTYPE);
        let batch = !self.config.track_running_stats;
        let ctx = self.ctx.clone();
        let (xb, zb) = self.upload_inputs(shape, x, z, batch)?;
        let yb = ctx.storage_buffer("bn.y", shape.bytes())?;
        let saved = batch
            .then(|| SavedStats::new(&ctx, self.config.num_features))
            .transpose()?;
        run_async(&ctx, "forward_eval", |enc| {
            let z = zb.as_ref().map(TensorBuffer::from);
            self.plan_eval(shape, (&xb).into(), z, (&yb).into(), saved.as_ref())?
                .record_into(enc);
            Ok(())
        })
        .await?;
        let y = ctx.read_buffer_async(&yb, shape.numel()).await?;
        let saved = match saved {
            Some(s) => Some(s.to_host_async(&ctx).await?),
            None => None,
        };
        Ok(ForwardOutput { y, saved })
    }

    /// [`Self::backward_host`] without blocking.
    pub async fn backward_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        dy: &[T],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
    ) -> Result<Gradients<T>> {
        self.backward_fused_host_async(shape, x, None, dy, saved, mask, false)
            .await
    }

    /// [`Self::backward_fused_host`] without blocking.
    #[allow(clippy::too_many_arguments)]
    pub async fn backward_fused_host_async<T: Element>(
        &mut self,
        shape: &Shape,
        x: &[T],
        y: Option<&[T]>,
        dy: &[T],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
        residual: bool,
    ) -> Result<Gradients<T>> {
        let shape = &shape.clone().with_dtype(T::DTYPE);
        Self::check_len("x", shape, x)?;
        Self::check_len("dy", shape, dy)?;
        if let Some(y) = y {
            Self::check_len("y", shape, y)?;
        }
        self.ctx.check_size("x", shape.bytes())?;
        let ctx = self.ctx.clone();
        let saved = saved.map(|s| SavedStats::from_host(&ctx, s)).transpose()?;
        let affine = self.config.affine;
        let c = self.config.num_features;
        let alloc =
            |on: bool, label, bytes| on.then(|| ctx.storage_buffer(label, bytes)).transpose();
        let dx = alloc(mask.dx, "bn.dx", shape.bytes())?;
        let dgamma = alloc(mask.dgamma && affine, "bn.dgamma", c as u64 * 4)?;
        let dbeta = alloc(mask.dbeta && affine, "bn.dbeta", c as u64 * 4)?;
        let dz = alloc(residual, "bn.dz", shape.bytes())?;
        let (xb, dyb) = (ctx.upload("bn.x", x)?, ctx.upload("bn.dy", dy)?);
        let yb = y.map(|y| ctx.upload("bn.y", y)).transpose()?;
        let grads = GradBuffers {
            dx: dx.as_ref().map(TensorBuffer::from),
            dgamma: dgamma.as_ref().map(TensorBuffer::from),
            dbeta: dbeta.as_ref().map(TensorBuffer::from),
            accumulate: false,
            output: yb.as_ref().map(TensorBuffer::from),
            dz: dz.as_ref().map(TensorBuffer::from),
        };
        run_async(&ctx, "backward", |enc| {
            self.backward(enc, shape, &xb, &dyb, saved.as_ref(), grads)
        })
        .await?;
        let mut out = Gradients {
            dx: None,
            dgamma: None,
            dbeta: None,
            dz: None,
        };
        for (b, slot) in [(dx, &mut out.dx), (dz, &mut out.dz)] {
            if let Some(b) = b {
                *slot = Some(ctx.read_buffer_async(&b, shape.numel()).await?);
            }
        }
        for (b, slot) in [(dgamma, &mut out.dgamma), (dbeta, &mut out.dbeta)] {
            if let Some(b) = b {
                *slot = Some(ctx.read_buffer_async(&b, c).await?);
            }
        }
        Ok(out)
    }
}

/// Records with `record` and submits, inside error scopes whose verdict is awaited
/// (the async form of `layer::run`; the readbacks after it wait for the work).
async fn run_async(
    ctx: &GpuContext,
    context: &'static str,
    record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<()> {
    ctx.guarded_async(context, || {
        let device = ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some(context),
        });
        record(&mut encoder)?;
        ctx.queue().submit([encoder.finish()]);
        Ok(())
    })
    .await
}
