//! `gatevm logs`

use anyhow::bail;
use gatevm_instance::client;
use gatevm_protocol::ExecRequest;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Instance name.
    #[arg(default_value = super::DEFAULT_NAME)]
    name: String,
    /// Keep printing new lines as they come.
    #[arg(short, long)]
    follow: bool,
    /// Show the guest console (kernel and init messages) instead of containerd's log. Works on a
    /// stopped instance too, to see why it stopped.
    #[arg(long, conflicts_with = "host")]
    console: bool,
    /// Show one of the host-side logs instead: supervisor, gvproxy or passt (the network helper), virtiofsd or vmm.
    #[arg(long, value_parser = ["supervisor", "gvproxy", "passt", "virtiofsd", "vmm"])]
    host: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    let name = super::name_arg(&a.name)?.to_string();
    let paths = client::existing(&name)?;
    if let Some(which) = a.console.then_some("console").or(a.host.as_deref()) {
        return follow_file(&paths, &paths.log(which), a.follow);
    }
    if !client::is_running(&paths) {
        bail!("instance {name:?} is not running (start it with `gatevm start {name}`; `--console` shows the last boot)");
    }
    let mut argv = vec!["tail".to_string(), "-n".into(), "+1".into()];
    if a.follow {
        argv.push("-F".into());
    }
    argv.push("/var/log/containerd.log".into());
    let req = ExecRequest {
        argv,
        env: vec![],
        cwd: None,
        tty: false,
        rows: 0,
        cols: 0,
        stdin: false,
    };
    super::exec::run_exec(&name, req)
}

/// Prints a host-side log file, and with `follow` keeps printing while the instance runs.
fn follow_file(
    paths: &gatevm_instance::InstancePaths,
    file: &std::path::Path,
    follow: bool,
) -> anyhow::Result<i32> {
    let mut f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no log yet at {}", file.display())
        }
        Err(e) => bail!("reading {}: {e}", file.display()),
    };
    let read_err = |e: std::io::Error| anyhow::anyhow!("reading {}: {e}", file.display());
    if !f.metadata().map_err(read_err)?.is_file() {
        bail!("{} is not a file", file.display());
    }
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(read_err)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        if !follow || !client::is_running(paths) {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(200));
        // A truncated file starts over.
        let pos = f.stream_position().map_err(read_err)?;
        if std::fs::metadata(file)
            .map(|m| m.len() < pos)
            .unwrap_or(false)
        {
            f.seek(SeekFrom::Start(0)).map_err(read_err)?;
        }
    }
}
