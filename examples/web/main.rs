//! The Keras network `Dense(3, relu) -> BatchNormalization -> Dense(2, relu) ->
//! BatchNormalization -> Dense(1, sigmoid)` trained on two moons in the browser, its
//! loss plotted as it falls. The batch norms run on WebGPU with this crate's kernels
//! (Keras convention, `forward_train_host_async` and `backward_host_async`); the
//! three small dense layers and Adam run on the host.
//!
//! Build and serve with `bash examples/web/build.sh` then open
//! `http://localhost:8000/`; `node examples/web/screenshot.mjs` trains it in headless
//! Chromium and saves a screenshot. Natively this example only says so.

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!(
        "examples/web runs in a browser: bash examples/web/build.sh, then open the page it serves"
    );
}

#[cfg(target_arch = "wasm32")]
fn main() {
    wasm_bindgen_futures::spawn_local(async {
        if let Err(e) = page::train().await {
            page::fail(&e.to_string());
        }
    });
}

#[cfg(target_arch = "wasm32")]
mod page {
    use js_sys::wasm_bindgen::JsValue;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use wgpu_batchnorm::{BatchNorm, BatchNormConfig, GpuContext, GradMask, Shape};

    /// Points of the two moons (half each), training steps (full batch), Adam's step.
    const POINTS: usize = 256;
    const STEPS: usize = 120;
    const LR: f32 = 0.05;

    type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    /// A dense layer `y = x W + b` (`W` is `inputs x outputs`, row-major) with its
    /// Adam moments.
    struct Dense {
        inputs: usize,
        outputs: usize,
        params: Vec<f32>, // W then b
        grads: Vec<f32>,
        adam: Adam,
    }

    impl Dense {
        /// Glorot-uniform weights, zero bias (Keras' defaults).
        fn new(rng: &mut StdRng, inputs: usize, outputs: usize) -> Self {
            let limit = (6.0 / (inputs + outputs) as f32).sqrt();
            let mut params: Vec<f32> = (0..inputs * outputs)
                .map(|_| rng.random_range(-limit..limit))
                .collect();
            params.resize(inputs * outputs + outputs, 0.0);
            let n = params.len();
            Self {
                inputs,
                outputs,
                params,
                grads: vec![0.0; n],
                adam: Adam::new(n),
            }
        }

        fn forward(&self, x: &[f32]) -> Vec<f32> {
            let (k, m) = (self.inputs, self.outputs);
            let (w, b) = self.params.split_at(k * m);
            x.chunks(k)
                .flat_map(|row| {
                    (0..m).map(move |j| b[j] + (0..k).map(|i| row[i] * w[i * m + j]).sum::<f32>())
                })
                .collect()
        }

        /// Accumulates the gradients of `W` and `b` from `dy`, returns `dx`.
        fn backward(&mut self, x: &[f32], dy: &[f32]) -> Vec<f32> {
            let (k, m) = (self.inputs, self.outputs);
            self.grads.iter_mut().for_each(|g| *g = 0.0);
            let mut dx = vec![0.0; x.len()];
            for (n, (row, d)) in x.chunks(k).zip(dy.chunks(m)).enumerate() {
                for (j, &dj) in d.iter().enumerate() {
                    self.grads[k * m + j] += dj;
                    for i in 0..k {
                        self.grads[i * m + j] += row[i] * dj;
                        dx[n * k + i] += self.params[i * m + j] * dj;
                    }
                }
            }
            dx
        }

        fn step(&mut self) {
            self.adam.step(&mut self.params, &self.grads);
        }
    }

    /// Keras' Adam (beta1 0.9, beta2 0.999, epsilon 1e-7).
    struct Adam {
        m: Vec<f32>,
        v: Vec<f32>,
        t: i32,
    }

    impl Adam {
        fn new(n: usize) -> Self {
            Self {
                m: vec![0.0; n],
                v: vec![0.0; n],
                t: 0,
            }
        }

        fn step(&mut self, params: &mut [f32], grads: &[f32]) {
            self.t += 1;
            let (b1, b2) = (0.9f32, 0.999f32);
            let lr = LR * (1.0 - b2.powi(self.t)).sqrt() / (1.0 - b1.powi(self.t));
            for i in 0..params.len() {
                self.m[i] = b1 * self.m[i] + (1.0 - b1) * grads[i];
                self.v[i] = b2 * self.v[i] + (1.0 - b2) * grads[i] * grads[i];
                params[i] -= lr * self.m[i] / (self.v[i].sqrt() + 1e-7);
            }
        }
    }

    /// A batch norm on the GPU with host copies of gamma and beta for Adam.
    struct Norm {
        bn: BatchNorm,
        shape: Shape,
        gamma_beta: Vec<f32>,
        adam: Adam,
    }

    impl Norm {
        fn new(ctx: &GpuContext, channels: usize) -> Result<Self> {
            Ok(Self {
                bn: BatchNorm::new(ctx, BatchNormConfig::keras(channels))?,
                shape: Shape::channels_last(&[POINTS, channels])?,
                gamma_beta: [vec![1.0; channels], vec![0.0; channels]].concat(),
                adam: Adam::new(2 * channels),
            })
        }

        async fn step(
            &mut self,
            x: &[f32],
            dy: &[f32],
            saved: &wgpu_batchnorm::SavedStatsHost,
        ) -> Result<Vec<f32>> {
            let g = self
                .bn
                .backward_host_async(&self.shape, x, dy, Some(saved), GradMask::default())
                .await?;
            let grads = [g.dgamma.unwrap_or_default(), g.dbeta.unwrap_or_default()].concat();
            self.adam.step(&mut self.gamma_beta, &grads);
            let c = self.shape.c();
            self.bn
                .set_affine(&self.gamma_beta[..c], &self.gamma_beta[c..])?;
            Ok(g.dx.unwrap_or_default())
        }
    }

    fn relu(v: &mut [f32]) {
        v.iter_mut().for_each(|a| *a = a.max(0.0));
    }

    /// `dy` where the ReLU passed its input, zero elsewhere.
    fn relu_back(out: &[f32], dy: &[f32]) -> Vec<f32> {
        out.iter()
            .zip(dy)
            .map(|(&o, &d)| if o > 0.0 { d } else { 0.0 })
            .collect()
    }

    /// Two interleaved half circles with Gaussian noise (scikit-learn's
    /// `make_moons(noise=0.1)`), labels 0 and 1.
    fn two_moons(rng: &mut StdRng) -> (Vec<f32>, Vec<f32>) {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for i in 0..POINTS {
            let upper = i % 2 == 0;
            let t = std::f32::consts::PI * rng.random::<f32>();
            let (px, py) = if upper {
                (t.cos(), t.sin())
            } else {
                (1.0 - t.cos(), 0.5 - t.sin())
            };
            let noise = |rng: &mut StdRng| {
                let (u1, u2): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random());
                0.1 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            };
            x.push(px + noise(rng));
            x.push(py + noise(rng));
            y.push(if upper { 0.0 } else { 1.0 });
        }
        (x, y)
    }

    pub async fn train() -> Result<()> {
        let ctx = GpuContext::from_env_async().await?;
        let adapter = ctx.describe();
        set_text("adapter", &format!("adapter: {adapter}"));
        let mut rng = StdRng::seed_from_u64(7);
        let (x, labels) = two_moons(&mut rng);
        let mut d1 = Dense::new(&mut rng, 2, 3);
        let mut d2 = Dense::new(&mut rng, 3, 2);
        let mut d3 = Dense::new(&mut rng, 2, 1);
        let mut n1 = Norm::new(&ctx, 3)?;
        let mut n2 = Norm::new(&ctx, 2)?;
        let mut losses = Vec::new();
        for step in 0..STEPS {
            // Forward.
            let mut h1 = d1.forward(&x);
            relu(&mut h1);
            let t1 = n1.bn.forward_train_host_async(&n1.shape, &h1).await?;
            let mut h2 = d2.forward(&t1.y);
            relu(&mut h2);
            let t2 = n2.bn.forward_train_host_async(&n2.shape, &h2).await?;
            let logits = d3.forward(&t2.y);
            let p: Vec<f32> = logits.iter().map(|&z| 1.0 / (1.0 + (-z).exp())).collect();
            let loss = p
                .iter()
                .zip(&labels)
                .map(|(&p, &y)| {
                    let p = p.clamp(1e-7, 1.0 - 1e-7);
                    -(y * p.ln() + (1.0 - y) * (1.0 - p).ln())
                })
                .sum::<f32>()
                / POINTS as f32;
            let accuracy = p
                .iter()
                .zip(&labels)
                .filter(|(&p, &y)| (p > 0.5) == (y > 0.5))
                .count() as f32
                / POINTS as f32;
            losses.push(loss);
            // Backward: binary cross-entropy through the sigmoid.
            let dlogits: Vec<f32> = p
                .iter()
                .zip(&labels)
                .map(|(&p, &y)| (p - y) / POINTS as f32)
                .collect();
            let dt2 = d3.backward(&t2.y, &dlogits);
            let dh2 = n2.step(&h2, &dt2, &t2.saved).await?;
            let dt1 = d2.backward(&t1.y, &relu_back(&h2, &dh2));
            let dh1 = n1.step(&h1, &dt1, &t1.saved).await?;
            d1.backward(&x, &relu_back(&h1, &dh1));
            for d in [&mut d1, &mut d2, &mut d3] {
                d.step();
            }
            plot(&losses, &x, &labels, &p);
            set_text(
                "status",
                &format!(
                    "step {}/{STEPS}: loss {loss:.4}, accuracy {:.1}%",
                    step + 1,
                    100.0 * accuracy
                ),
            );
            publish("bnLosses", &JsValue::from(serde_json::to_string(&losses)?))?;
        }
        publish("bnDone", &JsValue::TRUE)?;
        Ok(())
    }

    /// The loss curve and the points coloured by the prediction, as SVG.
    fn plot(losses: &[f32], x: &[f32], labels: &[f32], p: &[f32]) {
        let (w, h, pad) = (480.0f32, 300.0f32, 40.0f32);
        let top = losses.iter().cloned().fold(0.0f32, f32::max).max(1e-3) * 1.05;
        let px = |i: usize| pad + (w - 2.0 * pad) * i as f32 / (STEPS - 1) as f32;
        let py = |l: f32| h - pad - (h - 2.0 * pad) * l / top;
        let path: String = losses
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                format!(
                    "{}{:.1},{:.1}",
                    if i == 0 { "M" } else { " L" },
                    px(i),
                    py(l)
                )
            })
            .collect();
        let mut svg = format!(
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">
<rect width="100%" height="100%" fill="#fff"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="#444"/>
<text x="{pad}" y="24" font-family="sans-serif" font-size="14">binary cross-entropy per step</text>
<text x="{r}" y="{lb}" font-family="sans-serif" font-size="12" text-anchor="end">step {STEPS}</text>
<text x="4" y="{t}" font-family="sans-serif" font-size="12">{top:.2}</text>
<text x="4" y="{b}" font-family="sans-serif" font-size="12">0</text>
<path d="{path}" fill="none" stroke="#c0392b" stroke-width="2"/>
</svg>"##,
            b = h - pad,
            r = w - pad,
            lb = h - pad + 18.0,
            t = pad + 4.0,
        );
        set_html("loss", &svg);
        svg = r##"<svg xmlns="http://www.w3.org/2000/svg" width="300" height="300" viewBox="-1.6 -1.1 4.2 2.7"><rect x="-1.6" y="-1.1" width="4.2" height="2.7" fill="#fff"/>"##
            .to_string();
        for i in 0..labels.len() {
            let hue = if p[i] > 0.5 { "#2e86c1" } else { "#e67e22" };
            let ring = if labels[i] > 0.5 {
                "#1b4f72"
            } else {
                "#873600"
            };
            svg += &format!(
                r#"<circle cx="{:.3}" cy="{:.3}" r="0.035" fill="{hue}" stroke="{ring}" stroke-width="0.01"/>"#,
                x[2 * i],
                0.5 - x[2 * i + 1]
            );
        }
        svg += "</svg>";
        set_html("points", &svg);
    }

    fn document() -> Option<web_sys::Document> {
        web_sys::window()?.document()
    }

    fn set_text(id: &str, text: &str) {
        if let Some(e) = document().and_then(|d| d.get_element_by_id(id)) {
            e.set_text_content(Some(text));
        }
    }

    fn set_html(id: &str, html: &str) {
        if let Some(e) = document().and_then(|d| d.get_element_by_id(id)) {
            e.set_inner_html(html);
        }
    }

    /// Sets `window[name]`, which the screenshot test reads.
    fn publish(name: &str, value: &JsValue) -> Result<()> {
        let window = web_sys::window().ok_or("no window")?;
        js_sys::Reflect::set(&window, &JsValue::from(name), value)
            .map_err(|e| format!("setting window.{name}: {e:?}"))?;
        Ok(())
    }

    /// Shows a failure on the page and tells the screenshot test.
    pub fn fail(message: &str) {
        set_text("status", &format!("error: {message}"));
        web_sys::console::error_1(&JsValue::from(message));
        let _ = publish("bnError", &JsValue::from(message));
    }
}
