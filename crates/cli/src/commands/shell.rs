//! `gatevm shell`

use gatevm_abi::ExecRequest;
use std::io::IsTerminal;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance name.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
}

pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let req = ExecRequest {
        argv: vec!["/bin/bash".into(), "-l".into()],
        env: vec![],
        cwd: Some("/root".into()),
        tty,
        rows: 0,
        cols: 0,
        stdin: true,
    };
    super::exec::run_exec(&name, req)
}
