//! WASI commands (`_start`): argv, env and a captured stdout, which becomes the result — what the
//! proplet's external runtime (`wasmtime run`) returns.
use wasmi::{Engine, Linker, Store};
use wasmi_wasi::WasiCtx;
use wasmi_wasi::wasi_common::pipe::WritePipe;

use super::export;

/// Stdout beyond this is cut: a result must fit in a status field and an MQTT message.
pub const MAX_STDOUT_BYTES: usize = 1024 * 1024;

/// Runs the module with WASI. A command name (`_start`, `fl-round-…`), or a name the module does not
/// export while it has `_start`, runs `_start` with `argv = [function, args…, inputs…]` and returns stdout
/// without its trailing newline; any other name is called as a typed export.
pub fn run(
    module: &[u8],
    function: &str,
    inputs: &[String],
    args: &[String],
    env: &[(String, String)],
) -> Result<String, String> {
    let engine = Engine::default();
    let module = export::compile(&engine, module)?;
    let stdout = WritePipe::new_in_memory();
    let mut builder = wasmi_wasi::WasiCtxBuilder::new();
    let argv: Vec<String> = std::iter::once(function.to_string())
        .chain(args.iter().cloned())
        .chain(inputs.iter().cloned())
        .collect();
    builder
        .args(&argv)
        .map_err(|e| format!("Invalid command-line argument: {e}"))?
        .envs(env)
        .map_err(|e| format!("Invalid environment variable: {e}"))?
        .stdout(Box::new(stdout.clone()))
        .inherit_stderr();
    let mut store = Store::new(&engine, builder.build());
    let mut linker = <Linker<WasiCtx>>::new(&engine);
    wasmi_wasi::add_to_linker(&mut linker, |ctx| ctx)
        .map_err(|e| format!("Failed to set up WASI: {e}"))?;
    let instance = linker
        .instantiate_and_start(&mut store, &module)
        .map_err(|e| format!("Failed to instantiate module: {e}"))?;
    let as_command = super::is_command(function)
        || (instance.get_func(&store, function).is_none()
            && instance.get_func(&store, "_start").is_some());
    if !as_command {
        return export::call(&mut store, &instance, function, inputs);
    }
    let start = instance
        .get_typed_func::<(), ()>(&store, "_start")
        .map_err(|e| format!("Function '_start' not found or not a command: {e}"))?;
    match start.call(&mut store, ()) {
        Ok(()) => {}
        Err(e) => match e.i32_exit_status() {
            Some(0) => {}
            Some(code) => return Err(format!("Command exited with status {code}")),
            None => return Err(format!("Function execution failed: {e}")),
        },
    }
    drop(store);
    let bytes = stdout
        .try_into_inner()
        .map_err(|_| "stdout is still in use".to_string())?
        .into_inner();
    let mut text =
        String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_STDOUT_BYTES)]).into_owned();
    text.truncate(text.trim_end_matches(['\n', '\r']).len());
    Ok(text)
}
