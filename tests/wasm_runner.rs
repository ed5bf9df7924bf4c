//! The `wasm-runner` binary on real modules (compiled from tests/modules/*.wat): what it writes to the
//! termination message and the exit status Kubernetes sees.
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use propeller_operator::mqtt::wire::{TaskResult, decode_result};

fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasm-runner-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn module(dir: &Path, wat_name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/modules")
        .join(format!("{wat_name}.wat"));
    let wasm = wat::parse_file(&source).expect("valid WAT");
    let path = dir.join(format!("{wat_name}.wasm"));
    std::fs::write(&path, wasm).expect("write module");
    path
}

/// Runs the runner; returns its exit status and the decoded termination message.
fn run(dir: &Path, args: &[&str]) -> (i32, TaskResult) {
    let log = dir.join("termination-log");
    let _ = std::fs::remove_file(&log);
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-runner"))
        .args(["--task-id=t-1", "--proplet-id=p-1"])
        .arg(format!("--termination-log={}", log.display()))
        .args(args)
        .env("GREETING", "hi")
        .output()
        .expect("runner starts");
    let message = std::fs::read(&log).unwrap_or_else(|e| {
        panic!(
            "no termination message ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(message.len() <= 4096, "termination message too long");
    let result = decode_result(&message).expect("a proplet results message");
    assert_eq!(result.task_id, "t-1");
    assert_eq!(result.proplet_id.as_deref(), Some("p-1"));
    (out.status.code().unwrap_or(-1), result)
}

#[test]
fn addition_answers_42() {
    let dir = workdir("add");
    let m = module(&dir, "add");
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-file={}", m.display()),
            "--function=add",
            "--input=40",
            "--input=2",
        ],
    );
    assert_eq!(
        (code, r.results.as_str(), r.failure()),
        (0, Some("42"), None)
    );
    // Negative numbers are inputs, not flags.
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-file={}", m.display()),
            "--function=add",
            "--input=-1",
            "--input=43",
        ],
    );
    assert_eq!((code, r.results.as_str()), (0, Some("42")));
}

#[test]
fn a_wasi_command_returns_its_stdout() {
    let dir = workdir("wasi");
    let m = module(&dir, "hello-json");
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-file={}", m.display()),
            "--function=_start",
            "--pass-env=GREETING",
            "--",
            "arg1",
        ],
    );
    assert_eq!(code, 0, "{r:?}");
    assert_eq!(r.results.as_str(), Some(r#"{"answer":42}"#));
    // An FL round name runs the module as a command too.
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-file={}", m.display()),
            "--function=fl-round-1",
        ],
    );
    assert_eq!((code, r.results.as_str()), (0, Some(r#"{"answer":42}"#)));

    let m = module(&dir, "exit3");
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-file={}", m.display()),
            "--function=_start",
        ],
    );
    assert_eq!(code, 1);
    assert_eq!(r.failure(), Some("Command exited with status 3"));
}

#[test]
fn a_trap_and_a_missing_export_fail_with_the_proplets_messages() {
    let dir = workdir("fail");
    let trap = module(&dir, "trap");
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-file={}", trap.display()),
            "--function=boom",
        ],
    );
    assert_eq!(code, 1);
    let e = r.failure().expect("an error");
    assert!(e.starts_with("Function execution failed"), "{e}");

    let add = module(&dir, "add");
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-file={}", add.display()),
            "--function=mul",
        ],
    );
    assert_eq!(code, 1);
    let e = r.failure().expect("an error");
    assert!(
        e.starts_with("Function 'mul' not found") && e.contains("[\"add\"]"),
        "{e}"
    );

    let (code, r) = run(&dir, &["--module-file=/nonexistent.wasm", "--function=add"]);
    assert_eq!(code, 2);
    assert!(
        r.failure()
            .is_some_and(|e| e.contains("Failed to read module")),
        "{r:?}"
    );
}

/// Serves `body` with `status` to `count` requests on a loopback port; returns the base URL.
fn serve(status: &'static str, body: Vec<u8>, count: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().take(count) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/wasm\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    format!("http://{addr}")
}

#[test]
fn the_module_can_come_from_an_http_url() {
    let dir = workdir("http");
    let wasm = std::fs::read(module(&dir, "add")).expect("module");
    let url = serve("200 OK", wasm, 1);
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-url={url}/add.wasm"),
            "--function=add",
            "--input=40",
            "--input=2",
        ],
    );
    assert_eq!((code, r.results.as_str()), (0, Some("42")), "{r:?}");

    let url = serve("404 Not Found", b"no".to_vec(), 1);
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-url={url}/missing.wasm"),
            "--function=add",
        ],
    );
    assert_eq!(code, 2);
    assert!(
        r.failure()
            .is_some_and(|e| e.contains("Failed to fetch module") && e.contains("404")),
        "{r:?}"
    );

    let big = serve("200 OK", vec![0u8; 2048], 1);
    let (code, r) = run(
        &dir,
        &[
            &format!("--module-url={big}/big.wasm"),
            "--function=add",
            "--max-module-bytes=1024",
        ],
    );
    assert_eq!(code, 2);
    assert!(
        r.failure().is_some_and(|e| e.contains("larger than")),
        "{r:?}"
    );
}
