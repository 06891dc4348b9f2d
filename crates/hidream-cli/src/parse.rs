//! Value parsers of the flags: each turns one bad value into one clear message naming what was
//! expected, which clap prints as the single `error:` line.

use hidream_pipeline::planning::ImageSize;

/// The most steps `generate` and `denoise` take: HiDream's samplers are trained on 1000
/// timesteps, so more steps repeat timesteps (and a typo such as `--steps 100000` would run for
/// days).
pub const MAX_STEPS: usize = 1000;

/// A whole number of at least 1 (`--repeat`, `--attention-chunk`, `--batch`, token counts).
pub fn positive(text: &str) -> Result<usize, String> {
    match whole(text)? {
        0 => Err("must be at least 1".to_owned()),
        value => Ok(value),
    }
}

/// A whole number, 0 allowed (`--prefetch`).
pub fn count(text: &str) -> Result<usize, String> {
    whole(text)
}

/// Denoising steps: 1 to [`MAX_STEPS`].
pub fn steps(text: &str) -> Result<usize, String> {
    match positive(text)? {
        steps if steps > MAX_STEPS => {
            Err(format!("{steps} steps is more than {MAX_STEPS}, the timesteps HiDream's samplers are trained on"))
        }
        steps => Ok(steps),
    }
}

/// The most `--default-sample-size` takes: images of about 8192² pixels.
pub const MAX_SAMPLE_SIZE: usize = 1024;

/// diffusers' `default_sample_size`: 1 to [`MAX_SAMPLE_SIZE`] latent pixels.
pub fn sample_size(text: &str) -> Result<usize, String> {
    match positive(text)? {
        size if size > MAX_SAMPLE_SIZE => Err(format!(
            "{size} is more than {MAX_SAMPLE_SIZE} (images of about {side}² pixels)",
            side = MAX_SAMPLE_SIZE * 8
        )),
        size => Ok(size),
    }
}

/// A u64 seed.
pub fn seed(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    trimmed.parse::<u64>().map_err(|err| match err.kind() {
        std::num::IntErrorKind::PosOverflow => format!("`{trimmed}` is larger than {}", u64::MAX),
        _ => format!("expected a whole number from 0 to {}, got `{trimmed}`", u64::MAX),
    })
}

/// A finite number of at least 0 (`--guidance`).
pub fn non_negative(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(format!("expected a finite number of at least 0, got `{}`", text.trim())),
    }
}

/// A finite number above 0 (`--tflops`).
pub fn positive_number(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() && value > 0.0 => Ok(value),
        _ => Err(format!("expected a positive number, got `{}`", text.trim())),
    }
}

/// An image size in pixels, `WIDTHxHEIGHT`.
pub fn image_size(text: &str) -> Result<ImageSize, String> {
    text.parse::<ImageSize>().map_err(|err| err.to_string())
}

/// A latent size in latent pixels, `WIDTHxHEIGHT`, as `(width, height)`.
pub fn latent_size(text: &str) -> Result<ImageSize, String> {
    text.parse::<ImageSize>().map_err(|err| format!("{err} (latent pixels; the image is 8 times larger)"))
}

/// A folder or a repo id: anything but an empty value.
pub fn non_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        Err("expected a folder or a Hugging Face repo id, got an empty value".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

/// A byte size: `5GB`, `512MiB`, `1073741824`.
pub fn bytes(text: &str) -> Result<u64, String> {
    hidream_memory::parse_bytes(text).map_err(|err| err.to_string())
}

/// A byte size per second: `55GB/s`, `25GiB/s` or a plain size; more than 0.
pub fn bandwidth(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let size = trimmed.strip_suffix("/s").or_else(|| trimmed.strip_suffix("/S")).unwrap_or(trimmed);
    match hidream_memory::parse_bytes(size) {
        Ok(0) => Err("the bandwidth must be more than 0 bytes per second".to_owned()),
        Ok(bytes) => Ok(bytes),
        Err(err) => Err(err.to_string()),
    }
}

/// `D,S`: double and single block counts.
pub fn layers(text: &str) -> Result<(usize, usize), String> {
    let expected = || format!("expected D,S (double and single block counts), like 4,4; got `{text}`");
    let (double, single) = text.split_once(',').ok_or_else(expected)?;
    Ok((whole(double).map_err(|_| expected())?, whole(single).map_err(|_| expected())?))
}

fn whole(text: &str) -> Result<usize, String> {
    let trimmed = text.trim();
    trimmed.parse::<usize>().map_err(|err| match err.kind() {
        std::num::IntErrorKind::PosOverflow => format!("`{trimmed}` is too large (at most {})", usize::MAX),
        _ => format!("expected a whole number, got `{trimmed}`"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_or_say_what_was_expected() {
        fn check<T: PartialEq + std::fmt::Debug>(
            parse: fn(&str) -> Result<T, String>,
            text: &str,
            expected: Result<T, &str>,
        ) {
            match (parse(text), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{text}"),
                (Err(err), Err(needle)) => assert!(err.contains(needle), "{text}: {err}"),
                (got, want) => panic!("{text}: got {got:?}, expected {want:?}"),
            }
        }
        check(positive, "3", Ok(3));
        check(positive, "0", Err("at least 1"));
        check(positive, "-1", Err("whole number"));
        check(positive, "18446744073709551616", Err("too large"));
        check(positive, "1.5.3", Err("whole number"));
        check(positive, "", Err("whole number"));
        check(count, "0", Ok(0));
        check(steps, "1000", Ok(1000));
        check(steps, "1001", Err("more than 1000"));
        check(sample_size, "128", Ok(128));
        check(sample_size, "100000", Err("more than 1024"));
        check(seed, "18446744073709551615", Ok(u64::MAX));
        check(seed, "18446744073709551616", Err("larger than"));
        check(non_negative, "0", Ok(0.0));
        check(non_negative, "nan", Err("finite"));
        check(non_negative, "-1", Err("at least 0"));
        check(positive_number, "0", Err("positive"));
        check(positive_number, "inf", Err("positive"));
        check(bandwidth, "55GB/s", Ok(55_000_000_000));
        check(bandwidth, "1GiB", Ok(1 << 30));
        check(bandwidth, "0GB/s", Err("more than 0"));
        check(bandwidth, "fast", Err("fast"));
        check(layers, "4,0", Ok((4, 0)));
        check(layers, "4", Err("D,S"));
        check(layers, "4,-1", Err("D,S"));
    }
}
