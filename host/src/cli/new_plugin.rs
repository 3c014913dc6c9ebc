//! `jobhost new-plugin <name>`: scaffolds a Rust plugin crate that builds
//! into a component with `cargo build --release`. The SDK and the WIT
//! contract are vendored into the crate (from this binary), so it builds
//! anywhere, with no path back to this repository.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;

const SDK_SOURCE: &str = include_str!("../../../plugins/sdk/src/lib.rs");
const CONTRACT: &str = include_str!("../../../wit/plugin.wit");
const CONFIG_STORE: &str = include_str!("../../../wit/deps/config/store.wit");
const CONFIG_WORLD: &str = include_str!("../../../wit/deps/config/world.wit");

#[derive(Debug, Args)]
pub struct NewPluginArgs {
    /// Plugin name: lowercase letters, digits and `-`.
    pub name: String,
    /// Directory to create the crate in [default: ./<name>].
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Scaffold a phase that calls an HTTP API (the origins it may call
    /// are granted by the operator).
    #[arg(long)]
    pub http: bool,
}

pub fn new_plugin(args: NewPluginArgs) -> anyhow::Result<i32> {
    let name = args.name;
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!(
            "plugin names use lowercase letters, digits and `-`, starting with a letter: `{name}` does not"
        );
    }
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&name));
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    for (path, contents) in files(&name, args.http) {
        write(&dir.join(path), &contents)?;
    }
    let artifact = format!(
        "target/wasm32-wasip2/release/{}.wasm",
        name.replace('-', "_")
    );
    println!("created plugin crate {}", dir.display());
    println!("  cd {} && cargo build --release", dir.display());
    if args.http {
        println!("  jobhost plugin push {name} {artifact}");
        println!("  jobhost plugin grant {name} --version 0.1.0 --http https://api.example.com");
    } else {
        println!("  jobhost run-phase {artifact} --input '{{\"text\": \"hello\"}}'");
        println!("  jobhost plugin push {name} {artifact}");
    }
    Ok(0)
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// The phase of a new crate: one that upper-cases text, or one that
/// fetches a URL.
fn phase_source(name: &str, type_name: &str, http: bool) -> String {
    let file = name.replace('-', "_");
    if http {
        return format!(
            r#"//! `{name}`: a jobhost phase that fetches the payload's `url`. Build with
//! `cargo build --release`, upload it, and grant it the origins it may call:
//! `jobhost plugin grant {name} --version 0.1.0 --http https://api.example.com`
//! (any other origin is refused, naming the grant).

use jobhost_plugin::{{Context, Input, Phase, PhaseError, Value, export_phase, http, json}};

struct {type_name};

impl Phase for {type_name} {{
    fn run(_ctx: &Context, input: &Input) -> Result<Value, PhaseError> {{
        let payload: Value = input.payload()?;
        let url = payload["url"].as_str().ok_or_else(|| PhaseError::fail("the payload needs a \"url\" string"))?;
        let response = http::get(url)?;
        if response.status >= 500 {{
            return Err(PhaseError::retry(format!("{{url}} answered {{}}", response.status)));
        }}
        Ok(json!({{ "status": response.status, "body": response.text()? }}))
    }}
}}

export_phase!({type_name});
"#
        );
    }
    format!(
        r#"//! `{name}`: a jobhost phase. Build with `cargo build --release`, then try it:
//! `jobhost run-phase target/wasm32-wasip2/release/{file}.wasm --input '{{"text": "hello"}}'`

use jobhost_plugin::{{Context, Input, Phase, PhaseError, Value, export_phase, json}};

struct {type_name};

impl Phase for {type_name} {{
    fn run(_ctx: &Context, input: &Input) -> Result<Value, PhaseError> {{
        let payload: Value = input.payload()?;
        let text = payload["text"].as_str().ok_or_else(|| PhaseError::fail("the payload needs a \"text\" string"))?;
        if jobhost_plugin::cancelled() {{
            return Err(PhaseError::retry("cancelled before it started"));
        }}
        jobhost_plugin::progress(100, "upper-cased");
        Ok(json!({{ "text": text.to_uppercase(), "characters": text.chars().count() }}))
    }}
}}

export_phase!({type_name});
"#
    )
}

/// (relative path, contents) of every file of the new crate.
fn files(name: &str, http: bool) -> Vec<(&'static str, String)> {
    let type_name: String = name
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            chars.next().map_or_else(String::new, |c| {
                c.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect();
    let sdk_version = env!("CARGO_PKG_VERSION");
    let description = if http {
        "A jobhost phase that fetches a URL"
    } else {
        "A jobhost phase that upper-cases text"
    };
    vec![
        (
            "Cargo.toml",
            format!(
                r#"[package]
name = "{name}"
version = "0.1.0"
description = "{description}"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
jobhost-plugin = {{ path = "jobhost-plugin" }}

[profile.release]
opt-level = "s"
strip = true

# A crate of its own, not part of any enclosing workspace.
[workspace]
"#
            ),
        ),
        (
            ".cargo/config.toml",
            "# `cargo build` makes a WebAssembly component.\n[build]\ntarget = \"wasm32-wasip2\"\n"
                .into(),
        ),
        (".gitignore", "/target\n".into()),
        ("src/lib.rs", phase_source(name, &type_name, http)),
        (
            "jobhost-plugin/Cargo.toml",
            format!(
                r#"[package]
name = "jobhost-plugin"
version = "{sdk_version}"
description = "The jobhost plugin SDK, vendored by `jobhost new-plugin`"
edition = "2024"

[dependencies]
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"
wit-bindgen = {{ version = "0.61", default-features = false, features = ["macros", "realloc"] }}
wstd = "0.6"
"#
            ),
        ),
        (
            "jobhost-plugin/src/lib.rs",
            SDK_SOURCE.replace(r#"path: "../../wit""#, r#"path: "wit""#),
        ),
        ("jobhost-plugin/wit/plugin.wit", CONTRACT.to_owned()),
        (
            "jobhost-plugin/wit/deps/config/store.wit",
            CONFIG_STORE.to_owned(),
        ),
        (
            "jobhost-plugin/wit/deps/config/world.wit",
            CONFIG_WORLD.to_owned(),
        ),
    ]
}
