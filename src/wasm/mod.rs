//! Running Wasm modules: a core export called with typed inputs (what the proplet does for ordinary
//! tasks), or a WASI command whose stdout is the result (what the proplet's external runtime does).
pub mod command;
pub mod export;

/// The proplet treats these names as WASI commands rather than exports.
pub fn is_command(function: &str) -> bool {
    function == "_start" || function.starts_with("fl-round-")
}

/// Whether the module needs WASI (imports from `wasi_snapshot_preview1`), judged without running it.
pub fn imports_wasi(module: &[u8]) -> bool {
    let engine = wasmi::Engine::default();
    wasmi::Module::new(&engine, module).is_ok_and(|m| {
        m.imports()
            .any(|i| i.module().starts_with("wasi_snapshot_preview"))
    })
}

/// Runs `function` of `module`: as a WASI command when the name says so or when the module imports WASI
/// and exports `_start` but not the name; otherwise as a core export.
pub fn run(
    module: &[u8],
    function: &str,
    inputs: &[String],
    command_args: &[String],
    env: &[(String, String)],
) -> Result<String, String> {
    if is_command(function) || imports_wasi(module) {
        command::run(module, function, inputs, command_args, env)
    } else {
        export::run(module, function, inputs)
    }
}
