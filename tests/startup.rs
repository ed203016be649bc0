//! Start-up errors through the real binary (`dicomgate serve --config FILE`): what the node
//! refuses to start on, in the words and at the place an operator needs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

/// `serve --config <dir>/node.toml` (with `extra` flags) on `text`; its exit code and stderr.
fn serve(dir: &std::path::Path, text: &str, extra: &[&str]) -> (Option<i32>, String, String) {
    let path = dir.join("node.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dicomgate"))
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "", "--config"])
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

/// Issue 11: an error of the start-up checks of what the config names outside itself (here
/// a processing command that is not installed, a TLS certificate that is not there) named the
/// field but neither the file nor the line; now "FILE: line N: field ...". An error about a
/// field a flag set names no line of the file.
#[test]
fn start_up_errors_name_the_config_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let text = format!(
        "[node]\nae_title = \"GATE\"\ndata_dir = {data:?}\n\n\
         [processing]\ntimeout_seconds = 60\ncommand = [\"no-such-tool-anywhere\", \"--fast\"]\n"
    );
    let (code, err, path) = serve(dir.path(), &text, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "dicomgate: {path}: line 7: processing.command: \"no-such-tool-anywhere\" is not \
             found in PATH"
        )),
        "{err}"
    );
    let missing = dir.path().join("missing.pem").display().to_string();
    let text = format!(
        "[node]\ndata_dir = {data:?}\n\n[tls]\nlisten = \"127.0.0.1:0\"\n\
         certificate = {missing:?}\nprivate_key = {missing:?}\n"
    );
    let (code, err, path) = serve(dir.path(), &text, &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "dicomgate: {path}: line 6: tls.certificate {missing}"
        )),
        "{err}"
    );
    // --data-dir names a file: the error is the flag's, not the file's line 2.
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, b"").unwrap();
    let text = format!("[node]\ndata_dir = {data:?}\n");
    let (code, err, _) = serve(dir.path(), &text, &["--data-dir", a_file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "dicomgate: node.data_dir {}: is not a directory",
            a_file.display()
        )),
        "{err}"
    );
}
