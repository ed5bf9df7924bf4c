//! Prints the five CRDs as one multi-document YAML stream, or writes one file per CRD into a directory:
//! `crdgen` or `crdgen --out crds/`.
use propeller_operator::api::all_crds;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out_dir = match args.get(1).map(String::as_str) {
        Some("--out") => args.get(2).cloned(),
        Some(other) => {
            eprintln!("usage: crdgen [--out DIR] (unknown argument {other})");
            std::process::exit(2);
        }
        None => None,
    };
    for crd in all_crds() {
        let yaml = match propeller_operator::api::crd_yaml(&crd) {
            Ok(y) => y,
            Err(e) => {
                eprintln!("crdgen: {e}");
                std::process::exit(1);
            }
        };
        match &out_dir {
            Some(dir) => {
                let name = crd.metadata.name.clone().unwrap_or_default();
                let path = std::path::Path::new(dir).join(format!("{name}.yaml"));
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("crdgen: write {}: {e}", path.display());
                    std::process::exit(1);
                }
            }
            None => print!("---\n{yaml}"),
        }
    }
}
