//! Image sizes in one order, width × height (as diffusers' `width` and `height` arguments and
//! image viewers give them), and diffusers' rescaling of a requested size.

use std::fmt;
use std::str::FromStr;

use crate::{PipelineError, Result};

/// Pixels per latent pixel of the Flux VAE (`2 ** (len(block_out_channels) - 1)`).
pub const VAE_SCALE_FACTOR: usize = 8;

/// An image size in pixels, written and parsed as `WIDTHxHEIGHT` (`1360x768` is landscape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ImageSize {
    pub width: usize,
    pub height: usize,
}

impl ImageSize {
    pub fn new(width: usize, height: usize) -> Self {
        ImageSize { width, height }
    }

    pub fn is_square(self) -> bool {
        self.width == self.height
    }

    /// The latent `(height, width)`, in the order of a latent tensor `[B, C, H, W]`, after checking
    /// that both sides are positive multiples of `vae_scale_factor × patch_size` pixels.
    pub fn latent_height_width(self, vae_scale_factor: usize, patch_size: usize) -> Result<(usize, usize)> {
        let multiple = vae_scale_factor.saturating_mul(patch_size);
        for (side, value) in [("width", self.width), ("height", self.height)] {
            if value == 0 || multiple == 0 || !value.is_multiple_of(multiple) {
                return Err(PipelineError::invalid(
                    format!("image size {self} (width x height)"),
                    format!(
                        "the {side} {value} is not a positive multiple of {multiple} pixels (VAE factor \
                         {vae_scale_factor} × patch size {patch_size})"
                    ),
                ));
            }
        }
        Ok((self.height / vae_scale_factor, self.width / vae_scale_factor))
    }
}

impl fmt::Display for ImageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for ImageSize {
    type Err = PipelineError;

    /// `WIDTHxHEIGHT` (also `X` or `×`), each a whole number of at least 1.
    fn from_str(text: &str) -> Result<Self> {
        let invalid = |problem: String| PipelineError::invalid(format!("size `{text}`"), problem);
        let Some((width, height)) = text.split_once(['x', 'X', '×']) else {
            return Err(invalid("expected WIDTHxHEIGHT in pixels, width first, like 1360x768".into()));
        };
        let side = |name: &str, value: &str| -> Result<usize> {
            let value = value.trim();
            match value.parse::<usize>() {
                Ok(0) => Err(invalid(format!("the {name} must be at least 1 pixel"))),
                Ok(pixels) => Ok(pixels),
                Err(err) if *err.kind() == std::num::IntErrorKind::PosOverflow => {
                    Err(invalid(format!("the {name} {value} is too large")))
                }
                Err(_) => Err(invalid(format!(
                    "the {name} `{value}` is not a whole number; expected WIDTHxHEIGHT in pixels, like 1360x768"
                ))),
            }
        };
        Ok(ImageSize { width: side("width", width)?, height: side("height", height)? })
    }
}

/// diffusers' rescaling of a requested `(width, height)`: about `(default_sample_size ·
/// vae_scale_factor)²` pixels in area, each side rounded down to a multiple of
/// `2 · vae_scale_factor`. `None` is the default size, `default_sample_size · vae_scale_factor`
/// squared.
///
/// A side that rounds down to nothing (an aspect ratio far beyond what the area allows) is an
/// error rather than an empty image; so is a zero or overflowing size.
pub fn pipeline_size(
    requested: Option<(usize, usize)>,
    vae_scale_factor: usize,
    default_sample_size: usize,
) -> Result<(usize, usize)> {
    let default_side = default_sample_size.checked_mul(vae_scale_factor).filter(|side| *side > 0).ok_or_else(|| {
        PipelineError::invalid(
            "default_sample_size",
            format!(
                "{default_sample_size} × VAE factor {vae_scale_factor} must be a positive number of pixels that \
                     fits in memory"
            ),
        )
    })?;
    let (width, height) = requested.unwrap_or((default_side, default_side));
    if width == 0 || height == 0 {
        return Err(PipelineError::invalid(format!("size {width}x{height}"), "width and height must be at least 1"));
    }
    let division = vae_scale_factor.saturating_mul(2) as f64;
    let side_pixels = default_side as f64;
    let scale = (side_pixels * side_pixels / (width as f64 * height as f64)).sqrt();
    let side = |x: usize| ((x as f64 * scale / division).floor() * division) as usize;
    let rescaled = (side(width), side(height));
    if rescaled.0 == 0 || rescaled.1 == 0 {
        return Err(PipelineError::invalid(
            format!("size {width}x{height} (width x height)"),
            format!(
                "rescaled to about {default_side}² pixels in area it becomes {}x{}: the aspect ratio is too \
                 extreme for multiples of {division} pixels",
                rescaled.0, rescaled.1
            ),
        ));
    }
    Ok(rescaled)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' arithmetic: 1024² stays; 512² and 2048² become 1024²; 1920×1080 keeps its
    /// aspect within multiples of 16.
    #[test]
    fn sizes_rescale_like_diffusers() {
        let check = |requested, expected: Option<(usize, usize)>| {
            assert_eq!(pipeline_size(requested, 8, 128).ok(), expected, "{requested:?}");
        };
        check(None, Some((1024, 1024)));
        check(Some((1024, 1024)), Some((1024, 1024)));
        check(Some((512, 512)), Some((1024, 1024)));
        check(Some((2048, 2048)), Some((1024, 1024)));
        // scale = sqrt(1024² / (1920·1080)) = 0.7111..; 1920·s = 1365.3 -> 1360; 1080·s = 768.0 -> 768
        // (the values Python's `int(w * scale // 16 * 16)` gives). Width comes first.
        check(Some((1920, 1080)), Some((1360, 768)));
        check(Some((1080, 1920)), Some((768, 1360)));
        // The area is computed in f64, so no size overflows; a side that rounds to nothing or a
        // zero side is an error.
        check(Some((usize::MAX, usize::MAX)), Some((1024, 1024)));
        check(Some((100_000, 16)), None);
        check(Some((0, 16)), None);
        assert!(pipeline_size(None, 8, usize::MAX).is_err());
        assert!(pipeline_size(None, 8, 0).is_err());
    }

    #[test]
    fn sizes_parse_width_first() {
        let check = |text: &str, expected: std::result::Result<(usize, usize), &str>| match (
            text.parse::<ImageSize>(),
            expected,
        ) {
            (Ok(size), Ok((width, height))) => assert_eq!(size, ImageSize::new(width, height), "{text}"),
            (Err(err), Err(needle)) => assert!(err.to_string().contains(needle), "{text}: {err}"),
            (got, expected) => panic!("{text}: got {got:?}, expected {expected:?}"),
        };
        check("1360x768", Ok((1360, 768)));
        check(" 1360 X 768 ", Ok((1360, 768)));
        check("1360×768", Ok((1360, 768)));
        check("0x768", Err("width must be at least 1"));
        check("1360x0", Err("height must be at least 1"));
        check("18446744073709551616x16", Err("width 18446744073709551616 is too large"));
        check("12x", Err("the height `` is not a whole number"));
        check("-16x16", Err("the width `-16` is not a whole number"));
        check("1.5x16", Err("not a whole number"));
        check("1024", Err("expected WIDTHxHEIGHT"));
        check("", Err("expected WIDTHxHEIGHT"));
        assert_eq!(ImageSize::new(1360, 768).to_string(), "1360x768");
    }

    #[test]
    fn latent_sides_must_be_multiples() {
        assert_eq!(ImageSize::new(1360, 768).latent_height_width(8, 2).unwrap(), (96, 170));
        let err = ImageSize::new(1000, 1024).latent_height_width(8, 2).unwrap_err().to_string();
        assert!(err.contains("the width 1000 is not a positive multiple of 16"), "{err}");
        let err = ImageSize::new(1024, 1000).latent_height_width(8, 2).unwrap_err().to_string();
        assert!(err.contains("the height 1000"), "{err}");
    }
}
