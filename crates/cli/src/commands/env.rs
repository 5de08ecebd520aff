//! `gatevm env`: the environment that points the host's own tools at an instance.

use crate::output::runtime;
use gatevm_instance::client::ClientError;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance name.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
}

/// Prints `CONTAINERD_ADDRESS=...` and `CONTAINERD_NAMESPACE=...` for a shell to `eval`: the
/// host's `ctr` (and any containerd client) then talks to the instance's containerd, in the
/// namespace gatevm's own `image` and `run` use (and k3s): what one imports the other sees.
pub(crate) fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?;
    let st = runtime()?.block_on(gatevm_instance::client::status(name))?;
    if st.ephemeral {
        anyhow::bail!(
            "instance {name:?} is a throwaway VM of `gatevm vm-run`: it has no containerd socket"
        );
    }
    let Some(sock) = st.containerd_socket else {
        return Err(ClientError::NotRunning(name.to_string()).into());
    };
    print!("{}", env_lines(&sock));
    Ok(0)
}

/// The lines, each value quoted for a POSIX shell.
fn env_lines(sock: &str) -> String {
    format!(
        "CONTAINERD_ADDRESS={}\nCONTAINERD_NAMESPACE={}\nexport CONTAINERD_ADDRESS CONTAINERD_NAMESPACE\n",
        shell_quote(sock),
        super::image::DEFAULT_NAMESPACE
    )
}

/// `s` in single quotes, with each `'` written as `'\''`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_survive_a_shell() {
        let sock = "/run/user/1000/gatevm/it's here/containerd.sock";
        let script = format!(
            "{}printf '%s|%s' \"$CONTAINERD_ADDRESS\" \"$CONTAINERD_NAMESPACE\"",
            env_lines(sock)
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{sock}|k8s.io")
        );
    }
}
