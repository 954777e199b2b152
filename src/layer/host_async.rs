//! The host convenience calls as futures: the only form on the web, where nothing
//! may block, and available everywhere (an executor such as `pollster` drives them
//! off the web). Each does what its blocking namesake does, with the same checks,
//! outputs and errors.

use super::{BatchNorm, GradBuffers, SavedStats};
use crate::{
    BatchNormState, ForwardOutput, GpuContext, GradMask, Gradients, Result, SavedStatsHost,
    Shape, TrainOutput,
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
    pub async fn forward_train_host_async(
        &mut self,
        shape: &Shape,
        x: &[f32],
    ) -> Result<TrainOutput> {
        Self::check_len("x", shape, x)?;
        self.check_shape(shape, true)?;
        self.ctx.check_size("x", shape.bytes())?;
        let ctx = self.ctx.clone();
        let (xb, yb) = (
            ctx.upload("bn.x", x)?,
            ctx.storage_buffer("bn.y", shape.bytes())?,
        );
        let saved = SavedStats::new(&ctx, self.config.num_features)?;
        run_async(&ctx, "forward_train", |enc| {
            self.forward_train(enc, shape, &xb, &yb, &saved)
        })
        .await?;
        Ok(TrainOutput {
            y: ctx.read_buffer_async(&yb, shape.numel()).await?,
            saved: saved.to_host_async(&ctx).await?,
        })
    }

    /// [`Self::forward_eval_host`] without blocking.
    pub async fn forward_eval_host_async(
        &mut self,
        shape: &Shape,
        x: &[f32],
    ) -> Result<ForwardOutput> {
        Self::check_len("x", shape, x)?;
        let batch = !self.config.track_running_stats;
        self.check_shape(shape, batch)?;
        self.ctx.check_size("x", shape.bytes())?;
        let ctx = self.ctx.clone();
        let (xb, yb) = (
            ctx.upload("bn.x", x)?,
            ctx.storage_buffer("bn.y", shape.bytes())?,
        );
        let saved = batch
            .then(|| SavedStats::new(&ctx, self.config.num_features))
            .transpose()?;
        run_async(&ctx, "forward_eval", |enc| {
            self.forward_eval(enc, shape, &xb, &yb, saved.as_ref())
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
    pub async fn backward_host_async(
        &mut self,
        shape: &Shape,
        x: &[f32],
        dy: &[f32],
        saved: Option<&SavedStatsHost>,
        mask: GradMask,
    ) -> Result<Gradients> {
        Self::check_len("x", shape, x)?;
        Self::check_len("dy", shape, dy)?;
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
        let (xb, dyb) = (ctx.upload("bn.x", x)?, ctx.upload("bn.dy", dy)?);
        let mut grads = GradBuffers::new();
        if let Some(b) = &dx {
            grads = grads.dx(b);
        }
        if let Some(b) = &dgamma {
            grads = grads.dgamma(b);
        }
        if let Some(b) = &dbeta {
            grads = grads.dbeta(b);
        }
        run_async(&ctx, "backward", |enc| {
            self.backward(enc, shape, &xb, &dyb, saved.as_ref(), grads)
        })
        .await?;
        let mut out = Gradients::default();
        if let Some(b) = dx {
            out.dx = Some(ctx.read_buffer_async(&b, shape.numel()).await?);
        }
        if let Some(b) = dgamma {
            out.dgamma = Some(ctx.read_buffer_async(&b, c).await?);
        }
        if let Some(b) = dbeta {
            out.dbeta = Some(ctx.read_buffer_async(&b, c).await?);
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
