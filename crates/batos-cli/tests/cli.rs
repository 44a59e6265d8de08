//! The `batos` binary end to end: import the real model into a living image, generate
//! from the image alone and compare with the reference; bad input gives a non-zero exit
//! and a message that names the problem.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn batos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_batos"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the batos binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    o
}

/// Asserts a failure with exit status 1 whose stderr contains `needle`.
fn fails_with(o: Output, needle: &str) {
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout: {}\nstderr: {err}",
        stdout(&o)
    );
    assert!(err.contains("error:"), "{err}");
    assert!(
        err.contains(needle),
        "expected {needle:?} in stderr:\n{err}"
    );
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `$BATOS_REFERENCE_DIR`, else the first `shared/reference` walking up from this crate.
fn reference_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BATOS_REFERENCE_DIR") {
        return Some(PathBuf::from(dir));
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("shared").join("reference"))
        .find(|p| p.join("base.json").is_file())
}

fn skip(test: &str, why: &str) {
    println!("SKIP {test}: {why}");
    eprintln!("SKIP {test}: {why}");
}

/// The reference's 32-token greedy text for the prompt named `name`.
fn reference_text(base: &serde_json::Value, name: &str) -> (String, String, String) {
    let p = base["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("reference prompt {name}"));
    let s = |k: &str| p[k].as_str().expect("string field").to_owned();
    (
        s("prompt_text"),
        s("greedy_text_32"),
        s("greedy_text_stop_at_eos"),
    )
}

#[test]
fn import_then_generate_matches_the_reference() {
    const TEST: &str = "import_then_generate_matches_the_reference";
    let Some(refdir) = reference_dir() else {
        return skip(
            TEST,
            "reference outputs not found (set BATOS_REFERENCE_DIR or keep ../shared/reference)",
        );
    };
    let gguf = match batos::model::fetch::smollm2_gguf() {
        Ok(p) => p,
        Err(e) => return skip(TEST, &format!("real model unavailable: {e}")),
    };
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refdir.join("base.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    let image = path_str(&image);

    let o = ok(
        batos(&["import", "gguf", path_str(&gguf), "--image", image]),
        "import",
    );
    assert!(stdout(&o).contains("272 tensors"), "{}", stdout(&o));

    let o = ok(batos(&["info", "--image", image]), "info");
    let info = stdout(&o);
    assert!(info.contains("30 layers, hidden 576"), "{info}");
    assert!(info.contains("chat template  yes"), "{info}");

    // Greedy, 32 tokens, past EOS like the reference: the same text, from the image alone.
    let (prompt, want32, _) = reference_text(&base, "fox");
    let o = ok(
        batos(&[
            "generate",
            "--image",
            image,
            "--prompt",
            &prompt,
            "--max-tokens",
            "32",
            "--ignore-eos",
        ]),
        "generate",
    );
    assert_eq!(stdout(&o), format!("{want32}\n"));

    // The chat template with its default system message, stopping at <|im_end|>.
    let o = ok(
        batos(&[
            "generate",
            "--image",
            image,
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "32",
        ]),
        "generate --chat",
    );
    let (_, _, want_chat) = reference_text(&base, "chat_capital");
    assert_eq!(stdout(&o), format!("{want_chat}\n"));

    // A stop string cuts the text before it.
    let cut = want32.find("bear").expect("reference text has 'bear'");
    let o = ok(
        batos(&[
            "generate",
            "--image",
            image,
            "--prompt",
            &prompt,
            "--max-tokens",
            "32",
            "--stop",
            "bear",
        ]),
        "generate --stop",
    );
    assert_eq!(stdout(&o), format!("{}\n", &want32[..cut]));

    // A prompt longer than the context is refused with the numbers.
    let long = "fox ".repeat(9000);
    fails_with(
        batos(&[
            "generate",
            "--image",
            image,
            "--prompt",
            &long,
            "--max-tokens",
            "1",
        ]),
        "exceeds the model's context of 8192",
    );
}

#[test]
fn missing_image_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    fails_with(
        batos(&["generate", "--image", path_str(&missing), "--prompt", "hi"]),
        "does not exist",
    );
    fails_with(
        batos(&["info", "--image", path_str(&missing)]),
        "does not exist",
    );
    assert!(!missing.exists(), "reading commands never create an image");
}

#[test]
fn directory_that_is_not_an_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "hello").unwrap();
    fails_with(
        batos(&["info", "--image", path_str(dir.path())]),
        "is not a batos living image",
    );
}

#[test]
fn image_without_a_model_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    drop(batos::store::Db::open(&image, batos::store::StoreConfig::default()).unwrap());
    fails_with(
        batos(&["info", "--image", path_str(&image)]),
        "holds no model",
    );
    fails_with(
        batos(&["generate", "--image", path_str(&image), "--prompt", "hi"]),
        "holds no model",
    );
}

#[test]
fn malformed_gguf_is_refused_before_the_image_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"this is not a GGUF file at all").unwrap();
    let image = dir.path().join("image");
    let o = batos(&[
        "import",
        "gguf",
        path_str(&bad),
        "--image",
        path_str(&image),
    ]);
    fails_with(o, "not a GGUF file");
    assert!(!image.exists(), "a failed import leaves no image behind");

    // A truncated header names the problem too.
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00").unwrap();
    fails_with(
        batos(&[
            "import",
            "gguf",
            path_str(&bad),
            "--image",
            path_str(&image),
        ]),
        "truncated",
    );
    fails_with(
        batos(&[
            "import",
            "gguf",
            path_str(&dir.path().join("absent.gguf")),
            "--image",
            path_str(&image),
        ]),
        "absent.gguf",
    );
    fails_with(
        batos(&[
            "import",
            "hf",
            path_str(dir.path()),
            "--image",
            path_str(&image),
        ]),
        "config.json",
    );
}

#[test]
fn bad_flags_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = path_str(dir.path());
    // clap usage errors exit with status 2 and say which flag.
    let o = batos(&["generate", "--image", image]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--prompt"), "{}", stderr(&o));
    let o = batos(&[
        "import", "gguf", "x.gguf", "--image", image, "--dtype", "int3",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("int3"), "{}", stderr(&o));
}
