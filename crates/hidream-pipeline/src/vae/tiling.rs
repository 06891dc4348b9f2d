//! Tiled decoding, as diffusers' `AutoencoderKL.tiled_decode` does it (diffusers 0.42.1,
//! `autoencoder_kl.py`): overlapping latent tiles, each decoded alone, each blended linearly into
//! the tile above it and the tile to its left, then cropped and stitched.
//!
//! The blends read the *already blended* neighbours (diffusers blends in place, row by row), so
//! the result depends on the order; this file keeps that order. Unlike diffusers, it holds only
//! the previous row of decoded tiles rather than all of them.

use candle_core::{DType, Result, Tensor};

use crate::PipelineError;

/// Overlapping latent tiles with blended seams (diffusers' `vae.enable_tiling()`).
///
/// The image side of a tile is `tile_latent_size × upscale` (`upscale` = 8 for Flux), which is what
/// diffusers' `tile_sample_min_size` is whenever it is consistent with `tile_latent_min_size`.
/// Tiled output differs from untiled output: every tile has its own GroupNorm statistics and its
/// own attention, and the seams are blended rather than computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// The side of a latent tile (diffusers' `tile_latent_min_size`). A latent no larger than this
    /// in both directions is decoded whole.
    pub tile_latent_size: usize,
    /// The fraction of a tile shared with its neighbour (diffusers' `tile_overlap_factor`, 0.25).
    pub overlap_factor: f64,
}

impl Tiling {
    /// diffusers' overlap factor (`AutoencoderKL.__init__`: `self.tile_overlap_factor = 0.25`).
    pub const DIFFUSERS_OVERLAP: f64 = 0.25;
}

/// The geometry of one tiled decode, with diffusers' names and integer arithmetic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TilePlan {
    tile_latent_size: usize,
    /// diffusers' `overlap_size`: how far apart tiles start, in latent pixels.
    stride: usize,
    /// diffusers' `blend_extent`: how many image pixels of a seam are blended.
    blend_extent: usize,
    /// diffusers' `row_limit`: how many image pixels of each tile are kept.
    row_limit: usize,
    row_starts: Vec<usize>,
    col_starts: Vec<usize>,
}

impl TilePlan {
    /// Plans the tiles of a `height × width` latent, or says why `tiling` cannot tile it without
    /// a misaligned result.
    pub(crate) fn new(tiling: &Tiling, upscale: usize, height: usize, width: usize) -> crate::Result<Self> {
        let Tiling { tile_latent_size, overlap_factor } = *tiling;
        let invalid = |problem: String| PipelineError::invalid("vae tiling", problem);
        if !(0.0..1.0).contains(&overlap_factor) {
            return Err(invalid(format!("overlap_factor {overlap_factor} is not in [0, 1)")));
        }
        // The same float arithmetic and truncation as diffusers' `int(...)`.
        let tile_sample_size = tile_latent_size * upscale;
        let stride = (tile_latent_size as f64 * (1.0 - overlap_factor)) as usize;
        let blend_extent = (tile_sample_size as f64 * overlap_factor) as usize;
        let row_limit = tile_sample_size - blend_extent;
        if stride == 0 {
            return Err(invalid(format!(
                "tile_latent_size {tile_latent_size} with overlap_factor {overlap_factor} leaves tiles 0 latent pixels apart"
            )));
        }
        if row_limit != stride * upscale {
            return Err(invalid(format!(
                "tile_latent_size {tile_latent_size} with overlap_factor {overlap_factor}: tiles start {} pixels apart \
                 but keep {row_limit}, so the image would not line up; make tile_latent_size × overlap_factor a whole number",
                stride * upscale
            )));
        }
        Ok(Self {
            tile_latent_size,
            stride,
            blend_extent,
            row_limit,
            row_starts: (0..height).step_by(stride).collect(),
            col_starts: (0..width).step_by(stride).collect(),
        })
    }
}

impl TilePlan {
    /// The largest latent tile of a `height × width` latent: `(rows, columns)`.
    pub(crate) fn largest_tile(&self, height: usize, width: usize) -> (usize, usize) {
        (self.tile_latent_size.min(height), self.tile_latent_size.min(width))
    }

    /// How many tiles a row of tiles has.
    pub(crate) fn columns(&self) -> usize {
        self.col_starts.len()
    }
}

/// Decodes `latents` `[B, C, h, w]` tile by tile with `decode_tile` and stitches the result.
pub(crate) fn tiled_decode(
    latents: &Tensor,
    plan: &TilePlan,
    decode_tile: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, height, width) = latents.dims4()?;
    let mut previous_row: Vec<Tensor> = Vec::new();
    let mut stitched_rows = Vec::with_capacity(plan.row_starts.len());
    for &row_start in &plan.row_starts {
        let rows = latents.narrow(2, row_start, plan.tile_latent_size.min(height - row_start))?;
        let mut row: Vec<Tensor> = Vec::with_capacity(plan.col_starts.len());
        for (col_idx, &col_start) in plan.col_starts.iter().enumerate() {
            let tile = rows.narrow(3, col_start, plan.tile_latent_size.min(width - col_start))?;
            let mut decoded = decode_tile(&tile)?;
            if let Some(above) = previous_row.get(col_idx) {
                decoded = blend(above, &decoded, 2, plan.blend_extent)?;
            }
            if let Some(left) = row.last() {
                decoded = blend(left, &decoded, 3, plan.blend_extent)?;
            }
            row.push(decoded);
        }
        let cropped = row.iter().map(|tile| crop(tile, plan.row_limit)).collect::<Result<Vec<_>>>()?;
        stitched_rows.push(Tensor::cat(&cropped, 3)?);
        previous_row = row;
    }
    Tensor::cat(&stitched_rows, 2)
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows (columns) of
/// `tile` fade in from the last `extent` rows (columns) of `neighbour`,
/// `tile[y] = neighbour[-extent + y] · (1 − y/extent) + tile[y] · (y/extent)`.
///
/// The weights are computed in f64 and rounded to f32, each product is rounded to the tile's
/// dtype and so is the sum, as torch does for `a * float + b * float` on a float or bf16 tensor.
fn blend(neighbour: &Tensor, tile: &Tensor, dim: usize, blend_extent: usize) -> Result<Tensor> {
    let (neighbour_len, tile_len) = (neighbour.dim(dim)?, tile.dim(dim)?);
    let extent = blend_extent.min(neighbour_len).min(tile_len);
    if extent == 0 {
        return Ok(tile.clone());
    }
    let dtype = tile.dtype();
    let opmath = opmath_dtype(dtype);
    let mut weight_shape = [1usize; 4];
    weight_shape[dim] = extent;
    let weights = |f: &dyn Fn(f64) -> f64| {
        let values: Vec<f32> = (0..extent).map(|y| f(y as f64 / extent as f64) as f32).collect();
        Tensor::from_vec(values, weight_shape.as_slice(), tile.device())?.to_dtype(opmath)
    };
    let fade_out = weights(&|t| 1.0 - t)?;
    let fade_in = weights(&|t| t)?;
    let old = neighbour.narrow(dim, neighbour_len - extent, extent)?.to_dtype(opmath)?;
    let new = tile.narrow(dim, 0, extent)?.to_dtype(opmath)?;
    let old = old.broadcast_mul(&fade_out)?.to_dtype(dtype)?.to_dtype(opmath)?;
    let new = new.broadcast_mul(&fade_in)?.to_dtype(dtype)?.to_dtype(opmath)?;
    let blended = (old + new)?.to_dtype(dtype)?;
    if extent == tile_len {
        return Ok(blended);
    }
    Tensor::cat(&[blended, tile.narrow(dim, extent, tile_len - extent)?], dim)
}

/// diffusers' `tile[:, :, :row_limit, :row_limit]`.
fn crop(tile: &Tensor, row_limit: usize) -> Result<Tensor> {
    let (_, _, height, width) = tile.dims4()?;
    tile.narrow(2, 0, row_limit.min(height))?.narrow(3, 0, row_limit.min(width))
}

/// The dtype torch computes elementwise operations in: f32 for the half types.
pub(super) fn opmath_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};
    use proptest::prelude::*;

    use super::*;

    fn plan(tile_latent_size: usize, overlap_factor: f64, height: usize, width: usize) -> TilePlan {
        TilePlan::new(&Tiling { tile_latent_size, overlap_factor }, 8, height, width).expect("valid tiling")
    }

    /// The Flux defaults: 128-pixel latent tiles every 96, blended over 256 image pixels, 768 kept.
    #[test]
    fn flux_default_geometry() {
        let plan = plan(128, 0.25, 200, 128);
        assert_eq!((plan.stride, plan.blend_extent, plan.row_limit), (96, 256, 768));
        assert_eq!(plan.row_starts, [0, 96, 192]);
        assert_eq!(plan.col_starts, [0, 96]);
    }

    #[test]
    fn misaligned_tilings_are_refused() {
        let tiling = |tile_latent_size, overlap_factor| Tiling { tile_latent_size, overlap_factor };
        for bad in [tiling(5, 0.25), tiling(1, 0.25), tiling(4, 1.0), tiling(4, -0.1), tiling(4, f64::NAN)] {
            let err = TilePlan::new(&bad, 8, 16, 16).expect_err("misaligned tiling accepted");
            assert!(matches!(err, PipelineError::Invalid { .. }), "{bad:?}: {err}");
        }
        plan(4, 0.0, 16, 16);
    }

    /// A "decoder" that is exactly translation-equivariant (nearest 2× upsampling) gives the same
    /// image tiled and untiled: the seams blend two equal values, so only rounding of the blend can
    /// differ. This pins the tile offsets, crops and blend directions.
    fn check_equivariant(height: usize, width: usize, tile_latent_size: usize, overlap_factor: f64) {
        let device = Device::Cpu;
        let latents = Tensor::randn(0f32, 1.0, (2, 3, height, width), &device).expect("randn");
        let upsample = |xs: &Tensor| {
            let (_, _, h, w) = xs.dims4()?;
            xs.upsample_nearest2d(2 * h, 2 * w)
        };
        let plan = TilePlan::new(&Tiling { tile_latent_size, overlap_factor }, 2, height, width).expect("plan");
        let tiled = tiled_decode(&latents, &plan, upsample).expect("tiled decode");
        let whole = upsample(&latents).expect("upsample");
        assert_eq!(tiled.dims(), whole.dims());
        let diff: f32 =
            (tiled - whole).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(diff <= 1e-6, "{height}x{width}, tile {tile_latent_size}: tiled differs by {diff}");
    }

    #[test]
    fn equivariant_decoder_is_unchanged_by_tiling() {
        check_equivariant(8, 8, 4, 0.25);
        check_equivariant(6, 10, 4, 0.25);
        check_equivariant(9, 5, 4, 0.5);
        check_equivariant(3, 3, 4, 0.25);
    }

    /// The blend weights are diffusers' ramp: the first blended row is all neighbour, the row at
    /// `extent` is all tile.
    #[test]
    fn blend_ramps_from_neighbour_to_tile() {
        let device = Device::Cpu;
        let neighbour = Tensor::ones((1, 1, 6, 2), DType::F32, &device).unwrap();
        let tile = Tensor::zeros((1, 1, 6, 2), DType::F32, &device).unwrap();
        let blended = blend(&neighbour, &tile, 2, 4).unwrap();
        let column: Vec<f32> = blended.i((0, 0, .., 0)).unwrap().to_vec1().unwrap();
        assert_eq!(column, [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
    }

    proptest! {
        /// Valid plans cover the image exactly: the kept parts of the tiles add up to the image size.
        #[test]
        fn crops_cover_the_image(tile_latent_size in 1usize..40, quarters in 0usize..4, height in 1usize..200, width in 1usize..200, upscale in prop::sample::select(vec![1usize, 2, 4, 8])) {
            let tiling = Tiling { tile_latent_size, overlap_factor: quarters as f64 / 4.0 };
            if let Ok(plan) = TilePlan::new(&tiling, upscale, height, width) {
                for (starts, len) in [(&plan.row_starts, height), (&plan.col_starts, width)] {
                    let kept: usize = starts
                        .iter()
                        .map(|&start| plan.row_limit.min(upscale * tiling.tile_latent_size.min(len - start)))
                        .sum();
                    prop_assert_eq!(kept, upscale * len);
                }
            } else {
                prop_assert!(tile_latent_size * quarters % 4 != 0);
            }
        }
    }
}
