//! Generates bindings for the system UCX headers (`ucp/api/ucp.h`) and links libucp.
//!
//! UCX is found through pkg-config (`ucx.pc`, shipped by Debian's `libucx-dev`); bindgen needs
//! libclang (`libclang-dev`). This crate is only built when `duet-transport` is built with its
//! `ucx` feature, so a plain `cargo build` needs neither package.

use std::env;
use std::path::PathBuf;

/// The oldest UCX whose API these bindings are used with (the nbx calls and AM v2 appeared in 1.10).
const UCX_VERSION_MIN: &str = "1.10";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo::rustc-check-cfg=cfg(ucx_sys_unavailable)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lib = match pkg_config::Config::new()
        .atleast_version(UCX_VERSION_MIN)
        .probe("ucx")
    {
        Ok(lib) => lib,
        Err(e) => {
            // `cargo build/test --workspace` builds this crate on machines without UCX too:
            // build an empty crate there. duet-transport's `ucx` feature then stops with a
            // compile-time assertion naming the packages to install.
            println!(
                "cargo:warning=ucx-sys: UCX >= {UCX_VERSION_MIN} not found by pkg-config ({}); \
                 building without bindings. Install: apt-get install -y libucx-dev ucx-utils libclang-dev",
                e.to_string()
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("")
            );
            println!("cargo:rustc-cfg=ucx_sys_unavailable");
            return;
        }
    };
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("uc[sp]_.*")
        .allowlist_type("uc[sp]_.*")
        .allowlist_var("UC[SP]_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for path in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", path.display()));
    }
    let bindings = builder
        .generate()
        .unwrap_or_else(|e| panic!("ucx-sys: bindgen failed on ucp/api/ucp.h: {e}"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .unwrap_or_else(|e| panic!("ucx-sys: cannot write bindings: {e}"));
}
