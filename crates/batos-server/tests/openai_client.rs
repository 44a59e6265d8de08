//! The official `openai` Python client against the server on loopback: runs
//! `tests/openai_client/test_server.py` with the interpreter named by `BATOS_OPENAI_PY`
//! (a python with `openai` installed; `.ci/run` makes one in `.cache/openai-venv`).
//! Without it the test prints a SKIP line and passes.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn official_openai_client_drives_the_server() {
    let test = "official_openai_client_drives_the_server";
    let Some(python) = std::env::var_os("BATOS_OPENAI_PY") else {
        println!("SKIP {test}: BATOS_OPENAI_PY is not set (a python with `openai` installed; .ci/run makes one)");
        eprintln!("SKIP {test}: BATOS_OPENAI_PY is not set (a python with `openai` installed; .ci/run makes one)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = tiny_image(dir.path());
    let loras = dir.path().join("loras");
    write_adapter(&loras.join("persona"), 42);
    let mut c = test_config();
    c.api_key = Some("sk-test".into());
    c.enable_lora_loading = true;
    c.admin_api_key = Some("sk-admin".into());
    c.lora_dir = Some(loras);
    let server = TestServer::start(&image, c);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client/test_server.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("BATOS_BASE_URL", format!("http://{}/v1", server.addr))
        .env("BATOS_MODEL", MODEL)
        .env("BATOS_API_KEY", "sk-test")
        .env("BATOS_ADMIN_KEY", "sk-admin")
        .env("BATOS_ADAPTER_PATH", "persona")
        .env("BATOS_PROMPT", "w5 w6 w7")
        .env("BATOS_CHAT_TEXT", "w9 w10")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&python).display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the openai client tests failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
    server.shutdown().unwrap();
}
