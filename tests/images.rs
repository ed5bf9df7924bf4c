//! The image definitions agree with the code: every binary they build exists, and the runner image is the
//! operator's default `--wasm-runner-image` running as the uid the Job pods require. (No container engine
//! runs here, so the images themselves are built elsewhere; this keeps their definition from drifting.)
use propeller_operator::config::OperatorConfig;

fn dockerfile() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/images/Dockerfile"))
        .expect("images/Dockerfile")
}

#[test]
fn the_dockerfile_builds_binaries_that_exist() {
    let text = dockerfile();
    let built: Vec<&str> = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "--bin")
        .map(|w| w[1])
        .collect();
    assert_eq!(built, ["propeller-operator", "wasm-runner"]);
    for bin in built {
        let src = format!("{}/src/bin/{bin}.rs", env!("CARGO_MANIFEST_DIR"));
        assert!(std::path::Path::new(&src).exists(), "{src}");
    }
}

#[test]
fn the_runner_image_is_the_operators_default_and_runs_as_65532() {
    let text = dockerfile();
    let config = OperatorConfig::try_parse_from_args(&["propeller-operator", "--client-key", "k"])
        .expect("defaults parse");
    let image = config.wasm_runner_image;
    let (repository, tag) = image.rsplit_once(':').expect("a tagged image");
    assert!(
        text.contains(repository),
        "{repository} is built by images/Dockerfile"
    );
    assert_eq!(
        tag,
        env!("CARGO_PKG_VERSION"),
        "the default runner image follows the crate version"
    );
    assert!(text.contains("USER 65532:65532"));
    let job_backend = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src/controllers/task/job_backend.rs"
    ))
    .expect("job_backend.rs");
    assert!(job_backend.contains("\"runAsUser\": 65532"));
}
