//! The real programs the contention and Go tests run (agent/tests/programs), built for the host
//! and for aarch64 into target/test-programs/<arch>/ before the tests: the VM guests have no
//! compilers, and the arm64 guest's userland is minimal (so everything is linked statically).

use std::{path::Path, process::Command};

use anyhow::Result;

use crate::{setup, vm};

/// Builds every test program for both architectures.
pub fn build() -> Result<()> {
    setup::apt_install(&[
        "golang-go",
        "gcc",
        "gcc-aarch64-linux-gnu",
        "libc6-dev-arm64-cross",
    ])?;
    let root = vm::workspace_root();
    let sources = root.join("agent/tests/programs");
    for (arch, goarch, cc) in [
        ("x86_64", "amd64", "gcc"),
        ("aarch64", "arm64", "aarch64-linux-gnu-gcc"),
    ] {
        let out = root.join("target/test-programs").join(arch);
        std::fs::create_dir_all(&out)?;
        for (name, source) in [
            ("nw-mutex", "mutex.c"),
            ("nw-pingpong", "pingpong.c"),
            ("nw-futexbench", "futexbench.c"),
            ("nw-switchbench", "switchbench.c"),
            ("nw-hold", "hold.c"),
        ] {
            setup::run(
                Command::new(cc)
                    // Frame pointers: the kernel walks user stacks by them.
                    .args([
                        "-O2",
                        "-fno-omit-frame-pointer",
                        "-pthread",
                        "-static",
                        "-o",
                    ])
                    .arg(out.join(name))
                    .arg(sources.join(source)),
            )?;
        }
        for (name, dir) in [
            ("nw-go-crash", "go-crash"),
            ("nw-go-rwmutex", "go-rwmutex"),
            ("nw-go-syncmap", "go-syncmap"),
            ("nw-go-sharded", "go-sharded"),
        ] {
            go_build(&sources.join(dir), goarch, &out.join(name), &root)?;
        }
    }
    Ok(())
}

fn go_build(dir: &Path, goarch: &str, out: &Path, root: &Path) -> Result<()> {
    setup::run(
        Command::new("go")
            .args(["build", "-o"])
            .arg(out)
            .arg(".")
            .current_dir(dir)
            .env("GOARCH", goarch)
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "-mod=mod")
            .env("GOCACHE", root.join("target/go-cache"))
            .env("GOPATH", root.join("target/go-path")),
    )
}
