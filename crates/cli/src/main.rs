//! `gatevm`: run a container control plane as an appliance in a microVM.

mod commands;
mod output;

use clap::{Parser, Subcommand};

const EXIT_CODES: &str = "\
Exit codes:
  0    success
  1    failure (one line on stderr says what and why)
  2    usage error
  125  `run`: the container could not be started
  N    `exec`/`shell`/`vm-run`/`run`: the guest command's (or container's) own exit code (126 not executable, 127 not found,
       128+N killed by signal N)";

/// Run containerd (and k3s) as a self-contained appliance inside a microVM.
#[derive(Parser)]
#[command(name = "gatevm", version, about, after_help = EXIT_CODES, propagate_version = true)]
struct Cli {
    /// More output on stderr (once: error chains and info logs, twice: debug logs). Long form
    /// only: `-v` is `start -v`'s and `run -v`'s shared directories, as in docker.
    #[arg(long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install host packages and fetch the runtime: kernel, helpers, root filesystem.
    Setup(commands::setup::Args),
    /// Start an instance and wait until it is ready.
    Start(Box<commands::start::Args>),
    /// Stop an instance: graceful, then forced after a timeout.
    Stop(commands::stop::Args),
    /// Show the status of an instance.
    Status(commands::status::Args),
    /// List instances.
    #[command(alias = "ls")]
    List(commands::list::Args),
    /// Run a command in an instance.
    Exec(commands::exec::Args),
    /// Boot a throwaway microVM, run one command in it, and remove it again.
    #[command(name = "vm-run")]
    VmRun(commands::vm_run::Args),
    /// Open an interactive shell in an instance.
    Shell(commands::shell::Args),
    /// Show an instance's logs (containerd's by default).
    Logs(commands::logs::Args),
    /// Report host capabilities, available backends, runtime components and guest kernels.
    Doctor(commands::doctor::Args),
    /// Delete an instance and its data.
    Delete(commands::delete::Args),
    /// Print CONTAINERD_ADDRESS and CONTAINERD_NAMESPACE for the host's own tools (`eval "$(gatevm env)"`).
    Env(commands::env::Args),
    /// Print the kubeconfig of a k3s instance.
    Kubeconfig(commands::k3s::KubeconfigArgs),
    /// Print the cluster token of a k3s server instance (for joining k3s nodes on other machines).
    #[command(name = "cluster-token")]
    ClusterToken(commands::k3s::ClusterTokenArgs),
    /// Import, list and remove container images in an instance.
    Image(commands::image::Args),
    /// Run a container from an imported image in an instance.
    Run(commands::container::RunArgs),
    /// List the containers of an instance.
    Ps(commands::container::PsArgs),
    /// Remove containers from an instance.
    Rm(commands::container::RmArgs),
    /// Run an instance's supervisor (internal; started by `start`).
    #[command(name = "__supervise", hide = true)]
    Supervise(commands::supervise::Args),
    /// Be a libkrun VM (internal; started by the supervisor, never returns on success).
    #[command(name = "__krun-vm", hide = true)]
    KrunVm(commands::krun_vm::Args),
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // The supervisor writes its log itself, capped; its stdout and stderr follow that file.
    let own_log = match &cli.cmd {
        Cmd::Supervise(a) => a.open_log(),
        _ => None,
    };
    output::init_logging(
        cli.verbose,
        matches!(cli.cmd, Cmd::Supervise(_) | Cmd::KrunVm(_)),
        own_log,
    );
    // The environment that places gatevm's files is checked before any command touches them
    // (`doctor` reports a problem instead; the internal commands inherit a checked one).
    if !matches!(cli.cmd, Cmd::Doctor(_) | Cmd::Supervise(_) | Cmd::KrunVm(_)) {
        if let Err(e) = gatevm_instance::preflight::check_env() {
            eprintln!("gatevm: error: {}", gatevm_abi::error_chain(&e));
            std::process::exit(1);
        }
    }
    let result = match cli.cmd {
        Cmd::Setup(a) => commands::setup::run(a),
        Cmd::Start(a) => commands::start::run(*a),
        Cmd::Stop(a) => commands::stop::run(a),
        Cmd::Status(a) => commands::status::run(a),
        Cmd::Env(a) => commands::env::run(a),
        Cmd::List(a) => commands::list::run(a),
        Cmd::Exec(a) => commands::exec::run(a),
        Cmd::VmRun(a) => commands::vm_run::run(a),
        Cmd::Shell(a) => commands::shell::run(a),
        Cmd::Logs(a) => commands::logs::run(a),
        Cmd::Delete(a) => commands::delete::run(a),
        Cmd::Image(a) => commands::image::run(a),
        Cmd::Kubeconfig(a) => commands::k3s::print_kubeconfig(a),
        Cmd::ClusterToken(a) => commands::k3s::print_cluster_token(a),
        Cmd::Run(a) => commands::container::run(a),
        Cmd::Ps(a) => commands::container::ps(a),
        Cmd::Rm(a) => commands::container::rm(a),
        Cmd::Doctor(a) => commands::doctor::run(a),
        Cmd::Supervise(a) => commands::supervise::run(a),
        Cmd::KrunVm(a) => commands::krun_vm::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the error and its causes (terminal control sequences stripped: a
            // message may quote the guest).
            eprintln!("gatevm: error: {}", crate::output::shown_error(&e));
            std::process::exit(1);
        }
    }
}
