//! Calls a core-module export the way the real proplet does: inputs parsed by the export's parameter
//! types, the first result rendered as text, `main`/`run`/`_start` as fallbacks when the export is missing.
use wasmi::{AsContextMut, Engine, Instance, Linker, Module, Store, Val, ValType};

const FALLBACKS: [&str; 3] = ["main", "run", "_start"];

/// The result string, or the proplet's error message.
pub fn run(module: &[u8], function: &str, inputs: &[String]) -> Result<String, String> {
    let engine = Engine::default();
    let module = compile(&engine, module)?;
    let mut store = Store::new(&engine, ());
    let linker = <Linker<()>>::new(&engine);
    let instance = linker
        .instantiate_and_start(&mut store, &module)
        .map_err(|e| format!("Failed to instantiate module: {e}"))?;
    call(&mut store, &instance, function, inputs)
}

pub(crate) fn compile(engine: &Engine, module: &[u8]) -> Result<Module, String> {
    Module::new(engine, module).map_err(|e| format!("Failed to compile module: {e}"))
}

/// Calls `function` (or a fallback) with `inputs` parsed by its parameter types.
pub(crate) fn call<T>(
    mut store: impl AsContextMut<Data = T>,
    instance: &Instance,
    function: &str,
    inputs: &[String],
) -> Result<String, String> {
    let store = &mut store;
    let func = instance
        .get_func(&*store, function)
        .or_else(|| FALLBACKS.iter().find_map(|f| instance.get_func(&*store, f)));
    let Some(func) = func else {
        let available: Vec<String> = instance
            .exports(&*store)
            .filter(|e| e.ty(&*store).func().is_some())
            .map(|e| e.name().to_string())
            .collect();
        return Err(format!(
            "Function '{function}' not found, and fallbacks {FALLBACKS:?} also not found in module exports. Available function exports: {available:?}"
        ));
    };
    let ty = func.ty(&*store);
    let params = ty.params();
    if params.len() != inputs.len() {
        return Err(format!(
            "Function expects {} arguments but {} were provided",
            params.len(),
            inputs.len()
        ));
    }
    let mut args = Vec::with_capacity(inputs.len());
    for (t, input) in params.iter().zip(inputs) {
        let bad = || format!("Failed to parse argument {input:?} as {t:?}");
        let text = input.trim();
        args.push(match t {
            ValType::I32 => Val::I32(text.parse().map_err(|_| bad())?),
            ValType::I64 => Val::I64(text.parse().map_err(|_| bad())?),
            ValType::F32 => Val::F32(text.parse::<f32>().map_err(|_| bad())?.into()),
            ValType::F64 => Val::F64(text.parse::<f64>().map_err(|_| bad())?.into()),
            other => return Err(format!("Unsupported parameter type {other:?}")),
        });
    }
    let mut results: Vec<Val> = ty
        .results()
        .iter()
        .map(|t| Val::default_for_ty(*t))
        .collect();
    func.call(&mut *store, &args, &mut results)
        .map_err(|e| format!("Function execution failed: {e}"))?;
    Ok(match results.first() {
        Some(Val::I32(v)) => v.to_string(),
        Some(Val::I64(v)) => v.to_string(),
        Some(Val::F32(v)) => f32::from(*v).to_string(),
        Some(Val::F64(v)) => f64::from(*v).to_string(),
        _ => String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    /// The real proplet repository's addition example (export `add`), as captured on the wire.
    const ADD: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwcBA2FkZAAACgkBBwAgACABags=";
    /// Upstream's sample module (export `main`).
    const MAIN: &str = "AGFzbQEAAAABBwFgAn9/AX8DAgEABwgBBG1haW4AAAoJAQcAIAAgAWoL";

    fn module(b64: &str) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64")
    }

    #[test]
    fn adds_like_the_real_proplet() {
        assert_eq!(
            run(&module(ADD), "add", &["40".into(), "2".into()]),
            Ok("42".into())
        );
        assert_eq!(
            run(&module(MAIN), "main", &["10".into(), "32".into()]),
            Ok("42".into())
        );
        // Unknown name falls back to main.
        assert_eq!(
            run(&module(MAIN), "whatever", &["1".into(), "2".into()]),
            Ok("3".into())
        );
    }

    #[test]
    fn errors_like_the_real_proplet() {
        let e = run(&module(ADD), "mul", &["1".into(), "2".into()]).expect_err("missing export");
        assert!(
            e.starts_with("Function 'mul' not found") && e.contains("[\"add\"]"),
            "{e}"
        );
        assert!(run(&module(ADD), "add", &["1".into()]).is_err());
        assert!(run(&module(ADD), "add", &["x".into(), "1".into()]).is_err());
        assert!(run(b"not wasm", "add", &[]).is_err());
    }
}
