//! Every subcommand with the edge values of each numeric, size, budget and path flag: zero,
//! huge, negative and malformed values are one `error:` line and a non-zero exit (never a panic,
//! an abort or a backtrace); the edge values that are valid run.
//!
//! The cases are a table per subcommand of (flag, value, expectation), run through one
//! [`check`] on a base command line that works. They share one tiny synthetic model
//! (`hidream synth --preset tiny`), made once per test binary, and the tiny pipeline of
//! `tests/golden/pipeline` for `generate`.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a case must do.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Fail with one `error:` line that mentions this fragment.
    Fails(&'static str),
    /// Succeed.
    Runs,
    /// Either, but cleanly (a value whose handling another change decides).
    Clean,
}
use Expect::{Clean, Fails, Runs};

/// Placeholders in values: `{dir}` (the fixture folder), `{model}`, `{inputs}` (a forward input
/// file), `{text}` (a file that is not safetensors), `{golden}` (tests/golden/pipeline),
/// `{transposed}` (latents of the transposed shape for `generate --size 128x64`).
struct Fixture {
    values: HashMap<&'static str, String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // A fixed folder under cargo's per-target scratch space, made afresh by each test binary.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hidream-cli-edges");
        if dir.exists() {
            std::fs::remove_dir_all(&dir).expect("clearing the fixture folder");
        }
        std::fs::create_dir_all(&dir).expect("creating the fixture folder");
        let model = dir.join("tiny");
        let inputs = dir.join("inputs.safetensors");
        let synth = hidream(&[
            "synth",
            "--preset",
            "tiny",
            "--dtype",
            "f32",
            "--out",
            text(&model),
            "--inputs",
            text(&inputs),
            "--latent",
            "8x8",
            "--t5-tokens",
            "4",
            "--llama-tokens",
            "4",
        ]);
        assert!(synth.1, "synth failed: {}", synth.0);
        std::fs::create_dir(dir.join("folder.png")).expect("creating a folder named like an image");
        let not_safetensors = dir.join("notes.txt");
        std::fs::write(&not_safetensors, "not a tensor file").expect("writing the text file");
        // `generate --size 128x64 --default-sample-size 8` makes an 80x32 image: latents
        // [1, 16, 4, 10]; these are [1, 16, 10, 4], what a size read as height x width gives.
        let transposed = dir.join("transposed.safetensors");
        let latents = candle_core::Tensor::zeros((1, 16, 10, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
            .expect("zeros");
        hidream_weights::write_tensors(&transposed, &HashMap::from([("latents".to_owned(), latents)]))
            .expect("writing the latents");
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/pipeline");
        let values = HashMap::from([
            ("{dir}", text(&dir).to_owned()),
            ("{model}", text(&model).to_owned()),
            ("{inputs}", text(&inputs).to_owned()),
            ("{text}", text(&not_safetensors).to_owned()),
            ("{golden}", text(&golden).to_owned()),
            ("{transposed}", text(&transposed).to_owned()),
        ]);
        Fixture { values }
    })
}

fn text(path: &Path) -> &str {
    path.to_str().expect("UTF-8 paths")
}

/// Runs `hidream ARGS` with backtraces on (so a panic cannot hide), killing it after a minute.
/// Returns stderr and whether it succeeded; a run killed by a signal (an abort) is a failure
/// of the test itself.
fn hidream(args: &[&str]) -> (String, bool) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hidream"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the hidream binary starts");
    let started = Instant::now();
    while child.try_wait().expect("waiting for hidream").is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().expect("killing hidream");
            panic!("hidream {args:?} ran for more than a minute");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("hidream's output");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.code().is_some(), "hidream {args:?} was killed by a signal ({:?}): {stderr}", output.status);
    (stderr, output.status.success())
}

/// Runs `base` with `flag value` in place of the base's own `flag` (if any) and checks `expect`.
/// A value may end with further flags after a space (`100000 --budget 60%`), and an empty `flag`
/// passes the value as a positional argument. Returns what went wrong, if anything.
fn check(base: &[&str], flag: &str, value: &str, expect: Expect) -> Option<String> {
    let (value, extra) = value.split_once(" --").map_or((value, None), |(value, extra)| (value, Some(extra)));
    let fixture = fixture();
    let fill = |arg: &str| {
        fixture.values.iter().fold(arg.to_owned(), |arg, (placeholder, path)| arg.replace(placeholder, path))
    };
    // The base is a subcommand and then `--flag value` pairs; a case replaces its flag's pair.
    let mut args: Vec<String> = vec![base[0].to_owned()];
    for pair in base[1..].chunks(2) {
        if pair[0] != flag {
            args.extend(pair.iter().map(|arg| fill(arg)));
        }
    }
    if flag.starts_with("--") {
        args.push(flag.to_owned());
    }
    args.push(fill(value));
    if let Some(extra) = extra {
        args.extend(format!("--{extra}").split(' ').map(fill));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (stderr, succeeded) = hidream(&args);
    let case = format!("hidream {}", args.join(" "));
    let error_lines = stderr.lines().filter(|line| line.starts_with("error:")).count();
    for sign in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        if stderr.contains(sign) {
            return Some(format!("{case}: `{sign}` on stderr: {stderr}"));
        }
    }
    let clean_failure = |needle: &str| {
        if succeeded {
            Some(format!("{case}: succeeded, expected an error mentioning `{needle}`"))
        } else if error_lines != 1 {
            Some(format!("{case}: {error_lines} `error:` lines, expected 1: {stderr}"))
        } else if !stderr.contains(needle) {
            Some(format!("{case}: the error does not mention `{needle}`: {stderr}"))
        } else {
            None
        }
    };
    match expect {
        Fails(needle) => clean_failure(needle),
        Runs if !succeeded => Some(format!("{case}: failed, expected success: {stderr}")),
        Runs => None,
        Clean if succeeded => None,
        Clean => clean_failure("error:"),
    }
}

/// Runs every case and reports every failure at once.
fn check_all(base: &[&str], cases: &[(&str, &str, Expect)]) {
    let failures: Vec<String> =
        cases.iter().filter_map(|&(flag, value, expect)| check(base, flag, value, expect)).collect();
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// A value the machine cannot hold in a `u64` or `usize`.
const HUGE: &str = "18446744073709551616";

/// The malformed values, each of which must fail naming `flag`.
fn malformed(flag: &'static str) -> Vec<(&'static str, &'static str, Expect)> {
    ["abc", "12x", "1.5.3", "", "-1"].into_iter().map(|value| (flag, value, Fails(flag))).collect()
}

/// `flag` with `0`, a value too large for the machine, `100000`, and the malformed values.
fn numeric(flag: &'static str, zero: Expect, hundred_thousand: Expect) -> Vec<(&'static str, &'static str, Expect)> {
    let mut cases = vec![(flag, "0", zero), (flag, HUGE, Fails(flag)), (flag, "100000", hundred_thousand)];
    cases.extend(malformed(flag));
    cases
}

/// The budget flag's edges (the runtime reports a budget below the minimum); `fits` is a budget
/// the command runs under.
fn budget(too_small: &'static str, fits: &'static str) -> Vec<(&'static str, &'static str, Expect)> {
    vec![
        ("--budget", "0", Fails(too_small)),
        ("--budget", HUGE, Fails("too large")),
        ("--budget", "100000", Fails(too_small)),
        ("--budget", "-1", Fails("--budget")),
        ("--budget", "abc", Fails("does not start with a number")),
        ("--budget", "12x", Fails("unknown unit")),
        ("--budget", "1.5.3", Fails("more than one decimal point")),
        ("--budget", "", Fails("--budget")),
        ("--budget", "101%", Fails("between 0% and 100%")),
        ("--budget", fits, Runs),
    ]
}

/// The path flags of a run from `--model`, `--inputs` and `--out`.
fn transformer_paths() -> Vec<(&'static str, &'static str, Expect)> {
    vec![
        ("--model", "", Fails("--model")),
        ("--model", "{dir}/nowhere", Fails("nowhere")),
        ("--model", "{inputs}", Fails("config.json")),
        ("--inputs", "", Fails("--inputs")),
        ("--inputs", "{dir}/nowhere.safetensors", Fails("nowhere.safetensors")),
        ("--inputs", "{model}", Fails("tiny")),
        ("--inputs", "{text}", Fails("notes.txt")),
        ("--out", "", Fails("--out")),
        ("--out", "{dir}", Fails("is a folder")),
        ("--out", "{dir}/nowhere/out.safetensors", Fails("does not exist")),
        ("--report", "", Fails("--report")),
        ("--report", "{dir}", Fails("is a folder")),
        ("--dtype", "abc", Fails("unknown dtype `abc`")),
        ("--dtype", "", Fails("--dtype")),
        ("--residency", "abc", Fails("abc")),
        ("--residency", "budget", Fails("needs --budget")),
    ]
}

/// The prefetch cases of the transformer's commands: a depth, then a budget it runs under.
const TRANSFORMER_PREFETCH: [&str; 2] = ["0 --budget 60%", "100000 --budget 60%"];

/// The memory flags shared by forward, denoise and generate: `fits` is a budget the command runs
/// under, and the two prefetch values are depth 0 and a huge depth, each followed by such a budget.
fn residency(
    too_small: &'static str,
    fits: &'static str,
    [prefetch_0, prefetch_huge]: [&'static str; 2],
) -> Vec<(&'static str, &'static str, Expect)> {
    let mut cases = budget(too_small, fits);
    // With a budget, the prefetch depth matters; 100000 is clamped or refused by the runtime.
    cases.extend([
        ("--prefetch", prefetch_0, Runs),
        ("--prefetch", prefetch_huge, Clean),
        ("--prefetch", "100000 --residency stream", Clean),
        ("--prefetch", HUGE, Fails("--prefetch")),
    ]);
    cases.extend(malformed("--prefetch"));
    cases.extend(numeric("--attention-chunk", Fails("--attention-chunk"), Runs));
    cases.extend(device());
    cases
}

/// What `--device cuda` does here: without the `cuda` feature, one line on how to build with it.
const CUDA: Expect = if cfg!(feature = "cuda") { Clean } else { Fails("--features cuda") };

fn device() -> Vec<(&'static str, &'static str, Expect)> {
    vec![
        ("--device", "cpu", Runs),
        ("--device", "CPU", Runs),
        ("--device", "cuda", CUDA),
        ("--device", "cuda:3", CUDA),
        ("--device", "cuda:x", Fails("--device")),
        ("--device", "tpu", Fails("--device")),
        ("--device", "", Fails("--device")),
    ]
}

#[test]
fn forward_edges() {
    let base = ["forward", "--model", "{model}", "--inputs", "{inputs}", "--out", "{dir}/forward.safetensors"];
    let mut cases = transformer_paths();
    cases.extend(residency("too small", "60%", TRANSFORMER_PREFETCH));
    cases.extend([
        ("--repeat", "0", Fails("--repeat")),
        ("--repeat", HUGE, Fails("--repeat")),
        ("--repeat", "3", Runs),
    ]);
    cases.extend(malformed("--repeat"));
    check_all(&base, &cases);
}

#[test]
fn denoise_edges() {
    let base =
        ["denoise", "--model", "{model}", "--inputs", "{inputs}", "--out", "{dir}/denoise.safetensors", "--steps", "1"];
    let mut cases = transformer_paths();
    cases.extend(residency("too small", "60%", TRANSFORMER_PREFETCH));
    cases.extend(numeric("--steps", Fails("--steps"), Fails("more than 1000")));
    cases.extend([
        ("--compare-to", "", Fails("--compare-to")),
        ("--compare-to", "{dir}/nowhere.safetensors", Fails("nowhere.safetensors")),
        ("--compare-to", "{inputs}", Fails("has no `sample`")),
    ]);
    check_all(&base, &cases);
}

#[test]
fn generate_edges() {
    let base = [
        "generate",
        "--model",
        "{golden}/model",
        "--llama",
        "{golden}/llama",
        "--prompt",
        "a lighthouse",
        "--dtype",
        "f32",
        "--default-sample-size",
        "8",
        "--steps",
        "1",
        "--out",
        "{dir}/generate.png",
    ];
    // One budget holds for every stage: on this tiny pipeline the VAE decode needs more than the
    // whole transformer, so a share of the transformer's weights never fits, and says which stage.
    let mut cases = residency("too small", "8MiB", ["0 --budget 8MiB", "100000 --budget 8MiB"]);
    cases.push(("--budget", "60%", Fails("the vae decode stage cannot run")));
    cases.extend([
        ("--size", "0x0", Fails("at least 1 pixel")),
        ("--size", "18446744073709551616x64", Fails("too large")),
        // Every size is rescaled to about the default area; one this far from square rounds a side to 0.
        ("--size", "100000x100000", Runs),
        ("--size", "100000x16", Fails("aspect ratio")),
        ("--size", "-1x64", Fails("--size")),
        ("--size", "abc", Fails("WIDTHxHEIGHT")),
        ("--size", "12x", Fails("--size")),
        ("--size", "1.5.3", Fails("--size")),
        ("--size", "", Fails("--size")),
    ]);
    cases.extend(numeric("--steps", Fails("--steps"), Fails("more than 1000")));
    cases.extend(numeric("--vae-attention-chunk", Fails("--vae-attention-chunk"), Runs));
    cases.extend(numeric("--default-sample-size", Fails("--default-sample-size"), Fails("more than 1024")));
    cases.extend([("--seed", "0", Runs), ("--seed", "18446744073709551615", Runs), ("--seed", HUGE, Fails("--seed"))]);
    cases.extend(malformed("--seed"));
    cases.extend([
        ("--guidance", "0", Runs),
        ("--guidance", "100000", Runs),
        ("--guidance", "nan", Fails("--guidance")),
        ("--guidance", "inf", Fails("--guidance")),
    ]);
    cases.extend(malformed("--guidance"));
    cases.extend([
        ("--out", "", Fails("--out")),
        ("--out", "{dir}", Fails(".png")),
        ("--out", "{dir}/folder.png", Fails("is a folder")),
        ("--out", "{dir}/nowhere/image.png", Fails("does not exist")),
        ("--out", "{dir}/image.jpg", Fails(".png")),
        ("--output-latents", "{dir}", Fails("is a folder")),
        ("--report", "{dir}", Fails("is a folder")),
        ("--latents", "", Fails("--latents")),
        ("--latents", "{dir}/nowhere.safetensors", Fails("nowhere.safetensors")),
        ("--latents", "{inputs}", Fails("has no tensor `latents`")),
        ("--latents", "{text}", Fails("notes.txt")),
        ("--step-noise", "{dir}/nowhere.safetensors", Fails("nowhere.safetensors")),
        ("--model", "", Fails("--model")),
        ("--model", "{dir}/nowhere", Fails("nowhere")),
        ("--llama", "{dir}/nowhere", Fails("nowhere")),
        ("--variant", "abc", Fails("unknown variant `abc`")),
        ("--dtype", "abc", Fails("unknown dtype `abc`")),
    ]);
    check_all(&base, &cases);
    // Latents of the transposed shape: the error says that height and width are swapped.
    let swapped = [&base[..], &["--size", "128x64"]].concat();
    assert_eq!(check(&swapped, "--latents", "{transposed}", Fails("swapped")), None);
}

#[test]
fn plan_edges() {
    // The full model's config: `--model` cannot be combined with `--preset`.
    let base = ["plan", "--size", "64x64"];
    let mut cases = vec![
        ("--size", "0x0", Fails("at least 1 pixel")),
        ("--size", "64x0", Fails("height must be at least 1")),
        ("--size", "18446744073709551616x64", Fails("too large")),
        // Square: 12500² latent pixels are many tokens, which the saturating cost model handles.
        ("--size", "100000x100000", Runs),
        ("--size", "1000x1024", Fails("the width 1000 is not a positive multiple of 16")),
        ("--size", "1024x1000", Fails("the height 1000 is not a positive multiple of 16")),
        // Non-square sizes are padded to max_seq (4096 patches for the full model): 2048x512
        // has 4096, 2048x528 has 4224.
        ("--size", "2048x512", Runs),
        ("--size", "2048x528", Fails("max_seq")),
        ("--size", "-1x64", Fails("--size")),
        ("--size", "abc", Fails("WIDTHxHEIGHT")),
        ("--size", "12x", Fails("--size")),
        ("--size", "1.5.3", Fails("--size")),
        ("--size", "", Fails("--size")),
    ];
    cases.extend(budget("fits neither setting", "60%"));
    cases.extend([
        ("--prefetch", "0 --budget 60%", Runs),
        ("--prefetch", "100000 --budget 60%", Clean),
        ("--prefetch", HUGE, Fails("--prefetch")),
    ]);
    cases.extend(malformed("--prefetch"));
    // Any positive finite rate is an assumption one may make, 1.8e19 TFLOP/s included.
    cases.extend([
        ("--tflops", "0", Fails("--tflops")),
        ("--tflops", HUGE, Runs),
        ("--tflops", "100000", Runs),
        ("--tflops", "1e400", Fails("--tflops")),
        ("--tflops", "nan", Fails("--tflops")),
    ]);
    cases.extend(malformed("--tflops"));
    cases.extend(numeric("--bandwidth", Fails("more than 0 bytes per second"), Runs));
    cases.extend(numeric("--attention-chunk", Fails("--attention-chunk"), Runs));
    cases.extend([
        ("--variant", "abc", Fails("unknown variant `abc`")),
        ("--dtype", "abc", Fails("unknown dtype `abc`")),
        ("--preset", "abc", Fails("unknown preset `abc`")),
        ("--model", "", Fails("--model")),
        ("--model", "{dir}/nowhere", Fails("nowhere")),
        ("--model", "{text}", Fails("notes.txt")),
    ]);
    check_all(&base, &cases);
}

#[test]
fn bandwidth_edges() {
    let base = ["bandwidth", "--bytes", "8MiB", "--buffer", "1MiB", "--repeat", "1"];
    let mut cases = device();
    cases.extend([
        ("--bytes", "0", Fails("at least 1 byte")),
        ("--buffer", "0", Fails("at least 1 byte")),
        ("--buffer", "1GiB", Runs),
        ("--bytes", "1", Runs),
        ("--repeat", "0", Fails("--repeat")),
        ("--repeat", "2", Runs),
    ]);
    cases.extend(malformed("--bytes"));
    cases.extend(malformed("--buffer"));
    check_all(&base, &cases);
}

#[test]
fn synth_edges() {
    let base = [
        "synth",
        "--preset",
        "tiny",
        "--dtype",
        "f32",
        "--inputs",
        "{dir}/synth-inputs.safetensors",
        "--latent",
        "2x2",
        "--t5-tokens",
        "1",
        "--llama-tokens",
        "1",
    ];
    let mut cases = numeric("--batch", Fails("--batch"), Runs);
    cases.extend(numeric("--t5-tokens", Fails("--t5-tokens"), Runs));
    cases.extend(numeric("--llama-tokens", Fails("--llama-tokens"), Runs));
    cases.extend([
        ("--latent", "0x0", Fails("at least 1 pixel")),
        ("--latent", "18446744073709551616x2", Fails("too large")),
        ("--latent", "100000x2", Runs),
        // 4 channels × 2^60 latent pixels: more bytes than any allocation may have.
        ("--latent", "1073741824x1073741824", Fails("more than this machine can allocate")),
        ("--latent", "3x2", Fails("not a multiple of the patch size")),
        ("--latent", "-2x2", Fails("--latent")),
        ("--latent", "abc", Fails("WIDTHxHEIGHT")),
        ("--latent", "12x", Fails("--latent")),
        ("--latent", "1.5.3", Fails("--latent")),
        ("--latent", "", Fails("--latent")),
        ("--seed", "0", Runs),
        ("--seed", "18446744073709551615", Runs),
        ("--seed", HUGE, Fails("--seed")),
        ("--preset", "abc", Fails("unknown preset `abc`")),
        ("--dtype", "abc", Fails("unknown dtype `abc`")),
        ("--inputs", "", Fails("--inputs")),
        ("--inputs", "{dir}", Fails("is a folder")),
        ("--inputs", "{dir}/nowhere/inputs.safetensors", Fails("does not exist")),
    ]);
    cases.extend(malformed("--seed"));
    check_all(&base, &cases);

    // The checkpoint flags, writing a model.
    let base = ["synth", "--preset", "tiny", "--out", "{dir}/synth-model"];
    let mut cases = numeric("--max-shard-size", Fails("must be positive"), Runs);
    cases.extend([
        ("--layers", "0,0", Fails("num_layers plus num_single_layers must be at least 1")),
        ("--layers", "1,0", Runs),
        ("--layers", "0,1", Runs),
        ("--layers", "100000,1", Fails("at most 2 double and 2 single blocks")),
        ("--layers", "18446744073709551616,1", Fails("D,S")),
        ("--layers", "-1,0", Fails("D,S")),
        ("--layers", "abc", Fails("D,S")),
        ("--layers", "1,", Fails("D,S")),
        ("--layers", "", Fails("D,S")),
        ("--out", "", Fails("--out")),
        ("--out", "{text}", Fails("notes.txt")),
    ]);
    check_all(&base, &cases);
    assert_eq!(check(&["synth", "--preset", "tiny"], "--dtype", "f32", Fails("nothing to write")), None);
}

#[test]
fn inspect_edges() {
    let cases = [
        ("", "{model}", Runs),
        ("", "", Fails("<DIR>")),
        ("", "{dir}/nowhere", Fails("nowhere")),
        ("", "{inputs}", Fails("config.json")),
        ("", "{text}", Fails("notes.txt")),
        ("", "{dir}", Fails("hidream-cli-edges")),
    ];
    check_all(&["inspect"], &cases);
}
