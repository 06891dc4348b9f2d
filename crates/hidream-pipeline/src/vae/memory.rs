//! The decode's memory model, from the config alone: the decoder's weight bytes, and its heap peak
//! replayed buffer by buffer.
//!
//! [`DecodeEstimate::new`] walks the decoder as `decoder.rs`, `mid_block.rs`, `tiling.rs` and
//! candle (0.11: candle-nn's GroupNorm, Conv2d and Linear, candle-transformers' `ResnetBlock2D`
//! and `Upsample2D`, candle-core's CPU convolution) run it, and replays every buffer they allocate
//! and free, in order, on a counter: each GroupNorm's four full-size temporaries, a 3×3
//! convolution's NHWC copy of its input, its output and its bias sum (plus each worker thread's
//! im2col tile), the resnets' inputs that stay alive until they return, the softmax's three
//! score-sized buffers besides the scores. The peak of that counter is the estimate. It is an upper
//! bound of the heap the CPU decode allocates: where the code's order leaves a choice (which
//! temporaries a statement still holds), it assumes the larger, and a tiled decode counts its
//! rows of decoded tiles whole. The integration test `vae_heap` checks it against the counting
//! allocator on tiny VAEs: measured ≤ estimate ≤ 1.25 × measured (at most 1.025× untiled and 1.18×
//! tiled when measured). Left out: gemm's per-thread packing slab (the L2 cache's size, a few MiB
//! per thread, allocated once per process). On a GPU the same tensors exist, so it is a fair
//! estimate there too, but it was only measured on the CPU.

use candle_core::DType;

use super::tiling::TilePlan;
use super::{DecodeOptions, VaeConfig};
use crate::{PipelineError, Result};

/// candle-core 0.11's CPU convolution computes this many output pixels per im2col tile
/// (`conv2d.rs`, `TILE_SIZE`).
const CONV_TILE_PIXELS: u64 = 512;

/// The latents a decode starts from: `[batch, latent_channels, height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentSize {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

/// What one decode holds at its peak, in bytes, from [`DecodeEstimate::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeEstimate {
    /// The decoder's weights in the decode dtype ([`VaeConfig::weight_bytes`]).
    pub weights: u64,
    /// The activation peak above the weights and the caller's latents: the largest set of
    /// buffers alive at once, output included.
    pub activations: u64,
    /// The mid-block attention's f32 score-sized buffers alive at its peak (the scores, and the
    /// softmax's three of the same size): `4 × chunk × positions × 4` bytes for one image. Part of
    /// `activations` when the attention sets the peak.
    pub attention_scores: u64,
    /// The activation peak outside the mid-block attention: the feature maps. No attention chunk
    /// brings `activations` below this.
    pub feature_maps: u64,
}

impl DecodeEstimate {
    /// Estimates a decode of `latents` in `dtype` with `options`, on as many worker threads as
    /// this machine has (candle's convolutions hold one im2col tile per thread).
    pub fn new(config: &VaeConfig, latents: LatentSize, dtype: DType, options: &DecodeOptions) -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        estimate(config, latents, dtype, options, threads)
    }

    /// Weights plus activations: the heap the decode needs.
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.activations)
    }
}

impl VaeConfig {
    /// The decoder's parameter count: `decoder.*` (and `post_quant_conv.*` where the config has it),
    /// what [`super::VaeDecoder`] loads.
    pub fn weight_params(&self) -> u64 {
        let conv = |c_in: usize, c_out: usize, kernel: usize| (c_in * c_out * kernel * kernel + c_out) as u64;
        let norm = |channels: usize| 2 * channels as u64;
        let resnet = |c_in: usize, c_out: usize| {
            let shortcut = if c_in == c_out { 0 } else { conv(c_in, c_out, 1) };
            norm(c_in) + conv(c_in, c_out, 3) + norm(c_out) + conv(c_out, c_out, 3) + shortcut
        };
        let (Some(&first), Some(&last)) = (self.block_out_channels.first(), self.block_out_channels.last()) else {
            return 0;
        };
        let attention = norm(last) + 4 * conv(last, last, 1);
        let mut params = conv(self.latent_channels, last, 3) + 2 * resnet(last, last) + attention;
        let reversed: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        for (block_idx, &c_out) in reversed.iter().enumerate() {
            let c_in = reversed[block_idx.saturating_sub(1)];
            params += resnet(c_in, c_out) + self.layers_per_block as u64 * resnet(c_out, c_out);
            if block_idx + 1 < reversed.len() {
                params += conv(c_out, c_out, 3);
            }
        }
        params += norm(first) + conv(first, self.out_channels, 3);
        if self.use_post_quant_conv {
            params += conv(self.latent_channels, self.latent_channels, 1);
        }
        params
    }

    /// The decoder's weights on the device once loaded in `dtype`.
    pub fn weight_bytes(&self, dtype: DType) -> u64 {
        self.weight_params() * dtype.size_in_bytes() as u64
    }
}

/// [`DecodeEstimate::new`] on `threads` worker threads.
pub(super) fn estimate(
    config: &VaeConfig,
    latents: LatentSize,
    dtype: DType,
    options: &DecodeOptions,
    threads: u64,
) -> Result<DecodeEstimate> {
    let LatentSize { batch, height, width } = latents;
    let plan = match &options.tiling {
        Some(tiling) => {
            let plan = TilePlan::new(tiling, config.upscale(), height, width)?;
            (height > tiling.tile_latent_size || width > tiling.tile_latent_size).then_some(plan)
        }
        None => None,
    };
    let elem = dtype.size_in_bytes() as u64;
    let mut heap = Heap::new(Model { config, elem, threads, options });
    let upscale = config.upscale() as u64;
    let (batch, height, width) = (batch as u64, height as u64, width as u64);
    let image = |batch: u64, height: u64, width: u64| {
        batch * config.out_channels as u64 * height * upscale * width * upscale * elem
    };
    // `to_vae_space`: the scaled and the shifted latents (f32 and cast copies, conservatively).
    let latent_bytes = batch * config.latent_channels as u64 * height * width * 4;
    heap.alloc(3 * latent_bytes);
    let per_call = if options.slicing && batch > 1 { 1 } else { batch };
    let calls = batch / per_call;
    for _ in 0..calls {
        match &plan {
            Some(plan) => {
                let (tile_h, tile_w) = plan.largest_tile(height as usize, width as usize);
                let (tile_h, tile_w) = (tile_h as u64, tile_w as u64);
                let tile_image = image(per_call, tile_h, tile_w);
                let stitched = image(per_call, height, width);
                // The previous and the current row of decoded tiles, and the stitched rows so
                // far, each counted whole throughout.
                let rows = 2 * plan.columns() as u64 * tile_image;
                heap.alloc(rows + stitched);
                heap.decode(per_call, tile_h, tile_w);
                // A tile's blends: the strips, their weighted sum and the new tile.
                heap.alloc(3 * tile_image);
                heap.free(4 * tile_image);
                // The stitched rows' concatenation: this call's images.
                heap.alloc(stitched);
                heap.free(rows + stitched);
            }
            None => heap.decode(per_call, height, width),
        }
    }
    if calls > 1 {
        // The sliced images and their concatenation.
        heap.alloc(image(batch, height, width));
    }
    Ok(DecodeEstimate {
        weights: config.weight_bytes(dtype),
        activations: heap.peak,
        attention_scores: heap.attention_scores,
        feature_maps: heap.feature_map_peak,
    })
}

/// What the replay needs to know besides the shapes.
struct Model<'a> {
    config: &'a VaeConfig,
    /// Bytes per element in the decode dtype.
    elem: u64,
    threads: u64,
    options: &'a DecodeOptions,
}

/// A counter of live heap bytes with its peak, and the decoder's allocations replayed on it.
struct Heap<'a> {
    model: Model<'a>,
    live: u64,
    peak: u64,
    /// The peak outside the mid-block attention.
    feature_map_peak: u64,
    attention_scores: u64,
    in_attention: bool,
}

impl<'a> Heap<'a> {
    fn new(model: Model<'a>) -> Self {
        Self { model, live: 0, peak: 0, feature_map_peak: 0, attention_scores: 0, in_attention: false }
    }

    fn alloc(&mut self, bytes: u64) -> u64 {
        self.live += bytes;
        self.peak = self.peak.max(self.live);
        if !self.in_attention {
            self.feature_map_peak = self.feature_map_peak.max(self.live);
        }
        bytes
    }

    fn free(&mut self, bytes: u64) {
        self.live -= bytes;
    }

    /// Bytes of a `[batch, channels, pixels]` feature map in the decode dtype.
    fn map(&self, batch: u64, channels: usize, pixels: u64) -> u64 {
        batch * channels as u64 * pixels * self.model.elem
    }

    /// `Decoder::forward` (after `post_quant_conv`) on `[batch, C, height, width]` latents; leaves
    /// the image allocated.
    fn decode(&mut self, batch: u64, height: u64, width: u64) {
        let config = self.model.config;
        let channels = &config.block_out_channels;
        let (Some(&first), Some(&last)) = (channels.first(), channels.last()) else { return };
        let pixels = height * width;
        if config.use_post_quant_conv {
            let latent_channels = config.latent_channels;
            let out = self.conv(batch, latent_channels, latent_channels, pixels, 1);
            self.decode_from(batch, pixels, first, last);
            self.free(out);
            return;
        }
        self.decode_from(batch, pixels, first, last);
    }

    fn decode_from(&mut self, batch: u64, latent_pixels: u64, first: usize, last: usize) {
        let config = self.model.config;
        let conv_in = self.conv(batch, config.latent_channels, last, latent_pixels, 3);
        let mut xs = self.mid_block_per_image(batch, last, latent_pixels);
        self.free(conv_in);
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let mut pixels = latent_pixels;
        for (block_idx, &c_out) in reversed.iter().enumerate() {
            let c_in = reversed[block_idx.saturating_sub(1)];
            let upsample = block_idx + 1 < reversed.len();
            let out = self.up_block(batch, c_in, c_out, pixels, upsample);
            self.free(xs);
            xs = out;
            if upsample {
                pixels *= 4;
            }
        }
        let normed = self.group_norm(batch, first, pixels);
        let activated = self.alloc(self.map(batch, first, pixels));
        let _image = self.conv(batch, first, config.out_channels, pixels, 3);
        self.free(activated + normed + xs);
    }

    fn mid_block_per_image(&mut self, batch: u64, channels: usize, pixels: u64) -> u64 {
        if batch == 1 {
            return self.mid_block(channels, pixels);
        }
        let mut images = 0;
        for _ in 0..batch {
            images += self.mid_block(channels, pixels);
        }
        let out = self.alloc(images);
        self.free(images);
        out
    }

    /// `MidBlock::forward` on one image: its `let` bindings keep every stage's output alive.
    fn mid_block(&mut self, channels: usize, pixels: u64) -> u64 {
        let first = self.resnet(1, channels, channels, pixels);
        let attended = self.attention(channels, pixels);
        let out = self.resnet(1, channels, channels, pixels);
        self.free(first + attended);
        out
    }

    /// `MidAttention::forward` on one image.
    fn attention(&mut self, channels: usize, positions: u64) -> u64 {
        let was_in_attention = std::mem::replace(&mut self.in_attention, true);
        let map = self.map(1, channels, positions);
        let map_f32 = channels as u64 * positions * 4;
        let cast = self.model.elem != 4;
        let normed = self.group_norm(1, channels, positions);
        let mut held = normed;
        // Query, key and value: a matmul, its bias sum, and the f32 cast.
        for _ in 0..3 {
            let product = self.alloc(map);
            let biased = self.alloc(map);
            self.free(product);
            if cast {
                held += self.alloc(map_f32);
                self.free(biased);
            } else {
                held += biased;
            }
        }
        // The scaled keys.
        held += self.alloc(map_f32);
        let chunk = match self.model.options.attention_chunk {
            Some(chunk) if chunk > 0 && (chunk as u64) < positions => chunk as u64,
            _ => positions,
        };
        let mut chunks = 0;
        let mut start = 0;
        while start < positions {
            let queries = chunk.min(positions - start);
            let scores_bytes = queries * positions * 4;
            let scaled = self.alloc(queries * channels as u64 * 4);
            let scores = self.alloc(scores_bytes);
            self.free(scaled);
            // softmax: the shifted scores, their exponentials and the quotient.
            let softmax = self.alloc(3 * scores_bytes);
            self.attention_scores = self.attention_scores.max(scores + softmax);
            self.free(2 * scores_bytes);
            chunks += self.alloc(queries * channels as u64 * 4);
            self.free(scores + scores_bytes);
            start += queries;
        }
        if chunk < positions {
            let joined = self.alloc(map_f32);
            self.free(chunks);
            chunks = joined;
        }
        held += chunks;
        if cast {
            held += self.alloc(map);
        }
        // proj_attn (matmul and bias), the transposed reshape's copy, the residual sum.
        let product = self.alloc(map);
        let biased = self.alloc(map);
        self.free(product);
        let reshaped = self.alloc(map);
        let out = self.alloc(map);
        self.free(held + biased + reshaped);
        self.in_attention = was_in_attention;
        out
    }

    /// `UpDecoderBlock2D::forward`: its input stays alive (the caller holds it).
    fn up_block(&mut self, batch: u64, c_in: usize, c_out: usize, pixels: u64, upsample: bool) -> u64 {
        let mut xs = self.resnet(batch, c_in, c_out, pixels);
        for _ in 0..self.model.config.layers_per_block {
            let out = self.resnet(batch, c_out, c_out, pixels);
            self.free(xs);
            xs = out;
        }
        if !upsample {
            return xs;
        }
        let upsampled = self.alloc(self.map(batch, c_out, 4 * pixels));
        let out = self.conv(batch, c_out, c_out, 4 * pixels, 3);
        self.free(upsampled + xs);
        out
    }

    /// candle-transformers' `ResnetBlock2D::forward`: the shortcut and the first norm live until
    /// it returns, as do both convolutions' outputs.
    fn resnet(&mut self, batch: u64, c_in: usize, c_out: usize, pixels: u64) -> u64 {
        let shortcut = if c_in == c_out { 0 } else { self.conv(batch, c_in, c_out, pixels, 1) };
        let normed = self.group_norm(batch, c_in, pixels);
        let activated = self.alloc(self.map(batch, c_in, pixels));
        let first = self.conv(batch, c_in, c_out, pixels, 3);
        self.free(activated);
        let normed_2 = self.group_norm(batch, c_out, pixels);
        let activated_2 = self.alloc(self.map(batch, c_out, pixels));
        let second = self.conv(batch, c_out, c_out, pixels, 3);
        self.free(activated_2 + normed_2);
        let sum = self.alloc(self.map(batch, c_out, pixels));
        let out = self.alloc(self.map(batch, c_out, pixels));
        self.free(sum + second + first + normed + shortcut);
        out
    }

    /// candle-nn's `GroupNorm::forward`: f32 internals, four full-size temporaries at its peak.
    fn group_norm(&mut self, batch: u64, channels: usize, pixels: u64) -> u64 {
        let map = self.map(batch, channels, pixels);
        let map_f32 = batch * channels as u64 * pixels * 4;
        let cast = self.model.elem != 4;
        let upcast = if cast { self.alloc(map_f32) } else { 0 };
        let centered = self.alloc(map_f32);
        let squared = self.alloc(map_f32);
        self.free(squared);
        let normed = self.alloc(map_f32);
        let downcast = if cast { self.alloc(map) } else { 0 };
        let scaled = self.alloc(map);
        let out = self.alloc(map);
        self.free(upcast + centered + normed + downcast + scaled);
        out
    }

    /// candle-nn's `Conv2d::forward` with a `kernel`² kernel, same padding, then its bias.
    fn conv(&mut self, batch: u64, c_in: usize, c_out: usize, pixels: u64, kernel: u64) -> u64 {
        let elem = self.model.elem;
        let (c_in, c_out) = (c_in as u64, c_out as u64);
        let out = self.alloc(batch * c_out * pixels * elem);
        let workspace = if kernel == 1 {
            // `conv2d_1x1`: per image (in parallel), the input as `[c_in, pixels]` and the product.
            batch.min(self.model.threads) * (c_in + c_out) * pixels * elem
        } else {
            // `conv2d_tiled`: the input in NHWC, the flattened kernel, and per thread an im2col
            // tile, its product, its coordinates and gemm's packing of the tile.
            let tiles = (batch * pixels).div_ceil(CONV_TILE_PIXELS).min(self.model.threads);
            let k_size = c_in * kernel * kernel;
            let tile = (2 * k_size + c_out) * CONV_TILE_PIXELS * elem + CONV_TILE_PIXELS * 16;
            batch * c_in * pixels * elem + c_out * k_size * elem + tiles * tile
        };
        self.alloc(workspace);
        self.free(workspace);
        let biased = self.alloc(batch * c_out * pixels * elem);
        self.free(out);
        biased
    }
}

/// The smallest query chunk [`DecodeOptions::for_budget`] picks: below it the score matrix is
/// small beside the feature maps, and gemm takes its small-matrix paths, whose rounding differs
/// from the unchunked product (chunks of 333 and 1024 queries were bit-identical to it on the CPU,
/// chunks of 64 and 1 were not; see the golden test).
const MIN_AUTO_CHUNK: usize = 256;

/// The smallest latent tile [`DecodeOptions::for_budget`] picks (256 image pixels for Flux).
const MIN_AUTO_TILE: usize = 32;

/// What [`DecodeOptions::for_budget`] chose, and what it costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeChoice {
    pub options: DecodeOptions,
    pub estimate: DecodeEstimate,
    /// `Some(bytes)` when tiling was chosen because no untiled decode fits: the smallest untiled
    /// decode's total (weights and activations).
    pub tiled_to_fit: Option<u64>,
}

impl DecodeChoice {
    /// A sentence for the user when tiling was chosen to fit (it changes the image).
    pub fn notice(&self, budget_bytes: u64) -> Option<String> {
        let untiled = self.tiled_to_fit?;
        Some(format!(
            "the VAE decodes in tiles (blended seams: the image differs slightly from an untiled decode): \
             untiled it needs {}, the budget is {}; a larger --budget avoids it",
            hidream_memory::format_bytes(untiled),
            hidream_memory::format_bytes(budget_bytes)
        ))
    }
}

impl DecodeOptions {
    /// The options under which a decode of `latents` in `dtype` fits `budget_bytes` (weights and
    /// activations), keeping what `forced` sets: its tiling, slicing and attention chunk.
    ///
    /// In order, it takes the first that fits: the forced options alone; the mid-block attention
    /// in query chunks (halving from the largest power of two below the positions, not below
    /// 256; the same function, see [`DecodeOptions::attention_chunk`]); the same with slicing;
    /// then diffusers' default tiling (which changes the image, so the choice says so in
    /// [`DecodeChoice::tiled_to_fit`]), chunked and sliced likewise, then tiles of half that side,
    /// and so on down to 32 latent pixels (a latent no larger than a tile is not tiled, so at
    /// 1024² diffusers' 128-pixel tiles do not help). If even that does not fit,
    /// [`PipelineError::VaeBudgetTooSmall`] names the smallest budget that does.
    pub fn for_budget(
        config: &VaeConfig,
        latents: LatentSize,
        dtype: DType,
        budget_bytes: u64,
        forced: &DecodeOptions,
    ) -> Result<DecodeChoice> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        choose(config, latents, dtype, budget_bytes, forced, threads)
    }
}

/// [`DecodeOptions::for_budget`] on `threads` worker threads.
pub(super) fn choose(
    config: &VaeConfig,
    latents: LatentSize,
    dtype: DType,
    budget_bytes: u64,
    forced: &DecodeOptions,
    threads: u64,
) -> Result<DecodeChoice> {
    let slicings: &[bool] = if forced.slicing || latents.batch == 1 { &[forced.slicing] } else { &[false, true] };
    let mut smallest: Option<DecodeEstimate> = None;
    let tilings = match forced.tiling {
        Some(tiling) => vec![(Some(tiling), false)],
        None => {
            // diffusers' tiles, then halves of them while they stay aligned and at least
            // `MIN_AUTO_TILE` latent pixels (a latent of one tile is not tiled at all).
            let mut tilings = vec![(None, false)];
            let mut tiling = config.default_tiling();
            while tiling.tile_latent_size >= MIN_AUTO_TILE
                && TilePlan::new(&tiling, config.upscale(), latents.height, latents.width).is_ok()
            {
                tilings.push((Some(tiling), true));
                tiling.tile_latent_size /= 2;
            }
            tilings
        }
    };
    let mut smallest_untiled: Option<u64> = None;
    for (tiling, tiled_to_fit) in tilings {
        for &slicing in slicings {
            let options = DecodeOptions { tiling, slicing, ..*forced };
            let (options, estimate) = chunk_to_fit(config, latents, dtype, budget_bytes, options, threads)?;
            if estimate.total() <= budget_bytes {
                let tiled_to_fit = if tiled_to_fit { smallest_untiled } else { None };
                return Ok(DecodeChoice { options, estimate, tiled_to_fit });
            }
            if !tiled_to_fit {
                smallest_untiled = Some(smallest_untiled.map_or(estimate.total(), |s| s.min(estimate.total())));
            }
            if smallest.is_none_or(|smallest| estimate.total() < smallest.total()) {
                smallest = Some(estimate);
            }
        }
    }
    let minimum = smallest.map_or(0, |estimate| estimate.total());
    Err(PipelineError::VaeBudgetTooSmall { budget: budget_bytes, minimum })
}

/// `options` with the largest automatic attention chunk that fits the budget (unless `options`
/// forces one), or the smallest one tried.
fn chunk_to_fit(
    config: &VaeConfig,
    latents: LatentSize,
    dtype: DType,
    budget_bytes: u64,
    options: DecodeOptions,
    threads: u64,
) -> Result<(DecodeOptions, DecodeEstimate)> {
    let mut estimate = estimate(config, latents, dtype, &options, threads)?;
    if estimate.total() <= budget_bytes || options.attention_chunk.is_some_and(|chunk| chunk > 0) {
        return Ok((options, estimate));
    }
    let mut best = options;
    let positions = attention_positions(latents, &options);
    let mut chunk = positions.next_power_of_two() / 2;
    // Chunking helps only while the attention sets the peak.
    while chunk >= MIN_AUTO_CHUNK && estimate.activations > estimate.feature_maps {
        let candidate = DecodeOptions { attention_chunk: Some(chunk), ..options };
        estimate = self::estimate(config, latents, dtype, &candidate, threads)?;
        best = candidate;
        if estimate.total() <= budget_bytes {
            break;
        }
        chunk /= 2;
    }
    Ok((best, estimate))
}

/// The positions one mid-block attention covers: the latent's, or its largest tile's.
fn attention_positions(latents: LatentSize, options: &DecodeOptions) -> usize {
    let (height, width) = match &options.tiling {
        Some(tiling) if latents.height > tiling.tile_latent_size || latents.width > tiling.tile_latent_size => {
            (latents.height.min(tiling.tile_latent_size), latents.width.min(tiling.tile_latent_size))
        }
        _ => (latents.height, latents.width),
    };
    height * width
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vae::Tiling;

    const THREADS: u64 = 2;

    fn flux_total(latents: LatentSize, options: DecodeOptions) -> u64 {
        estimate(&VaeConfig::flux(), latents, DType::F32, &options, THREADS).expect("estimate").total()
    }

    fn check(latents: LatentSize, budget: u64, forced: DecodeOptions) -> Result<DecodeChoice> {
        let choice = choose(&VaeConfig::flux(), latents, DType::F32, budget, &forced, THREADS)?;
        assert!(choice.estimate.total() <= budget, "{choice:?} over the budget {budget}");
        assert_eq!(choice.estimate.total(), flux_total(latents, choice.options), "estimate of another choice");
        Ok(choice)
    }

    /// 1536² images: the unchunked attention (4 × 5.1 GiB of scores) sets the peak.
    const ONE: LatentSize = LatentSize { batch: 1, height: 192, width: 192 };
    const TWO: LatentSize = LatentSize { batch: 2, height: 192, width: 192 };

    #[test]
    fn a_decode_that_fits_is_left_alone() {
        let choice = check(ONE, u64::MAX, DecodeOptions::default()).expect("fits");
        assert_eq!((choice.options, choice.tiled_to_fit), (DecodeOptions::default(), None));
    }

    #[test]
    fn attention_is_chunked_first() {
        let unchunked = flux_total(ONE, DecodeOptions::default());
        let choice = check(ONE, unchunked - 1, DecodeOptions::default()).expect("chunked fits");
        let chunk = choice.options.attention_chunk.expect("a chunk");
        assert!((MIN_AUTO_CHUNK..192 * 192).contains(&chunk) && chunk.is_power_of_two(), "chunk {chunk}");
        assert!(!choice.options.slicing && choice.options.tiling.is_none() && choice.tiled_to_fit.is_none());
        // The largest chunk that fits: twice it does not.
        let larger = DecodeOptions { attention_chunk: Some(2 * chunk), ..choice.options };
        assert!(2 * chunk >= 192 * 192 || flux_total(ONE, larger) > unchunked - 1);
    }

    #[test]
    fn then_the_batch_is_sliced() {
        let chunked = DecodeOptions { attention_chunk: Some(MIN_AUTO_CHUNK), ..DecodeOptions::default() };
        let budget = flux_total(TWO, chunked) - 1;
        let choice = check(TWO, budget, DecodeOptions::default()).expect("sliced fits");
        assert!(choice.options.slicing && choice.options.tiling.is_none(), "{choice:?}");
    }

    #[test]
    fn tiling_is_the_last_resort_and_says_so() {
        let smallest_untiled = DecodeOptions { attention_chunk: Some(MIN_AUTO_CHUNK), slicing: true, tiling: None };
        let untiled = flux_total(TWO, smallest_untiled);
        let choice = check(TWO, untiled - 1, DecodeOptions::default()).expect("tiled fits");
        assert_eq!(choice.options.tiling, Some(VaeConfig::flux().default_tiling()));
        assert_eq!(choice.tiled_to_fit, Some(untiled));
        assert!(choice.notice(untiled - 1).is_some_and(|notice| notice.contains("tiles")));
    }

    /// At 1024² diffusers' 128-latent-pixel tiles cover the latent whole; halved tiles help.
    #[test]
    fn tiles_are_halved_when_diffusers_tiles_do_not_tile() {
        let latents = LatentSize { batch: 1, height: 128, width: 128 };
        let untiled = flux_total(latents, DecodeOptions::default());
        let choice = check(latents, untiled - 1, DecodeOptions::default()).expect("halved tiles fit");
        let tiling = choice.options.tiling.expect("tiled");
        assert_eq!(tiling.tile_latent_size, 64);
        assert_eq!(choice.tiled_to_fit, Some(untiled));
    }

    #[test]
    fn too_small_a_budget_names_the_minimum() {
        let err = check(TWO, 1 << 20, DecodeOptions::default()).expect_err("1 MiB fits");
        let PipelineError::VaeBudgetTooSmall { budget, minimum } = err else { panic!("{err}") };
        assert_eq!(budget, 1 << 20);
        assert!(err_message_has_both(minimum, budget));
        // The minimum is exact: it fits, a byte less does not.
        check(TWO, minimum, DecodeOptions::default()).expect("the minimum fits");
        assert!(check(TWO, minimum - 1, DecodeOptions::default()).is_err());
    }

    fn err_message_has_both(minimum: u64, budget: u64) -> bool {
        let message = PipelineError::VaeBudgetTooSmall { budget, minimum }.to_string();
        message.contains(&hidream_memory::format_bytes(minimum)) && message.contains("--budget")
    }

    #[test]
    fn forced_options_are_kept() {
        let tiling = Some(Tiling { tile_latent_size: 64, overlap_factor: 0.25 });
        let forced = DecodeOptions { tiling, ..DecodeOptions::default() };
        let choice = check(TWO, u64::MAX, forced).expect("fits");
        assert_eq!((choice.options, choice.tiled_to_fit), (forced, None));
        // A forced chunk stays even where it does not fit: the choice slices instead.
        let forced = DecodeOptions { attention_chunk: Some(192 * 192), ..DecodeOptions::default() };
        let budget = flux_total(TWO, forced) - 1;
        let choice = check(TWO, budget, forced).expect("sliced fits");
        assert_eq!(choice.options.attention_chunk, forced.attention_chunk);
        assert!(choice.options.slicing);
    }
}
